"""The standard gRPC health service (`grpc.health.v1.Health/Check`) on Ray Serve's gRPC proxy.

Ray's proxy routes every registered service to the ingress deployment (its `Check` method), by the
`application` metadata or, when the cluster serves one application, without it: a probe such as
Kubernetes' gRPC probe or grpc_health_probe sends no metadata and needs no API key. `Watch` is not
served. The two messages are defined here, in a private descriptor pool, so that the project needs
no grpcio-health-checking and cannot clash with it where that package is also imported.
"""

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from orthrus_serve.grpc_service import add_unparsed

SERVICE = "grpc.health.v1.Health"
CHECK = f"/{SERVICE}/Check"
SERVING, NOT_SERVING = 1, 2  # HealthCheckResponse.ServingStatus (0 UNKNOWN, 3 SERVICE_UNKNOWN)


def _messages() -> tuple:
    f = descriptor_pb2.FileDescriptorProto(name="orthrus_serve/grpc_health.proto", package="grpc.health.v1",
                                           syntax="proto3")
    string, enum = descriptor_pb2.FieldDescriptorProto.TYPE_STRING, descriptor_pb2.FieldDescriptorProto.TYPE_ENUM
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    f.message_type.add(name="HealthCheckRequest").field.add(name="service", number=1, type=string, label=optional)
    resp = f.message_type.add(name="HealthCheckResponse")
    status = resp.enum_type.add(name="ServingStatus")
    for number, name in enumerate(["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]):
        status.value.add(name=name, number=number)
    resp.field.add(name="status", number=1, type=enum, label=optional,
                   type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus")
    f.service.add(name="Health").method.add(name="Check", input_type=".grpc.health.v1.HealthCheckRequest",
                                            output_type=".grpc.health.v1.HealthCheckResponse")  # Watch: not served
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    messages = (message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.health.v1.{name}"))
                for name in ("HealthCheckRequest", "HealthCheckResponse"))
    return pool.FindServiceByName(SERVICE), *messages


HEALTH, HealthCheckRequest, HealthCheckResponse = _messages()


def add_HealthServicer_to_server(servicer, server) -> None:  # noqa: N802 - the gRPC generator's naming
    """A `grpc_servicer_functions` entry for Serve's gRPC options. The request reaches the ingress as
    bytes (no deserializer: bytes pickle anywhere); the ingress answers with a HealthCheckResponse."""
    add_unparsed(servicer, server, HEALTH)


def check(channel: grpc.Channel, service: str = "", metadata=(), timeout_s: float | None = 10.0) -> int:
    """A client's Check: the ServingStatus number (raises grpc.RpcError on a non-OK status)."""
    call = channel.unary_unary(CHECK, request_serializer=HealthCheckRequest.SerializeToString,
                               response_deserializer=HealthCheckResponse.FromString)
    return call(HealthCheckRequest(service=service), metadata=metadata, timeout=timeout_s).status
