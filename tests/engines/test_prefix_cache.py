"""Prefix cache (docs/ARCHITECTURE.md §4): full 16-token pages are shared by requests with the same prefix,
outputs do not change, and the stored / removed / cleared events name the blocks by the one shared
hash chain (orthrus_engines.prefix_hash), identical in every process."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.tiny_models import hf_greedy, hf_model, write_orthrus

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.models.heads import save_head
from orthrus_engines.prefix_hash import page_hashes

PAGE = 16
VOCAB = 96


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", seed=5, twin_noise=0.05)


@pytest.fixture(scope="module")
def oracle(model_dir):
    return hf_model(model_dir, "llama")


@pytest.fixture(scope="module")
def plain(model_dir):
    """The reference: the same engine with the prefix cache off."""
    return LLM(model=str(model_dir), block_size=4, num_pages=64, enable_prefix_cache=False)


def new_llm(model_dir, **kw) -> LLM:
    return LLM(model=str(model_dir), block_size=4, **({"num_pages": 64} | kw))


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def stored_and_removed(events) -> tuple[list[str], list[str]]:
    stored = [h for kind, hs in events if kind == "stored" for h in hs]
    removed = [h for kind, hs in events if kind == "removed" for h in hs]
    return stored, removed


GREEDY = SamplingParams(max_tokens=12)
SAMPLED = SamplingParams(max_tokens=12, temperature=1.0, seed=7)


def test_shared_prefix_is_cached_and_output_unchanged(model_dir, plain, oracle):
    """A second request sharing a 40-token prefix reuses 2 pages and decodes exactly as uncached."""
    llm = new_llm(model_dir)
    prefix = tokens(40, 1)
    first = llm.generate(prefix + [5, 6], GREEDY)[0]
    assert first.cached_prompt_tokens == 0
    second = prefix + [7, 8, 9]
    for sp in (GREEDY, SAMPLED):
        out = llm.generate(second, sp)[0]
        ref = plain.generate(second, sp)[0]
        assert out.cached_prompt_tokens == 32  # the two full pages of the shared prefix
        assert ref.cached_prompt_tokens == 0
        assert out.token_ids == ref.token_ids
    assert llm.generate(second, GREEDY)[0].token_ids == hf_greedy(oracle, second, 12)
    assert llm.core.pages.num_free == llm.core.pages.num_pages


@pytest.mark.parametrize("length,cached", [(33, 32), (32, 16), (17, 16), (16, 0)])
def test_repeated_prompt_caches_full_pages_before_the_anchor(model_dir, plain, length, cached):
    """A repeated prompt hits every full page before its last token (the anchor is never cached),
    including the case where nothing is left to prefill."""
    llm = new_llm(model_dir)
    prompt = tokens(length, 2)
    first = llm.generate(prompt, GREEDY)[0]
    again = llm.generate(prompt, GREEDY)[0]
    assert again.cached_prompt_tokens == cached
    assert again.cached_prompt_tokens % PAGE == 0
    assert again.token_ids == first.token_ids == plain.generate(prompt, GREEDY)[0].token_ids


def test_reset_prefix_cache_forgets_every_prefix(model_dir, plain):
    """`LLM.reset_prefix_cache()`: a repeated prompt prefills from scratch after it (same tokens), the
    serving layer hears `cleared`, and the cache fills again afterwards."""
    llm = new_llm(model_dir)
    prompt = tokens(40, 7)
    first = llm.generate(prompt, GREEDY)[0]
    assert llm.generate(prompt, GREEDY)[0].cached_prompt_tokens == 32
    llm.core.drain_prefix_events()
    llm.reset_prefix_cache()
    assert llm.core.drain_prefix_events() == [("cleared", [])]
    after = llm.generate(prompt, GREEDY)[0]
    assert after.cached_prompt_tokens == 0 and after.token_ids == first.token_ids
    assert llm.generate(prompt, GREEDY)[0].cached_prompt_tokens == 32
    assert llm.core.pages.num_free == llm.core.pages.num_pages


def test_generated_tokens_are_cached_for_a_follow_up(model_dir, plain):
    """Pages filled during Orthrus decoding (verify-written KV) are registered and reusable."""
    llm = new_llm(model_dir)
    prompt = tokens(20, 3)
    out = llm.generate(prompt, SamplingParams(max_tokens=40))[0]
    follow = prompt + out.token_ids + [1, 2]  # 62 tokens: 3 full pages before the anchor
    res = llm.generate(follow, GREEDY)[0]
    assert res.cached_prompt_tokens == 48
    assert res.token_ids == plain.generate(follow, GREEDY)[0].token_ids


def test_prefix_shared_with_a_running_request(model_dir, plain):
    """A request that joins while another still decodes on the same prefix pages reads them without
    disturbing either sequence."""
    llm = new_llm(model_dir)
    eng = llm.core
    prefix = tokens(36, 4)
    a, b = prefix + [1], prefix + [2, 3]
    results: dict[str, list[int]] = {"a": [], "b": []}
    cached = {}

    def step():
        for d in eng.step():
            results[d.request_id] += d.token_ids
            cached[d.request_id] = d.cached_prompt_tokens

    eng.add_request("a", a, SamplingParams(max_tokens=30))
    for _ in range(3):  # prefill + a couple of decode steps
        step()
    assert results["a"] and eng.has_unfinished()
    eng.add_request("b", b, SamplingParams(max_tokens=20))
    while eng.has_unfinished():
        step()
    assert cached["b"] == 32
    assert results["a"] == plain.generate(a, SamplingParams(max_tokens=30))[0].token_ids
    assert results["b"] == plain.generate(b, SamplingParams(max_tokens=20))[0].token_ids
    assert eng.pages.num_free == eng.pages.num_pages


def test_batch_sharing_a_prefix_matches_uncached(model_dir, plain):
    """Several requests with a common prefix in one batch decode as without the cache."""
    llm = new_llm(model_dir)
    prefix = tokens(34, 5)
    prompts = [prefix + tokens(i + 1, 50 + i) for i in range(4)]
    for _ in range(2):  # the second round hits the pages the first stored
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain.generate(prompts, GREEDY)]
    assert all(o.cached_prompt_tokens >= 32 for o in outs)


def test_stored_events_name_the_blocks_by_prefix_hash(model_dir):
    """`stored` events carry page_hashes(tokens, 16, engine.fingerprint) of the cached blocks, once."""
    llm = new_llm(model_dir)
    eng = llm.core
    assert eng.drain_prefix_events() == []
    prompt = tokens(40, 6)
    llm.generate(prompt, SamplingParams(max_tokens=3))
    events = eng.drain_prefix_events()
    assert events and all(kind == "stored" for kind, _ in events)
    assert stored_and_removed(events)[0] == page_hashes(prompt, PAGE, eng.fingerprint)  # 2 blocks
    assert eng.drain_prefix_events() == []  # drained
    longer = prompt + tokens(20, 7)  # 60 tokens: only block 2 is new
    llm.generate(longer, SamplingParams(max_tokens=3))
    stored, removed = stored_and_removed(eng.drain_prefix_events())
    assert stored == page_hashes(longer, PAGE, eng.fingerprint)[2:3]
    assert removed == []


def test_eviction_emits_removed_and_events_mirror_the_cache(model_dir):
    """With a 4-page pool, new prompts evict old blocks: `removed` names them, and replaying the
    events gives exactly the engine's cache, which predicts each later request's hit length."""
    llm = new_llm(model_dir, num_pages=4)
    eng = llm.core
    index: set[str] = set()
    removed: list[str] = []

    def replay():
        for kind, hs in eng.drain_prefix_events():
            if kind == "stored":
                assert not index & set(hs), "a block was stored twice without removal"
                index.update(hs)
            elif kind == "removed":
                assert set(hs) <= index, "removed a block that was never stored"
                index.difference_update(hs)
                removed.extend(hs)
            else:
                index.clear()

    prompts = [tokens(40, 10 + i) for i in range(3)] + [tokens(40, 10)]  # the last repeats the first
    for p in prompts:
        expected_hit = 0
        for h in page_hashes(p[:-1], PAGE, eng.fingerprint):
            if h not in index:
                break
            expected_hit += PAGE
        out = llm.generate(p, SamplingParams(max_tokens=3))[0]
        assert out.cached_prompt_tokens == expected_hit
        replay()
        assert index == set(eng.pages.hash_to_page)
        assert eng.pages.num_free == eng.pages.num_pages
    assert removed, "the tiny pool never evicted anything"


def test_cleared_event_and_cache_off(model_dir):
    """Clearing the cache emits `cleared` and forgets every block; with the cache off nothing is
    stored, reported or hit."""
    llm = new_llm(model_dir)
    prompt = tokens(40, 20)
    llm.generate(prompt, GREEDY)
    llm.core.drain_prefix_events()
    llm.core.pages.clear_prefix_cache()
    assert llm.core.drain_prefix_events() == [("cleared", [])]
    assert llm.generate(prompt, GREEDY)[0].cached_prompt_tokens == 0

    off = new_llm(model_dir, enable_prefix_cache=False)
    for _ in range(2):
        assert off.generate(prompt, GREEDY)[0].cached_prompt_tokens == 0
    assert off.core.drain_prefix_events() == []


def test_block_hash_chain_format():
    """The chain is sha256(parent hash text, little-endian int64 token ids), 32 hex characters,
    seeded with the fingerprint; only full blocks are hashed."""
    toks = list(range(40))
    seed = "f" * 32
    expected, parent = [], seed
    for b in range(2):
        h = hashlib.sha256(parent.encode() + struct.pack("<16q", *toks[b * 16 : (b + 1) * 16])).hexdigest()[:32]
        expected.append(h)
        parent = h
    assert page_hashes(toks, 16, seed) == expected
    assert page_hashes(toks, 16, seed, start=1, parent=expected[0]) == expected[1:]
    assert page_hashes(toks, 16, "0" * 32) != expected  # the seed matters
    assert page_hashes(toks[:15], 16, seed) == []


def test_fingerprint_depends_on_the_model(model_dir, tmp_path):
    """Different weights give a different fingerprint; the same model loaded twice the same one."""
    other = write_orthrus(tmp_path / "other", "llama", seed=6, twin_noise=0.05)
    assert new_llm(model_dir).core.fingerprint == new_llm(model_dir).core.fingerprint
    assert new_llm(other).core.fingerprint != new_llm(model_dir).core.fingerprint


def test_fingerprint_is_the_checkpoints_not_the_runtime_dtype(model_dir):
    """Replicas of one checkpoint in float32 and bfloat16 share prefix identity (their pages are named
    alike, so the router can send a prefix to either)."""
    fp32 = new_llm(model_dir, dtype="float32").core
    bf16 = new_llm(model_dir, dtype="bfloat16").core
    assert bf16.runner.model.embed_tokens.weight.dtype == torch.bfloat16
    assert fp32.fingerprint == bf16.fingerprint


def test_fingerprint_sees_weights_beyond_the_embedding(model_dir, tmp_path):
    """A checkpoint that differs only in one layer's weight (a fine-tune with frozen embeddings) is
    another model; a head, which never writes the K/V cache, is not."""
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    shutil.copy(model_dir / "config.json", tuned / "config.json")
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"] * 1.01
    save_file(tensors, str(tuned / "model.safetensors"))
    base = new_llm(model_dir).core
    assert new_llm(tuned).core.fingerprint != base.fingerprint
    head = tmp_path / "head.safetensors"
    save_head(base.runner.model, head, 4, VOCAB - 1, tensors={
        k: v * 1.01 for k, v in tensors.items() if "_diff." in k})
    with_head = new_llm(model_dir, head=str(head)).core
    assert not torch.equal(with_head.runner.model.layers[0].self_attn.diff.o.weight,
                           base.runner.model.layers[0].self_attn.diff.o.weight)
    assert with_head.fingerprint == base.fingerprint


@pytest.mark.slow
def test_hashes_identical_in_another_process(model_dir):
    """Fingerprint and block hashes computed in a fresh interpreter (another PYTHONHASHSEED) match."""
    llm = new_llm(model_dir)
    toks = tokens(50, 30)
    code = (
        "import json, sys\n"
        "from orthrus_engines import LLM\n"
        "from orthrus_engines.prefix_hash import page_hashes\n"
        "fp = LLM(model=sys.argv[1], num_pages=8).core.fingerprint\n"
        "print(json.dumps([fp, page_hashes(json.loads(sys.argv[2]), 16, fp)]))\n"
    )
    env = os.environ | {"PYTHONHASHSEED": "12345"}
    res = subprocess.run([sys.executable, "-c", code, str(model_dir), json.dumps(toks)], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    fp, hashes = json.loads(res.stdout.strip().splitlines()[-1])
    assert fp == llm.core.fingerprint
    assert hashes == page_hashes(toks, PAGE, llm.core.fingerprint)
    assert len(hashes) == 3
