"""The engine's own limits: a bounded waiting queue (EngineArgs.max_waiting_requests raises EngineOverloaded
past it) and an engine thread that dies failing its callers (EngineDeadError) instead of leaving them waiting."""

import asyncio

import pytest

from orthrus_engines import AsyncEngine, EngineDeadError, EngineOverloaded, OrthrusInputError, SamplingParams
from orthrus_engines.engine.engine_core import EngineCore
from orthrus_engines.engine.waiting_bound import check_room, waiting_past_batch
from orthrus_engines.config import EngineArgs

LONG = SamplingParams(max_tokens=8, ignore_eos=True, block_size=1)


def test_the_waiting_queue_is_bounded(tiny_model_dir):
    core = EngineCore(EngineArgs(model=str(tiny_model_dir), num_pages=32, max_model_len=64, max_num_seqs=1,
                                 max_waiting_requests=2))
    core.add_request("a", "one", LONG)
    core.add_request("b", "two", LONG)
    with pytest.raises(EngineOverloaded, match="waiting queue is full"):
        core.add_request("c", "three", LONG)
    assert "c" not in core.seqs
    core.step()  # "a" is admitted: room for one more
    core.add_request("c", "three", LONG)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(OrthrusInputError, match="max_waiting_requests"):
            EngineArgs(max_waiting_requests=bad).resolve_max_waiting_requests()


def test_the_shared_waiting_bound():
    check_room(1, 2)
    check_room(10**6, None)  # no bound
    with pytest.raises(EngineOverloaded, match=r"waiting queue is full \(2 requests\)"):
        check_room(2, 2)
    # the trtllm engine's count: what it has in flight past the batch TensorRT-LLM runs
    assert [waiting_past_batch(n, 4) for n in (0, 3, 4, 5, 9)] == [0, 0, 0, 1, 5]


def test_a_dead_engine_thread_fails_its_callers_and_refuses_new_requests(tiny_model_dir, monkeypatch):
    engine = AsyncEngine(str(tiny_model_dir), num_pages=32, max_model_len=64)

    def broken(*_):
        raise RuntimeError("the step's bookkeeping broke")

    async def run():
        gen = engine.generate("r1", "hello", LONG)
        monkeypatch.setattr(engine.core, "step", broken)  # fails the step, then the last resort fails too
        monkeypatch.setattr(engine.core, "fail_all", broken)
        with pytest.raises(EngineDeadError, match="bookkeeping"):
            async for _ in gen:
                pass
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("r2", "again", LONG):
                pass

    try:
        asyncio.run(asyncio.wait_for(run(), 30))  # the old engine left the caller waiting forever
        assert not engine.is_alive
    finally:
        engine.shutdown()
