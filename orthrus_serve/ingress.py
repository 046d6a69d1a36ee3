"""The ingress deployment: gRPC (`orthrus.v1.Orthrus`) through Ray Serve's gRPC proxy and
OpenAI-compatible HTTP through its HTTP proxy (with vLLM's /version, /tokenize and /detokenize; the fields
each endpoint honours are openai_fields'). It prepares each request once (tokens, block
hashes), streams from an engine replica chosen by the prefix-aware router, and maps errors:
bad input -> INVALID_ARGUMENT / 400, a lost replica -> UNAVAILABLE / 503 (retried once on another replica
before the first token), a full queue -> RESOURCE_EXHAUSTED / 429 with Retry-After, past request_timeout_s ->
DEADLINE_EXCEEDED / 504, a request the engine failed -> INTERNAL / 500 (request_flow, errors). Each replica serves
at most max_ingress_requests API calls at once (admission; a stream until it ends or is cancelled): past it
RESOURCE_EXHAUSTED / 429 with Retry-After at once. With an API key set
(ServeConfig.api_key_env), every API call needs `authorization: Bearer <key>` (else UNAUTHENTICATED /
401); the health checks (`/health`, gRPC Health/Check) need none. Request bodies are parsed, checked
(ServeConfig.limits), tokenized and chat-templated in a small thread pool, off the event loop: a huge prompt
does not stall the other streams."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from orthrus_engines import OrthrusInputError, RequestOutput
from orthrus_engines.outputs import RequestAccumulator
from orthrus_serve import __version__, grpc_api, grpc_health
from orthrus_serve import openai_fields as fields
from orthrus_serve.api import orthrus_pb2 as pb
from orthrus_serve import openai_api as oai
from orthrus_serve.admission import InFlightLimit, Slot, SlotStreamingResponse
from orthrus_serve.auth import ApiKey, grpc_authorization
from orthrus_serve.errors import Overloaded, http_error
from orthrus_serve.config import ServeConfig
from orthrus_serve.http_guard import BodyTimeout, RequestTooLarge, body_refused, install_error_handlers, read_body
from orthrus_serve.health import engine_deployment_health
from orthrus_serve.request_flow import guarded
from orthrus_serve.request_prep import PreparedRequest, RequestPreparer

log = logging.getLogger(__name__)

app = FastAPI(title="orthrus-serve")
install_error_handlers(app)  # every HTTP error in OpenAI's shape
# what an HTTP request can be refused for before it reaches an engine (_refused: 400, 404, 413, 408)
REFUSED = (OrthrusInputError, fields.UnknownModel, RequestTooLarge, BodyTimeout)
PREP_THREADS = 4  # request preparation (JSON, tokenizer, chat template) runs here; the tokenizer drops the GIL


@serve.deployment(name="OrthrusIngress")  # app.py sets max_ongoing_requests from max_ingress_requests
@serve.ingress(app)
class Ingress:
    def __init__(self, replicas: DeploymentHandle, config: dict):
        cfg = ServeConfig.model_validate(config)
        self.replicas = replicas  # the engine deployment's replicas (EngineServer), through the router
        self.model_name = cfg.served_model_name
        self.app_name = serve.get_replica_context().app_name
        self.api_key = ApiKey.from_env(cfg.api_key_env)  # from this process's environment, never a config
        if cfg.api_key_env and not self.api_key.required:
            log.warning("%s is not set: the API is open to anyone who can reach it", cfg.api_key_env)
        self.request_timeout_s, self.retry_after_s = cfg.request_timeout_s, cfg.retry_after_s
        self.info: dict | None = None
        self.preparer: RequestPreparer | None = None
        self.limits = cfg.limits
        self.in_flight = InFlightLimit(cfg.max_ingress_requests)  # API calls in flight here (admission)
        self.prep_pool = ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="prep")
        self._ready_lock = asyncio.Lock()  # the first requests wait for one preparer (one tokenizer import)

    async def off_loop(self, fn: Callable, *args):
        """fn(*args) in the preparation pool (tokenizing a long prompt takes seconds)."""
        return await asyncio.get_running_loop().run_in_executor(self.prep_pool, fn, *args)

    async def ready(self) -> RequestPreparer:
        """Model facts (and where its engine's tokenizer is) come from an engine replica the first time
        they are needed."""
        async with self._ready_lock:
            if self.preparer is None:
                self.info = await self.replicas.model_info.remote()
                self.preparer = await self.off_loop(RequestPreparer, self.info, self.limits)
        return self.preparer

    def stream(self, req: PreparedRequest) -> AsyncIterator[RequestOutput]:
        """The request's deltas from the engine replica the router picks, within the time limit (request_flow)."""
        return guarded(lambda: self.replicas.options(stream=True).generate.remote(
            req.request_id, req.token_ids, req.params, page_hashes=req.page_hashes), self.request_timeout_s)

    def _http_failed(self, e: Exception) -> tuple[int, dict, dict]:
        """(status, OpenAI error body, headers) of a request that failed past its validation."""
        status, kind, text = http_error(e)
        if status == 500:
            log.warning("request failed: %s", text)
        headers = {"Retry-After": str(self.retry_after_s)} if status in (429, 503) else {}
        return status, oai.error_body(text, None, kind), headers

    def _admit(self) -> Slot | JSONResponse:
        """A slot for one HTTP API call, or its 429 (max_ingress_requests in flight already)."""
        try:
            return self.in_flight.acquire()
        except Overloaded as e:
            status, error, headers = self._http_failed(e)
            return JSONResponse(error, status_code=status, headers=headers)

    def in_flight_requests(self) -> int:
        """API calls this replica serves now (through a handle: the tests read it)."""
        return self.in_flight.count

    async def healthy(self) -> tuple[bool, dict]:
        return await asyncio.to_thread(engine_deployment_health, self.app_name)

    # -- HTTP (OpenAI) ----------------------------------------------------------------------
    def _http_denied(self, request: Request) -> JSONResponse | None:
        """A 401 in OpenAI's error shape unless the request carries the API key (if one is set)."""
        if self.api_key.accepts(request.headers.get("authorization")):
            return None
        return JSONResponse(oai.error_body("missing or incorrect API key (Authorization: Bearer <key>)", None,
                                           "invalid_request_error", "invalid_api_key"),
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health(self):
        """200 while the engine replicas are healthy, else 503; open (no API key), for probes."""
        ok, details = await self.healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable", **details}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(self, request: Request):
        if denied := self._http_denied(request):
            return denied
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "orthrus-serve"}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._http(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._http(request, chat=True)

    async def _read(self, request: Request) -> tuple[RequestPreparer, bytes]:
        """The model's preparer and the request's body (RequestTooLarge past limits.max_request_bytes,
        BodyTimeout past limits.body_timeout_s)."""
        prep = await self.ready()
        return prep, await read_body(request, self.limits.max_request_bytes, self.limits.body_timeout_s)

    def _parse(self, raw: bytes, allowed: frozenset[str]) -> dict:
        """The JSON body, its fields checked against `allowed` and its model against the served one."""
        body = oai.parse_body(raw)
        fields.check_fields(body, allowed)
        fields.check_model(body, self.model_name)
        return body

    def _refused(self, e: Exception) -> JSONResponse:
        """OrthrusInputError -> 400, UnknownModel -> 404, RequestTooLarge -> 413, BodyTimeout -> 408, in OpenAI's
        error shape."""
        if isinstance(e, fields.UnknownModel):
            return JSONResponse(oai.error_body(str(e), "model", code="model_not_found"), status_code=404)
        if isinstance(e, RequestTooLarge | BodyTimeout):
            return body_refused(e)
        return JSONResponse(oai.error_body(str(e), e.field), status_code=400)

    def _prepare_http(self, prep: RequestPreparer, raw: bytes, chat: bool) -> tuple[PreparedRequest, dict]:
        """A completions or chat body as a prepared request (in the preparation pool), and the body."""
        body = self._parse(raw, fields.CHAT_FIELDS if chat else fields.COMPLETION_FIELDS)
        if chat:
            ids = prep.inputs.chat_ids(fields.chat_messages(body.get("messages")))
        else:
            prompt = oai.completion_prompt(body)
            ids = (prep.inputs.text_ids if isinstance(prompt, str) else prep.inputs.token_ids)(prompt, "prompt")
        return prep.prepare(ids, oai.sampling_fields(body, prep.inputs.max_model_len - len(ids), chat)), body

    async def _http(self, request: Request, chat: bool):
        if denied := self._http_denied(request):
            return denied
        if isinstance(slot := self._admit(), JSONResponse):
            return slot
        response = None
        try:
            response = await self._http_admitted(request, chat, slot)
            return response
        finally:
            if not isinstance(response, SlotStreamingResponse):  # a stream releases its slot when it ends
                slot.release()

    async def _http_admitted(self, request: Request, chat: bool, slot: Slot):
        try:
            prep, raw = await self._read(request)
            req, body = await self.off_loop(self._prepare_http, prep, raw, chat)
            include_usage = fields.include_usage(body)
        except REFUSED as e:
            return self._refused(e)
        except Exception as e:  # noqa: BLE001 - e.g. Serve's queue full while asking a replica for the model facts
            status, error, headers = self._http_failed(e)
            return JSONResponse(error, status_code=status, headers=headers)
        rid = oai.new_id("chatcmpl" if chat else "cmpl")
        deltas = self.stream(req)
        try:
            # the first delta before answering: a full queue or a failed start is a status, not a 200 stream
            first = await anext(deltas)
            if body.get("stream"):
                return SlotStreamingResponse(self._sse(req, first, deltas, rid, chat, include_usage), slot,
                                             media_type="text/event-stream")
            acc = RequestAccumulator()
            acc.add(first)
            async for delta in deltas:
                acc.add(delta)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            status, error, headers = self._http_failed(e)
            return JSONResponse(error, status_code=status, headers=headers)
        make = oai.chat_response if chat else oai.completion_response
        return make(rid, self.model_name, acc.result(), lambda s: self._logprobs(req, s.logprobs or [], chat))

    def _logprobs(self, req: PreparedRequest, lps: list, chat: bool, offset: int = 0) -> dict | None:
        """The response's logprobs object, if the request asked for it."""
        if req.params.logprobs is None:
            return None
        text = self.preparer.token_text
        return oai.chat_logprobs(lps, text) if chat else oai.completion_logprobs(lps, text, offset)

    async def _sse(self, req: PreparedRequest, first: RequestOutput, deltas: AsyncIterator[RequestOutput], rid: str,
                   chat: bool, include_usage: bool) -> AsyncIterator[str]:
        """The chunks of every sample as the engine makes them (interleaved, each with its choice index); a
        failure after the first delta is an error event (OpenAI's error shape)."""
        if chat:
            for i in range(req.params.n):
                yield oai.sse(oai.chat_chunk(rid, self.model_name, None, include_usage, index=i))
        try:
            acc, offsets = RequestAccumulator(), [0] * req.params.n  # text offsets, per choice
            delta: RequestOutput | None = first
            while delta is not None:
                acc.add(delta)
                logprobs = self._logprobs(req, delta.logprobs or [], chat, offsets[delta.index])
                if logprobs is not None and not chat:
                    offsets[delta.index] += sum(map(len, logprobs["tokens"]))
                if chat:
                    yield oai.sse(oai.chat_chunk(rid, self.model_name, delta, include_usage, logprobs=logprobs))
                else:
                    yield oai.sse(oai.completion_chunk(rid, self.model_name, delta, include_usage, logprobs))
                delta = await anext(deltas, None)
            if include_usage and acc.samples:
                yield oai.sse(oai.usage_chunk(rid, self.model_name, chat, acc.counters()))
        except Exception as e:  # noqa: BLE001 - reported in the stream
            yield oai.sse(self._http_failed(e)[1])
        finally:
            await deltas.aclose()
        yield oai.sse("[DONE]")

    # -- vLLM's extra endpoints ---------------------------------------------------------------
    @app.get("/version")
    async def version(self, request: Request):
        if denied := self._http_denied(request):
            return denied
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        """{"prompt": text} or {"messages": [...]} (through the chat template) -> its token ids."""
        if denied := self._http_denied(request):
            return denied
        if isinstance(slot := self._admit(), JSONResponse):
            return slot
        with slot:
            try:
                prep, raw = await self._read(request)
                ids = await self.off_loop(self._tokenize, prep, raw)
            except REFUSED as e:
                return self._refused(e)
        return {"tokens": ids, "count": len(ids), "max_model_len": prep.inputs.max_model_len}

    def _tokenize(self, prep: RequestPreparer, raw: bytes) -> list[int]:
        body = oai.parse_body(raw)
        chat = "messages" in body
        fields.check_fields(body, fields.TOKENIZE_CHAT_FIELDS if chat else fields.TOKENIZE_FIELDS)
        fields.check_model(body, self.model_name)
        if chat:
            return prep.inputs.chat_ids(fields.chat_messages(body["messages"]))
        return prep.inputs.text_ids(body.get("prompt"), "prompt")

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        """{"tokens": [...]} -> {"prompt": their text}."""
        if denied := self._http_denied(request):
            return denied
        if isinstance(slot := self._admit(), JSONResponse):
            return slot
        with slot:
            try:
                prep, raw = await self._read(request)
                body = await self.off_loop(self._parse, raw, fields.DETOKENIZE_FIELDS)
                return {"prompt": await self.off_loop(prep.detokenize, body.get("tokens"))}
            except REFUSED as e:
                return self._refused(e)

    # -- gRPC -------------------------------------------------------------------------------
    def _check_grpc_key(self, grpc_context) -> None:
        if not self.api_key.accepts(grpc_authorization(grpc_context)):
            raise grpc_api.Unauthenticated("missing or incorrect API key (metadata authorization: Bearer <key>)")

    # A request arrives serialized (orthrus_serve.grpc_service) and is parsed here (grpc_api.parse).
    async def _prepare_grpc(self, request: bytes) -> PreparedRequest:
        return await self.off_loop(grpc_api.prepare, await self.ready(), request)

    async def Generate(self, request: bytes, grpc_context) -> pb.GenerateResponse:
        try:
            self._check_grpc_key(grpc_context)
            with self.in_flight.acquire():
                req = await self._prepare_grpc(request)
                acc = RequestAccumulator()
                async for delta in self.stream(req):
                    acc.add(delta)
                return grpc_api.unary_response(req.request_id, acc.result())
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            grpc_api.set_error(grpc_context, e)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: bytes, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        try:
            self._check_grpc_key(grpc_context)
            with self.in_flight.acquire():  # until the stream ends, fails or is cancelled (Serve throws it in)
                req = await self._prepare_grpc(request)
                acc = RequestAccumulator()  # the request's counters so far, over its completions
                async for delta in self.stream(req):
                    acc.add(delta)
                    msg = pb.GenerateResponse(request_id=req.request_id, text=delta.text,
                                              token_ids=delta.token_ids, index=delta.index)
                    grpc_api.copy_counters(msg, delta, acc.counters())
                    grpc_api.copy_logprobs(msg, delta)
                    yield msg
        except Exception as e:  # noqa: BLE001
            grpc_api.set_error(grpc_context, e)
            # A stream ends with the status set above only if the method raises; raise a builtin
            # error, since the gRPC proxy unpickles it (it may not import our modules, and an
            # OrthrusInputError does not survive pickling).
            raise RuntimeError(grpc_context.details() or "request failed") from None

    async def ModelInfo(self, request: bytes, grpc_context) -> pb.ModelInfoResponse:
        try:
            self._check_grpc_key(grpc_context)
            grpc_api.parse(pb.ModelInfoRequest, request)  # no fields, but it must be one
        except (grpc_api.Unauthenticated, OrthrusInputError) as e:
            grpc_api.set_error(grpc_context, e)
            return pb.ModelInfoResponse()
        await self.ready()
        i = self.info
        return pb.ModelInfoResponse(model=self.model_name, block_size=i["block_size"], max_model_len=i["max_model_len"],
                                    page_size=i["page_size"], vocab_size=i["vocab_size"],
                                    prefix_fingerprint=i["prefix_fingerprint"])

    async def Check(self, request: bytes, grpc_context):
        """grpc.health.v1.Health/Check (the request arrives serialized; see grpc_health). Open, for probes:
        "" or orthrus.v1.Orthrus is SERVING while the engine replicas are healthy; other names NOT_FOUND."""
        try:
            service = grpc_api.parse(grpc_health.HealthCheckRequest, request).service
        except OrthrusInputError as e:
            grpc_api.set_error(grpc_context, e)
            return grpc_health.HealthCheckResponse()
        if service not in ("", pb.DESCRIPTOR.services_by_name["Orthrus"].full_name):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {service!r}")
            return grpc_health.HealthCheckResponse()
        ok, _ = await self.healthy()
        return grpc_health.HealthCheckResponse(status=grpc_health.SERVING if ok else grpc_health.NOT_SERVING)
