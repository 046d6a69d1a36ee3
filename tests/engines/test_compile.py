"""`compile=True` runs the model through torch.compile (the packed CPU linears as an opaque op): the
same greedy tokens as HF's fp32 `generate`, for plain AR and Orthrus drafting, and a bounded set of
graphs: one per kind of pass, reused for every later batch size and prompt length."""

import pytest
import torch
from orthrus_engines import LLM, SamplingParams
from support.tiny_models import hf_greedy, hf_model, write_orthrus

pytestmark = pytest.mark.slow  # each kind of pass compiles once (seconds each on 2 cores)

NEW = 12
WARM_UP = [[[5, 17, 3], [9] * 21, [40, 2, 33, 7, 7, 1, 60, 12, 8]], [[5, 17, 3]]]  # a mixed batch of 3, then 1
LATER = [[[4] * 13, [7, 8]], [[3] * 30], [[1] * 5, [2] * 6, [3] * 7, [4] * 40]]  # new sizes and lengths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    paths = {view: write_orthrus(root / view, "llama", anchor_view=view) for view in ("diffusion", "ar", "causal")}  # same weights
    hf = hf_model(paths["diffusion"], "llama")
    oracle = {tuple(p): hf_greedy(hf, p, NEW) for batch in WARM_UP + LATER for p in batch}
    return paths, oracle


# auto also times passes at start-up (and its warm-up forces K = 1, plain AR, as well as the head's K); "ar"
# anchors add row selection to the draft graph; "causal" anchors make a decode step one verify+draft pass
@pytest.mark.parametrize("block_size, anchor_view", [("auto", "diffusion"), (4, "ar"), (4, "causal")])
def test_compiled_engine_matches_hf_greedy_with_a_bounded_set_of_graphs(setup, block_size, anchor_view):
    paths, oracle = setup
    path = paths[anchor_view]
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["frames"]
    start = frames["ok"]
    llm = LLM(str(path), block_size=block_size, num_pages=64, compile=True)
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    # the warm-up also forces AR and full-K drafting per request: every kind of pass compiles, whichever
    # K the policy picks later, and a batch whose sequences all reach their last token together (one AR
    # row each) is one of them
    ks = sorted({1, llm.core.block_size})
    forced = [SamplingParams(max_tokens=NEW, ignore_eos=True, block_size=k) for k in ks]
    for batch in WARM_UP:
        for warm in (*forced, params):
            assert [o.token_ids for o in llm.generate(batch, warm)] == [oracle[tuple(p)] for p in batch]
    graphs = frames["ok"]
    assert 0 < graphs - start <= 8  # prefill, decode (and draft, verify), each for one sequence and for several
    for batch in LATER:
        assert [o.token_ids for o in llm.generate(batch, params)] == [oracle[tuple(p)] for p in batch]
    assert frames["ok"] == graphs  # nothing recompiled for new batch sizes or lengths


def test_generate_command_compiles_on_request(tiny_model_dir, capsys):
    from orthrus_engines.cli import main

    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["frames"]
    runs = []
    for flags in ([], ["--compile"]):
        start = frames["ok"]
        argv = ["generate", "Two-headed dogs", "--model", str(tiny_model_dir), "--block-size", "1",
                "--max-tokens", "6", "--ignore-eos", "--json", *flags]
        assert main(argv) == 0
        runs.append((capsys.readouterr().out, frames["ok"] - start))
    (eager, eager_graphs), (compiled, compiled_graphs) = runs
    assert eager == compiled and eager_graphs == 0 and compiled_graphs > 0
