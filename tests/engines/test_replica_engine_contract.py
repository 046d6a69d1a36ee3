"""The replica-engine contract (orthrus_engines.engine.replica), held against every backend: the torch
AsyncEngine always (a tiny model, in process), TensorRT-LLM's (`TrtllmAsyncEngine`) where tensorrt_llm
imports and CUDA is available and ORTHRUS_TRTLLM_MODEL names a Qwen3 Orthrus checkpoint (scripts/
trtllm_check.sh sets it). Stream deltas add up to the backend's offline output; abort and abandoned
streams stop and free what they held; stats / model_info carry the keys the serving layer reads; bad
input raises OrthrusInputError naming the field; past max_waiting_requests a request is refused with
EngineOverloaded; prefix events name the prompt's pages as the ingress does."""

import asyncio
import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from orthrus_engines import LLM, EngineOverloaded, OrthrusInputError, SamplingParams
from orthrus_engines.engine.replica import (MODEL_INFO_KEYS, PREFIX_EVENT_KINDS, STATS_KEYS, ReplicaEngine,
                                            build_replica_engine)
from orthrus_engines.inputs import load_tokenizer
from orthrus_engines.models.checkpoint import checkpoint_fingerprint
from orthrus_engines.prefix_hash import page_hashes

TRTLLM_MODEL = os.environ.get("ORTHRUS_TRTLLM_MODEL")


def trtllm_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not TRTLLM_MODEL:
        return "ORTHRUS_TRTLLM_MODEL (a Qwen3 Orthrus checkpoint directory) is not set"
    return None


BACKENDS = [pytest.param("torch"),
            pytest.param("trtllm", marks=pytest.mark.skipif(trtllm_skip_reason() is not None,
                                                             reason=str(trtllm_skip_reason())))]


class Backend:
    """One backend under test: its engine and its offline reference (token ids of one request)."""

    def __init__(self, name: str, tiny_model):
        self.name = name
        if name == "torch":
            self.model = str(tiny_model("llama", seed=31, twin_noise=0.05))
            self.args = {"block_size": 4, "num_pages": 64}
            self.offline = LLM(model=self.model, **self.args)
        else:
            self.model, self.args, self.offline = TRTLLM_MODEL, {"backend": "trtllm"}, None
        self.engine: ReplicaEngine = build_replica_engine(self.model, None, self.args)

    def offline_tokens(self, prompt: list[int], params: SamplingParams) -> list[int]:
        if self.offline is not None:
            return self.offline.generate(prompt, params)[0].token_ids
        from tensorrt_llm import SamplingParams as TrtSamplingParams

        from orthrus_engines.trtllm.mapping import sampling_kwargs

        out = self.engine.llm.generate(prompt, TrtSamplingParams(**sampling_kwargs(params)))
        return list(out.outputs[0].token_ids)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tiny_model):
    b = Backend(request.param, tiny_model)
    yield b
    b.engine.shutdown()
    assert not b.engine.is_alive


def prompt_of(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 90), (n,), generator=g).tolist()


async def collect(gen) -> list:
    return [d async for d in gen]


