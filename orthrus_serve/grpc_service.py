"""gRPC services on Ray Serve's gRPC proxy, their requests passed on unparsed.

With the generated `add_OrthrusServicer_to_server` the proxy parses each request, and a message protobuf refuses
(a string field that is not UTF-8, bytes that are not protobuf) fails inside grpcio with status UNKNOWN before any
of our code sees it. Registered here with no request deserializer, the request reaches the ingress as bytes (which
pickle anywhere) and the ingress parses it (`grpc_api.parse`): INVALID_ARGUMENT naming the field. This module is
imported by the proxy: protobuf and grpc only.
"""

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from orthrus_serve.api import orthrus_pb2 as pb

ORTHRUS = pb.DESCRIPTOR.services_by_name["Orthrus"]
SERVICE = ORTHRUS.full_name


def add_unparsed(servicer, server, service: ServiceDescriptor) -> None:
    """Register every method of `service` (unary or server-streaming) on `server`, calling `servicer`'s method of
    the same name with the request's bytes and serializing its replies as the method's output message."""
    handlers = {}
    for method in service.methods:
        assert not method.client_streaming, method.full_name
        kind = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        reply = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = kind(getattr(servicer, method.name), request_deserializer=None,
                                     response_serializer=reply.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)  # as generated code does (grpcio >= 1.63)


def add_OrthrusServicer_to_server(servicer, server) -> None:  # noqa: N802 - the gRPC generator's naming
    """A `grpc_servicer_functions` entry for Serve's gRPC options (in place of the generated one)."""
    add_unparsed(servicer, server, ORTHRUS)
