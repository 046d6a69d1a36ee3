"""The online engine (docs/ARCHITECTURE.md §3): concurrent streams share one batch and each equals the offline
result; abort, cancellation and abandoned streams free everything; bad requests raise in the caller;
streamed text never splits a UTF-8 character."""

import asyncio
import time

import pytest
import torch

from orthrus_engines import LLM, AsyncEngine, OrthrusInputError, SamplingParams
from orthrus_engines.engine.detokenizer import Detokenizer

VOCAB = 96


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", seed=31, twin_noise=0.05)


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = AsyncEngine(model=str(model_dir), block_size=4, num_pages=64)
    yield eng
    eng.shutdown()
    assert not eng._thread.is_alive()
    assert eng.core.closed  # the core closed too: a tensor-parallel one stops its workers here


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(model=str(model_dir), block_size=4, num_pages=64)


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


async def collect(engine, rid, prompt, sp) -> list:
    return [d async for d in engine.generate(rid, prompt, sp)]


async def wait_all_free(engine, timeout: float = 20.0) -> dict:
    """Poll the engine's stats until nothing runs and every page is free."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s["num_free_pages"] == s["num_pages"] and s["num_running"] == 0 and s["num_waiting"] == 0:
            return s
        assert time.monotonic() < deadline, f"pages still held: {s}"
        await asyncio.sleep(0.01)


REQUESTS = [
    (tokens(5, 1), SamplingParams(max_tokens=20)),
    (tokens(23, 2), SamplingParams(max_tokens=33)),
    (tokens(40, 3), SamplingParams(max_tokens=7)),
    (tokens(8, 4), SamplingParams(max_tokens=25, temperature=1.0, seed=11)),
    (tokens(17, 5), SamplingParams(max_tokens=30, temperature=0.7, top_k=20, seed=12)),
    (tokens(3, 6), SamplingParams(max_tokens=18, use_diffusion=False)),
]


def test_concurrent_streams_equal_offline_generate(engine, offline):
    """asyncio.gather of 6 streams: each stream's deltas concatenate to LLM.generate's tokens; only
    the last delta is finished and carries the finish reason and totals."""

    async def main():
        return await asyncio.gather(*(collect(engine, f"c{i}", p, sp) for i, (p, sp) in enumerate(REQUESTS)))

    streams = asyncio.run(main())
    refs = offline.generate([p for p, _ in REQUESTS], [sp for _, sp in REQUESTS])
    for (p, sp), deltas, ref in zip(REQUESTS, streams, refs):
        assert [t for d in deltas for t in d.token_ids] == ref.token_ids
        assert len(ref.token_ids) == sp.max_tokens
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert not any(d.finished for d in deltas[:-1])
        assert all(d.request_id == deltas[0].request_id for d in deltas)
        assert deltas[-1].completion_tokens == sp.max_tokens
        assert deltas[-1].prompt_tokens == len(p)
    assert sum(d.drafted_tokens > 0 for d in (s[-1] for s in streams)) >= 4  # Orthrus really ran
    asyncio.run(wait_all_free(engine))


def test_streams_deliver_incrementally(engine):
    """A long request streams several deltas (one per step), not one blob at the end."""
    deltas = asyncio.run(collect(engine, "inc", tokens(6, 7), SamplingParams(max_tokens=40)))
    assert len(deltas) >= 5
    assert all(d.token_ids for d in deltas[:-1])


def test_abort_frees_pages(engine):
    """AsyncEngine.abort mid-stream ends the stream with finish_reason 'abort' and frees all pages."""

    async def main():
        got = []
        async for d in engine.generate("ab", tokens(30, 8), SamplingParams(max_tokens=200)):
            got.append(d)
            if len(got) == 2:
                assert engine.stats()["num_free_pages"] < engine.stats()["num_pages"]
                engine.abort("ab")
        assert got[-1].finished and got[-1].finish_reason == "abort"
        assert sum(len(d.token_ids) for d in got) < 200
        await wait_all_free(engine)

    asyncio.run(main())


def test_cancelling_the_consumer_frees_pages(engine):
    """Cancelling the task that iterates a stream aborts its request."""

    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate("cx", tokens(30, 9), SamplingParams(max_tokens=200)):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_all_free(engine)

    asyncio.run(main())


def test_breaking_out_of_the_stream_frees_pages(engine):
    """Leaving `async for` early (the stream object is dropped) aborts the request."""

    async def main():
        async for _ in engine.generate("br", tokens(30, 10), SamplingParams(max_tokens=200)):
            break
        await wait_all_free(engine)
        # The id is free again: a new request with it runs to completion.
        deltas = await collect(engine, "br", tokens(4, 11), SamplingParams(max_tokens=5))
        assert deltas[-1].finish_reason == "length"

    asyncio.run(main())


@pytest.mark.parametrize(
    "field,prompt,sp",
    [
        ("prompt", "", SamplingParams()),
        ("prompt_token_ids", [], SamplingParams()),
        ("prompt_token_ids", [VOCAB], SamplingParams()),
        ("prompt", 3, SamplingParams()),
        ("max_tokens", [1, 2, 3], SamplingParams(max_tokens=10**6)),
    ],
    ids=["empty_string", "empty_ids", "id_out_of_vocab", "int_prompt", "max_tokens_beyond_window"],
)
def test_bad_request_raises_in_caller_and_engine_keeps_serving(engine, offline, field, prompt, sp):
    async def main():
        with pytest.raises(OrthrusInputError) as info:
            await collect(engine, "bad", prompt, sp)
        assert info.value.field == field
        p, good = REQUESTS[0]
        deltas = await collect(engine, "good", p, good)
        assert [t for d in deltas for t in d.token_ids] == offline.generate(p, good)[0].token_ids
        await wait_all_free(engine)

    asyncio.run(main())


def test_duplicate_running_request_id_is_rejected(engine):
    async def main():
        stream = engine.generate("dup", tokens(5, 12), SamplingParams(max_tokens=50))
        first = await stream.__anext__()
        with pytest.raises(OrthrusInputError) as info:
            await collect(engine, "dup", tokens(5, 13), SamplingParams(max_tokens=5))
        assert info.value.field == "request_id"
        rest = [d async for d in stream]
        assert sum(len(d.token_ids) for d in [first, *rest]) == 50
        await wait_all_free(engine)

    asyncio.run(main())


def test_shutdown_stops_the_engine_thread(model_dir):
    eng = AsyncEngine(model=str(model_dir), block_size=4, num_pages=8)
    asyncio.run(collect(eng, "s", [1, 2, 3], SamplingParams(max_tokens=3)))
    eng.shutdown()
    assert not eng._thread.is_alive()
    assert eng.core.closed  # the core closed too: a tensor-parallel one stops its workers here


# -- incremental detokenization (built-in tokenizer) -------------------------------------------

TRICKY = "Héllo wörld 🐶🐕 naïve café — 二頭の犬 🎉 ok"


@pytest.mark.slow
def test_detokenizer_never_splits_a_character(builtin_dir):
    """Token by token, the Detokenizer's pieces concatenate to the full decode and none contains a
    replacement character, although single tokens of this text decode to U+FFFD."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_dir))
    prompt = tok("Say it:")["input_ids"]
    ids = tok(" " + TRICKY, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([t]) for t in ids), "the text should split characters across tokens"
    detok = Detokenizer(tok, prompt)
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(ids) == " " + TRICKY
    assert not any("\ufffd" in p for p in pieces)
    assert sum(p == "" for p in pieces) > 0  # it did hold back


@pytest.mark.slow
def test_streamed_text_equals_full_text_builtin(builtin_dir):
    """On the built-in model, streamed text deltas concatenate to the offline text and to the decode
    of the streamed tokens; no delta carries U+FFFD."""
    eng = AsyncEngine(model=str(builtin_dir), block_size=8, num_pages=64)
    try:
        prompt = "Translate to Japanese with emoji: I love my two dogs 🐶🐶. Answer:"
        sp = SamplingParams(max_tokens=24, ignore_eos=True)
        deltas = asyncio.run(collect(eng, "jp", prompt, sp))
        text = "".join(d.text for d in deltas)
        ids = [t for d in deltas for t in d.token_ids]
        assert text == eng.tokenizer.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in d.text for d in deltas)
        assert any("\ufffd" in eng.tokenizer.decode([t]) for t in ids), "the output should split a character"
        ref = LLM(model=str(builtin_dir), block_size=8, num_pages=64).generate(prompt, sp)[0]
        assert ids == ref.token_ids and text == ref.text
    finally:
        eng.shutdown()
