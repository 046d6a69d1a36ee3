"""Tensor parallelism in the engine: `LLM(..., tensor_parallel_size=2)` on CPU (gloo), rank 1 a worker process.

Its outputs equal one rank's (fp32; greedy and seeded sampling, fixed K and the auto policy, both
cycles, prefix hits, preemption, abort), and its workers exit with the engine.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.tiny_models import write_orthrus

from orthrus_engines import LLM, OrthrusInputError, SamplingParams
from orthrus_engines.cli import main as cli_main

# 30 pages of 4 tokens: fewer than the preemption test's four requests need together
ENGINE = dict(device="cpu", page_size=4, num_pages=30, max_num_seqs=4)
PROMPTS = [list(range(1, 11)), [5, 9, 2, 7, 31, 4], list(range(20, 33)), [60, 61, 3, 3, 8, 17, 44, 2]]


# qwen3 with a causal-anchor head: the fused verify+draft cycle; llama with an official (diffusion-anchor)
# head: the two-pass cycle
@pytest.fixture(scope="module", params=[("qwen3", "causal"), ("llama", None)], ids=["qwen3-fused", "llama-two-pass"])
def engines(request, tmp_path_factory):
    family, anchor_view = request.param
    path = write_orthrus(tmp_path_factory.mktemp("tp") / family, family, seed=6, twin_noise=0.1,
                         anchor_view=anchor_view)
    one = LLM(str(path), **ENGINE)  # built first: a one-rank engine cannot start beside a TP one
    two = LLM(str(path), tensor_parallel_size=2, **ENGINE)
    assert two.core.fused == (anchor_view == "causal") and two.core.policy is not None  # auto K, timed on both ranks
    yield one, two
    two.close()


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("k", [1, 2, 4, None], ids=["ar", "k2", "k4", "auto"])
def test_greedy_equals_one_rank(engines, k):
    one, two = engines
    params = SamplingParams(max_tokens=20, ignore_eos=True, block_size=k)
    expected = _tokens(one, PROMPTS[:2], params)
    assert _tokens(two, PROMPTS[:2], params) == expected
    assert all(len(t) == 20 for t in expected)


def test_seeded_sample_equals_one_rank(engines):
    one, two = engines
    params = SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.9, seed=1234, block_size=4)
    assert _tokens(two, PROMPTS[1:3], params) == _tokens(one, PROMPTS[1:3], params)


def test_preemption_equals_one_rank(engines):
    one, two = engines
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    before = two.core.scheduler.num_preemptions
    expected = _tokens(one, PROMPTS, params)
    assert _tokens(two, PROMPTS, params) == expected
    assert two.core.scheduler.num_preemptions > before  # the pages ran out: a request was preempted


def test_prefix_hit_equals_one_rank(engines):
    one, two = engines
    prompt = list(range(40, 58))
    params = SamplingParams(max_tokens=12, ignore_eos=True, block_size=4)
    expected = _tokens(one, [prompt], params)
    first = two.generate([prompt], params)[0]
    again = two.generate([prompt], params)[0]
    assert again.cached_prompt_tokens >= 16  # its full pages came from the prefix cache
    assert first.token_ids == again.token_ids == expected[0]


def test_tail_draft_kv_equals_one_rank(engines, monkeypatch):
    """`draft_kv="tail"` (the draft block written into the tail slots) under TP: the workers write their
    shard of the tail too, so output equals one rank's, and no step falls back to plain AR."""
    one, two = engines
    for llm in (one, two):
        monkeypatch.setattr(llm.core.orthrus_step, "draft_writes_tail", True)
    params = SamplingParams(max_tokens=20, ignore_eos=True, block_size=4)
    fallbacks = two.core.stats()["num_draft_fallbacks"]
    assert _tokens(two, PROMPTS[:2], params) == _tokens(one, PROMPTS[:2], params)
    assert two.core.stats()["num_draft_fallbacks"] == fallbacks


