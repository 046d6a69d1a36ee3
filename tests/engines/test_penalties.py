"""Penalties, logit_bias and min_tokens are processed alike on the AR and draft rows: greedy output under
drafting (K 1-4, both cycles, batched with other requests) equals HF transformers' generate with the same
processing (repetition_penalty, sequence_bias, min_new_tokens) and, for OpenAI's presence and frequency
penalties, a plain AR loop over the HF model; seeded output equals that loop's seeded draws."""

import json
import shutil
from collections import Counter

import pytest
import torch
from support.tiny_models import hf_greedy, hf_model

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.engine.gumbel import gumbel_noise
from orthrus_engines.engine.output_processor import OutputProcessor
from orthrus_engines.engine.penalties import Penalties, token_counts
from orthrus_engines.engine.sampler import filtered_logits
from orthrus_engines.engine.sequence import Sequence
from orthrus_engines.errors import OrthrusInputError

PROMPT = [5, 17, 3, 42, 8, 1, 77, 42, 5]
MAX = 24
SP = dict(temperature=0.8, top_k=40, top_p=0.95)
VOCAB = 96
MODEL = dict(seed=4, twin_noise=0.03, anchor_view="causal")


@pytest.fixture(scope="module")
def oracle(tiny_model):
    return hf_model(tiny_model("qwen3", **MODEL), "qwen3")


@pytest.fixture(scope="module")
def plain(oracle) -> list[int]:
    return hf_greedy(oracle, PROMPT, MAX)


@pytest.fixture(scope="module")
def eos(plain) -> int:
    """The token plain greedy decoding gives third, made the model's EOS: without min_tokens it stops there."""
    assert plain[2] not in plain[:2]
    return plain[2]


@pytest.fixture(scope="module")
def model_dir(tiny_model, eos, tmp_path_factory):
    """The shared checkpoint copied, with `eos` as its EOS."""
    path = tmp_path_factory.mktemp("penalties") / "m"
    shutil.copytree(tiny_model("qwen3", **MODEL), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    return path


def hf_generate(hf, eos: int, **kw) -> list[int]:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX, do_sample=False,
                          eos_token_id=eos, pad_token_id=0, **kw)
    return out[0, len(PROMPT):].tolist()


def reference_logits(ids: list[int], logits: torch.Tensor, sp: SamplingParams, eos: int) -> torch.Tensor:
    """vLLM's processing written token by token: min_tokens, logit_bias, repetition, frequency, presence."""
    logits, out = logits.clone(), ids[len(PROMPT):]
    if len(out) < sp.min_tokens:
        for t in set(sp.stop_token_ids) | (set() if sp.ignore_eos else {eos}):
            logits[t] = float("-inf")
    for t, b in sp.logit_bias.items():
        logits[t] += b
    r = sp.repetition_penalty
    for t in set(ids):
        logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r
    for t, c in Counter(out).items():
        logits[t] = logits[t] - sp.frequency_penalty * c - sp.presence_penalty
    return logits


def reference_decode(hf, sp: SamplingParams, eos: int) -> list[int]:
    """Plain AR over the HF model with the reference processing; greedy, or the seeded draw at each position."""
    ids = list(PROMPT)
    with torch.no_grad():
        while len(ids) - len(PROMPT) < sp.max_tokens:
            logits = reference_logits(ids, hf(torch.tensor([ids])).logits[0, -1].float(), sp, eos)
            if sp.greedy:
                t = int(logits.argmax())
            else:
                z = filtered_logits(logits[None], sp)
                t = int((z + gumbel_noise(sp.seed, torch.tensor([len(ids)]), z.shape[-1])).argmax())
            ids.append(t)
            if t in sp.stop_token_ids or (t == eos and not sp.ignore_eos):
                break
    return ids[len(PROMPT):]


