"""Forward passes: the engine never takes more than the official `OrthrusLM.generate` for the same
greedy request (official-format checkpoint, so draft + verify cycles). The official count is
recomputed here from the official loop's arithmetic: one pass over the prompt gives the first token;
then each cycle drafts a block of min(K, max_length - start) slots after the anchor at `start` (a
diffusion pass) and verifies it (an AR pass), accepting the drafts up to the first one the AR
disagrees with and adding the AR's next token, cut at max_length."""

import pytest
from single_pass import prefill_to_anchor
from support.tiny_models import hf_greedy, hf_model, write_orthrus

from orthrus_engines import LLM, SamplingParams

VOCAB = 16  # a small vocabulary: drafts are accepted now and then


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = write_orthrus(tmp_path_factory.mktemp("official") / "q", "qwen3", seed=9, twin_noise=0.02,
                         vocab_size=VOCAB)
    return path, hf_model(path, "qwen3"), LLM(str(path), block_size=8, page_size=4, num_pages=64).core


def engine_drafter(eng):
    """The official diffusion pass's drafts for the block [context[-1], MASK x (slots - 1)], by the
    engine's draft pass (tied to the official diffusion view in test_checkpoints / test_views)."""

    def drafts(context: list[int], slots: int) -> list[int]:
        seq = eng.add_request("probe", context, SamplingParams(max_tokens=1))
        prefill_to_anchor(eng, [seq], slots)
        try:
            return eng.runner.draft([seq], [slots]).argmax(-1).tolist()
        finally:
            eng.abort_request("probe")

    return drafts


def official_passes(drafter, prompt: list[int], greedy: list[int], k: int) -> int:
    """Forward passes of the official generate loop for `prompt` and max_new_tokens = len(greedy),
    whose greedy tokens (the AR's, so the verify pass's argmax) are `greedy`."""
    ids, max_length = prompt + greedy, len(prompt) + len(greedy)
    start, passes = len(prompt), 1  # the first pass gives the token at `start`, the first anchor
    while start < max_length - 1:
        slots = min(k, max_length - start)
        drafts = drafter(ids[: start + 1], slots)
        accepted = next((i for i, d in enumerate(drafts) if d != ids[start + 1 + i]), len(drafts))
        passes += 2
        start += accepted + 1
    return passes


CASES = [  # (prompt length, max_tokens, K)
    (9, 48, 8), (1, 20, 8), (17, 13, 8), (5, 2, 8), (5, 1, 8), (30, 9, 4), (12, 25, 3), (3, 16, 2),
]


@pytest.mark.parametrize("n, max_tokens, k", CASES)
def test_no_more_passes_than_the_official_generate(official, n, max_tokens, k):
    path, hf, probe = official
    prompt = [(7 * i + n) % (VOCAB - 1) for i in range(n)]
    want = hf_greedy(hf, prompt, max_tokens)
    out = LLM(str(path), block_size=k, page_size=4, num_pages=64).generate(
        [prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0]
    assert list(out.token_ids) == want and out.finish_reason == "length"
    assert out.forward_passes <= official_passes(engine_drafter(probe), prompt, want, k)


def test_reference_counts_like_the_official_loop():
    """The reference's own arithmetic: with every draft rejected each cycle commits one token
    (1 + 2 (N - 1) passes); with every draft accepted a cycle commits K tokens, the last block cut
    at max_length (10 tokens, K = 4: the first pass, then blocks committing 4, 4 and 1 + 1)."""
    greedy = list(range(10))
    assert official_passes(lambda ctx, slots: [-1] * (slots - 1), [7], greedy, 4) == 1 + 2 * 9
    assert official_passes(lambda ctx, slots: greedy[len(ctx) - 1 :][: slots - 1], [7], greedy, 4) == 1 + 2 * 3
