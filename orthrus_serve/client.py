"""Python clients for the gRPC API: `OrthrusClient` (sync) and `AsyncOrthrusClient` (asyncio).

`api_key`: sent as `authorization: Bearer <key>`; None takes it from $ORTHRUS_API_KEY (unset: none sent).
TLS (Ray's gRPC proxy has none: a gateway in front terminates it, cluster/kuberay/base/gateway.yaml):
`ca_file` is a PEM file of the root certificates to trust (a private CA, a self-signed certificate);
`tls=True` without it trusts the system's roots. Neither: plaintext (h2c)."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc

from orthrus_serve.api import orthrus_pb2 as pb
from orthrus_serve.api.orthrus_pb2_grpc import OrthrusStub
from orthrus_serve.auth import bearer, key_from_env


def make_request(prompt: str | list[int], **params) -> pb.GenerateRequest:
    if isinstance(prompt, str):
        return pb.GenerateRequest(prompt=prompt, **params)
    return pb.GenerateRequest(prompt_token_ids=prompt, **params)


def call_metadata(application: str, api_key: str | None) -> tuple[tuple[str, str], ...]:
    key = api_key if api_key is not None else key_from_env()
    return (("application", application),) + ((("authorization", bearer(key)),) if key else ())


def channel_credentials(tls: bool, ca_file: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting `ca_file` (or, with only `tls`, the system's roots); None: plaintext."""
    if ca_file is not None:
        return grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
    return grpc.ssl_channel_credentials() if tls else None


def add_tls_arguments(parser) -> None:
    parser.add_argument("--tls", action="store_true", help="TLS, trusting the system's root certificates")
    parser.add_argument("--ca-file", help="TLS, trusting the root certificates in this PEM file (implies --tls)")


class OrthrusClient:
    def __init__(self, address: str = "127.0.0.1:9000", application: str = "orthrus", timeout_s: float | None = None,
                 api_key: str | None = None, tls: bool = False, ca_file: str | None = None):
        creds = channel_credentials(tls, ca_file)
        self.channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
        self.stub = OrthrusStub(self.channel)
        self.metadata = call_metadata(application, api_key)
        self.timeout_s = timeout_s

    def generate(self, prompt: str | list[int], **params) -> pb.GenerateResponse:
        return self.stub.Generate(make_request(prompt, **params), metadata=self.metadata, timeout=self.timeout_s)

    def generate_stream(self, prompt: str | list[int], **params) -> Iterator[pb.GenerateResponse]:
        return self.stub.GenerateStream(make_request(prompt, **params), metadata=self.metadata, timeout=self.timeout_s)

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), metadata=self.metadata, timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "OrthrusClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncOrthrusClient:
    def __init__(self, address: str = "127.0.0.1:9000", application: str = "orthrus", timeout_s: float | None = None,
                 api_key: str | None = None, tls: bool = False, ca_file: str | None = None):
        creds = channel_credentials(tls, ca_file)
        self.channel = grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
        self.stub = OrthrusStub(self.channel)
        self.metadata = call_metadata(application, api_key)
        self.timeout_s = timeout_s

    async def generate(self, prompt: str | list[int], **params) -> pb.GenerateResponse:
        return await self.stub.Generate(make_request(prompt, **params), metadata=self.metadata, timeout=self.timeout_s)

    async def generate_stream(self, prompt: str | list[int], **params) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.GenerateStream(make_request(prompt, **params), metadata=self.metadata, timeout=self.timeout_s)
        async for msg in call:
            yield msg

    async def close(self) -> None:
        await self.channel.close()
