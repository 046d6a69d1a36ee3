"""Python clients for the gRPC API: `OrthrusClient` (sync) and `AsyncOrthrusClient` (asyncio).

`api_key`: sent as `authorization: Bearer <key>`; None takes it from $ORTHRUS_API_KEY (unset: none sent)."""

from collections.abc import AsyncIterator, Iterator

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


class OrthrusClient:
    def __init__(self, address: str = "127.0.0.1:9000", application: str = "orthrus", timeout_s: float | None = None,
                 api_key: str | None = None):
        self.channel = grpc.insecure_channel(address)
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
                 api_key: str | None = None):
        self.channel = grpc.aio.insecure_channel(address)
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
