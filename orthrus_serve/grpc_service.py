"""orthrus.v1.Orthrus on Ray Serve's gRPC proxy, its requests passed on unparsed.

With the generated `add_OrthrusServicer_to_server` the proxy parses each request, and a message protobuf refuses
(a string field that is not UTF-8, bytes that are not protobuf) fails inside grpcio with status UNKNOWN before any
of our code sees it. Registered here with no request deserializer, the request reaches the ingress as bytes (which
pickle anywhere) and the ingress parses it (`grpc_api.parse`): INVALID_ARGUMENT naming the field. This module is
imported by the proxy: protobuf and grpc only.
"""

import grpc

from orthrus_serve.api import orthrus_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Orthrus"].full_name


def add_OrthrusServicer_to_server(servicer, server) -> None:  # noqa: N802 - the gRPC generator's naming
    """A `grpc_servicer_functions` entry for Serve's gRPC options (in place of the generated one)."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=None, response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=None,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo, request_deserializer=None, response_serializer=pb.ModelInfoResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)  # as the generated function does (grpcio >= 1.63)