async def wait_idle(engine, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_pages"] == s["num_pages"]:
            return s
        assert time.monotonic() < deadline, f"still held: {s}"
        await asyncio.sleep(0.01)


def test_is_a_replica_engine(backend):
    assert isinstance(backend.engine, ReplicaEngine) and backend.engine.is_alive


def test_stream_deltas_add_up_to_the_offline_output(backend):
    vocab = backend.engine.model_info()["vocab_size"]
    prompt, params = prompt_of(21, 1, vocab), SamplingParams(max_tokens=14, ignore_eos=True)
    deltas = asyncio.run(collect(backend.engine.generate("c-1", prompt, params)))
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    last = deltas[-1]
    assert last.finish_reason == "length" and last.error is None
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == backend.offline_tokens(prompt, params)
    assert len(tokens) == last.completion_tokens == 14 and last.prompt_tokens == len(prompt)
    assert "".join(d.text for d in deltas) == "".join(d.text for d in deltas[:-1]) + last.text
    for name in ("completion_tokens", "drafted_tokens", "accepted_tokens"):  # totals so far: never go down
        values = [getattr(d, name) for d in deltas]
        assert values == sorted(values), name
    assert last.accepted_tokens <= last.drafted_tokens


def test_abort_stops_the_stream_and_frees_its_pages(backend):
    engine = backend.engine
    vocab = engine.model_info()["vocab_size"]

    async def run():
        gen = engine.generate("c-abort", prompt_of(30, 2, vocab), SamplingParams(max_tokens=400, ignore_eos=True))
        first = await gen.__anext__()
        engine.abort("c-abort")
        rest = [d async for d in gen]
        busy = engine.stats()
        return [first] + rest, busy, await wait_idle(engine)

    deltas, _, idle = asyncio.run(run())
    assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
    assert sum(len(d.token_ids) for d in deltas) < 400
    assert idle["kv_usage"] == 0.0


def test_an_abandoned_stream_is_aborted(backend):
    engine = backend.engine
    vocab = engine.model_info()["vocab_size"]

    async def run():
        gen = engine.generate("c-gone", prompt_of(25, 3, vocab), SamplingParams(max_tokens=400, ignore_eos=True))
        await gen.__anext__()
        assert engine.stats()["num_running"] + engine.stats()["num_waiting"] == 1
        await gen.aclose()  # what a cancelled caller's stream does
        return await wait_idle(engine)

    assert asyncio.run(run())["num_running"] == 0


def test_stats_and_model_info_carry_what_the_serving_layer_reads(backend):
    stats, info = backend.engine.stats(), backend.engine.model_info()
    assert set(STATS_KEYS) <= set(stats)
    assert all(isinstance(stats[k], int) and stats[k] >= 0 for k in STATS_KEYS if k != "kv_usage")
    assert 0.0 <= stats["kv_usage"] <= 1.0
    assert set(MODEL_INFO_KEYS) <= set(info)
    assert all(isinstance(info[k], int) and info[k] >= 1 for k in ("block_size", "max_model_len", "page_size",
                                                                   "vocab_size"))
    assert Path(info["model"]).resolve() == Path(backend.model).resolve()
    # the same checkpoint gives the same prefix names on every backend
    assert info["prefix_fingerprint"] == checkpoint_fingerprint(Path(info["model"]),
                                                                load_tokenizer(Path(info["tokenizer"])))


def _max_tokens(p: SamplingParams) -> SamplingParams:
    p.max_tokens = 10**7
    return p


def _bad_temperature(p: SamplingParams) -> SamplingParams:
    p.temperature = -1.0  # set after construction: the engine checks again
    return p


BAD = [  # (prompt, params, the field named)
    ([], SamplingParams(), "prompt_token_ids"),
    ([10**9], SamplingParams(), "prompt_token_ids"),
    (3.5, SamplingParams(), "prompt"),
    ([1, 2, 3], _max_tokens(SamplingParams()), "max_tokens"),
    ([1, 2, 3], SamplingParams(stop_token_ids=[10**9]), "stop_token_ids"),
    ([1, 2, 3], _bad_temperature(SamplingParams()), "temperature"),
]


@pytest.mark.parametrize("prompt, params, field", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_raises_naming_the_field(backend, prompt, params, field):
    engine = backend.engine

    async def first():
        return await engine.generate("c-bad", prompt, params).__anext__()

    with pytest.raises(OrthrusInputError) as e:
        asyncio.run(first())
    assert e.value.field == field
    assert engine.stats()["num_running"] + engine.stats()["num_waiting"] == 0


def test_past_max_waiting_requests_a_request_is_refused_as_overloaded(backend):
    engine = build_replica_engine(backend.model, None, {**backend.args, "max_num_seqs": 1, "max_waiting_requests": 1})
    vocab = engine.model_info()["vocab_size"]
    params = SamplingParams(max_tokens=400, ignore_eos=True)

    async def run():
        running = engine.generate("w-run", prompt_of(9, 5, vocab), params)
        await running.__anext__()
        waiting = engine.generate("w-wait", prompt_of(9, 6, vocab), params)
        queued = asyncio.ensure_future(waiting.__anext__())  # it waits for the one batch slot
        deadline = time.monotonic() + 30
        while engine.stats()["num_running"] + engine.stats()["num_waiting"] < 2:
            assert time.monotonic() < deadline and not queued.done(), engine.stats()
            await asyncio.sleep(0.01)
        try:
            with pytest.raises(EngineOverloaded, match="waiting queue is full"):
                await engine.generate("w-over", prompt_of(9, 7, vocab), params).__anext__()
        finally:
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
            await waiting.aclose()
            await running.aclose()
        return await wait_idle(engine)

    try:
        assert asyncio.run(run())["num_running"] == 0
    finally:
        engine.shutdown()


def test_prefix_events_name_the_prompts_pages_as_the_ingress_does(backend):
    engine = backend.engine
    info = engine.model_info()
    prompt = prompt_of(3 * info["page_size"] + 2, 4, info["vocab_size"])
    expected = page_hashes(prompt[:-1], info["page_size"], info["prefix_fingerprint"])

    async def run():
        engine.drain_prefix_events()
        await collect(engine.generate("c-prefix", prompt, SamplingParams(max_tokens=2)))
        stored: set[str] = set()
        deadline = time.monotonic() + 30
        while not set(expected) <= stored and time.monotonic() < deadline:
            for kind, hashes in engine.drain_prefix_events():
                assert kind in PREFIX_EVENT_KINDS
                if kind == "stored":
                    stored.update(hashes)
            await asyncio.sleep(0.02)
        return stored

    assert set(expected) <= asyncio.run(run())