def test_abort_under_tp(engines):
    """A request aborted mid-decode frees its pages; the others finish as on one rank."""
    one, two = engines
    params = SamplingParams(max_tokens=16, ignore_eos=True, block_size=3)
    expected = _tokens(one, [PROMPTS[0], PROMPTS[2]], params)
    core = two.core
    for i, p in enumerate(PROMPTS[:3]):
        core.add_request(f"abort-{i}", p, params)
    outs: dict[str, list[int]] = {}
    for _ in range(3):
        for d in core.step():
            outs.setdefault(d.request_id, []).extend(d.token_ids)
    assert core.abort_request("abort-1").finish_reason == "abort"
    while core.has_unfinished():
        for d in core.step():
            outs.setdefault(d.request_id, []).extend(d.token_ids)
    assert [outs["abort-0"], outs["abort-2"]] == expected
    assert len(outs["abort-1"]) < 16 and not core.seqs


def test_close_stops_the_workers(engines):
    _, two = engines
    pids = two.core.runner.pids
    assert pids and all(_alive(p) for p in pids)
    two.close()
    assert not any(_alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        two.generate([PROMPTS[0]], SamplingParams(max_tokens=2))


# -- the engine process ends: its workers follow ----------------------------------------------------
CHILD = """
import gc, os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from orthrus_engines import LLM
if __name__ == "__main__":
    llm = LLM({model!r}, tensor_parallel_size=2, block_size=2, device="cpu", page_size=4, num_pages=16)
    pids = llm.core.runner.pids
    print(" ".join(map(str, pids)), flush=True)
    if {how!r} == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    del llm
    gc.collect()
    print("gone" if not any(os.path.exists(f"/proc/{{p}}") for p in pids) else "alive", flush=True)
"""


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return write_orthrus(tmp_path_factory.mktemp("tp-exit") / "m", "qwen3", seed=1)


def _run_child(model: Path, how: str) -> list[str]:
    code = CHILD.format(tests=str(Path(__file__).parent), model=str(model), how=how)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    lines = proc.stdout.split("\n")
    assert lines[0].strip(), f"the child did not start its engine: {proc.stderr[-2000:]}"
    return lines


def test_del_stops_the_workers(small_model):
    lines = _run_child(small_model, "del")
    assert lines[1] == "gone", lines


@pytest.mark.slow
def test_workers_exit_when_the_engine_process_is_killed(small_model):
    pids = [int(p) for p in _run_child(small_model, "kill")[0].split()]
    deadline = time.monotonic() + 60  # a worker notices its pipe closing; no fixed wait
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an exited worker whose parent has not reaped it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- bad sizes: named before anything starts --------------------------------------------------------
@pytest.mark.parametrize("size,message", [(3, "attention heads"), (0, ">= 1"), ("2", ">= 1"), (True, ">= 1")])
def test_bad_size_is_named(small_model, size, message):
    with pytest.raises(OrthrusInputError, match=message) as e:
        LLM(str(small_model), tensor_parallel_size=size, device="cpu", num_pages=8)
    assert e.value.field == "tensor_parallel_size"


def test_kv_heads_must_divide(tmp_path):
    path = write_orthrus(tmp_path / "m", "llama", num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(OrthrusInputError, match=r"KV heads \(1\)"):
        LLM(str(path), tensor_parallel_size=2, device="cpu", num_pages=8)


def test_cli_names_a_bad_size(small_model, capsys):
    assert cli_main(["generate", "hi", "--model", str(small_model), "--tensor-parallel-size", "3"]) == 2
    assert "tensor_parallel_size" in capsys.readouterr().err


@pytest.mark.slow  # about 25 s: two processes load torch
def test_cli_generates_with_two_ranks(tiny_model_dir):
    """`orthrus generate --tensor-parallel-size 2` prints what one rank prints (processes of their own: a
    one-rank engine cannot start in a process whose group a two-rank one holds)."""

    def generate(*flags: str) -> dict:
        cmd = [sys.executable, "-m", "orthrus_engines.cli", "generate", "The capital of France is", "--model",
               str(tiny_model_dir), "--max-tokens", "8", "--ignore-eos", "--json", *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    two = generate("--tensor-parallel-size", "2")
    assert len(two["token_ids"]) == 8 and two["token_ids"] == generate()["token_ids"]