@pytest.fixture(scope="module")
def cases(oracle, plain, eos) -> list[tuple[SamplingParams, list[int]]]:
    """(params, the oracle's output) for the requests batched together in every run."""
    hf_combo = dict(repetition_penalty=1.6, min_tokens=10)
    bias = {plain[0]: -5.0, 60: 3.0}
    openai = SamplingParams(max_tokens=MAX, presence_penalty=0.75, frequency_penalty=0.5, ignore_eos=True)
    seeded = SamplingParams(max_tokens=MAX, seed=77, presence_penalty=0.5, frequency_penalty=-0.25,
                            repetition_penalty=1.3, logit_bias={60: 2.0}, min_tokens=8, **SP)
    out = [
        (SamplingParams(max_tokens=MAX, logit_bias=bias, **hf_combo),
         hf_generate(oracle, eos, sequence_bias={(t,): b for t, b in bias.items()},
                     min_new_tokens=hf_combo["min_tokens"], repetition_penalty=hf_combo["repetition_penalty"])),
        (SamplingParams(max_tokens=MAX, min_tokens=6), hf_generate(oracle, eos, min_new_tokens=6)),
        (openai, reference_decode(oracle, openai, eos)),
        (seeded, reference_decode(oracle, seeded, eos)),
        (SamplingParams(max_tokens=MAX, ignore_eos=True), plain),
    ]
    assert hf_generate(oracle, eos) == plain[:3]  # EOS stops plain decoding at the third token ...
    assert len(out[1][1]) > 6 and eos not in out[1][1][:6]  # ... and min_tokens holds it back
    assert all(want != plain[: len(want)] for _, want in out[:3])  # the processing changes the output
    unprocessed = SamplingParams(max_tokens=MAX, seed=77, min_tokens=8, **SP)
    assert out[3][1] != reference_decode(oracle, unprocessed, eos)
    assert len(out[3][1]) > 8 and out[3][1][-1] == eos  # EOS ends it once min_tokens are out
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_processed_output_equals_the_oracles_for_every_block_size(model_dir, cases, fused, k):
    llm = LLM(str(model_dir), block_size=k, fused_cycle=fused, num_pages=64)
    outs = llm.generate([PROMPT] * len(cases), [params for params, _ in cases])
    for i, (out, (_, want)) in enumerate(zip(outs, cases)):
        assert out.token_ids == want, i
    if k > 1:
        assert sum(o.accepted_tokens for o in outs) > 5


def test_counts_kept_across_calls_equal_a_recount():
    """The committed output's counts are kept and extended; a block's rows and a history that does not start
    with the committed tokens get the same logits as counting from scratch."""
    committed = list(PROMPT)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.5)
    kept, logits = Penalties(params, len(PROMPT), committed), torch.randn(VOCAB)

    def fresh(history):  # a processor whose committed tokens the history does not start with: counts it all
        return Penalties(params, len(PROMPT), [-1] * len(PROMPT))(history, logits)

    for block in ([3, 3], [9], [9, 3, 50], [77]):
        for j in range(len(block) + 1):
            history = committed + block[:j]
            assert torch.equal(kept(history, logits), fresh(history))
        committed += block[:2]
    other = PROMPT[:-1] + [6, 6, 6]
    assert torch.equal(kept(other, logits), fresh(other))
    counts = token_counts(committed[len(PROMPT):], VOCAB, logits.device)
    assert counts[3] == 3 and counts[9] == 2 and counts.sum() == len(committed) - len(PROMPT)


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.01), ("presence_penalty", "1"),
    ("repetition_penalty", 0), ("repetition_penalty", float("nan")),
    ("logit_bias", {"5": 1.0}), ("logit_bias", {5: 100.5}), ("logit_bias", [5]),
    ("logit_bias", {t: 1.0 for t in range(301)}), ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 1.5)])
def test_bad_values_name_their_field(field, value):
    with pytest.raises(OrthrusInputError, match=field):
        SamplingParams(max_tokens=16, **{field: value})


def test_logit_bias_outside_the_vocabulary_is_refused(model_dir):
    llm = LLM(str(model_dir), block_size=2, num_pages=16)
    with pytest.raises(OrthrusInputError, match="logit_bias"):
        llm.generate([PROMPT], SamplingParams(logit_bias={VOCAB: 1.0}))


class _Chars:
    """A detokenizer stand-in: token t is the letter chr(ord('a') + t)."""

    def add(self, t: int) -> str:
        return chr(ord("a") + t)

    def flush(self) -> str:
        return ""


@pytest.mark.parametrize("min_tokens, committed", [(0, 2), (1, 2), (2, 5), (4, 5)])
def test_no_stop_string_ends_within_min_tokens(min_tokens, committed):
    """As vLLM: a stop string counts only once more than min_tokens tokens are generated."""
    seq = Sequence("r", PROMPT, SamplingParams(max_tokens=16, stop=["x"], min_tokens=min_tokens), 1, _Chars())
    OutputProcessor(set(), 512).commit(seq, [0, 23, 1, 2, 23, 4, 23])  # "a x b c x e x"
    assert seq.completion_tokens == committed and seq.finish_reason == "stop"
