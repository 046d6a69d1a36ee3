"""Python clients for the gRPC API: `OrthrusClient` (sync) and `AsyncOrthrusClient` (asyncio)."""

from collections.abc import AsyncIterator, Iterator

import grpc

from orthrus_serve.api import orthrus_pb2 as pb
from orthrus_serve.api.orthrus_pb2_grpc import OrthrusStub


def make_request(prompt: str | list[int], **params) -> pb.GenerateRequest:
    if isinstance(prompt, str):
        return pb.GenerateRequest(prompt=prompt, **params)
    return pb.GenerateRequest(prompt_token_ids=prompt, **params)


class OrthrusClient:
    def __init__(self, address: str = "127.0.0.1:9000", application: str = "orthrus", timeout_s: float | None = None):
        self.channel = grpc.insecure_channel(address)
        self.stub = OrthrusStub(self.channel)
        self.metadata = (("application", application),)
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
    def __init__(self, address: str = "127.0.0.1:9000", application: str = "orthrus", timeout_s: float | None = None):
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = OrthrusStub(self.channel)
        self.metadata = (("application", application),)
        self.timeout_s = timeout_s

    async def generate(self, prompt: str | list[int], **params) -> pb.GenerateResponse:
        return await self.stub.Generate(make_request(prompt, **params), metadata=self.metadata, timeout=self.timeout_s)

    async def generate_stream(self, prompt: str | list[int], **params) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.GenerateStream(make_request(prompt, **params), metadata=self.metadata, timeout=self.timeout_s)
        async for msg in call:
            yield msg

    async def close(self) -> None:
        await self.channel.close()
