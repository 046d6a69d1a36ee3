"""The batched, paged forward passes of the ModelRunner against dense single-sequence references
written here straight from docs/ARCHITECTURE.md §1:

- draft: the prefix [0, n-1) is cached by the AR view (causal); the block [anchor, MASK x (K-1)] at
  positions n-1 .. n+K-2 goes through the diffusion view, every block query attending to the whole
  prefix and to all K block tokens; the draft writes nothing to the cache;
- verify: a plain causal AR forward over the whole sequence; it writes the K/V of exactly the K
  block positions.

The reference reads the OrthrusModel's parameters and uses nothing else of the engine.
"""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from support.tiny_models import write_orthrus

from orthrus_engines import LLM, SamplingParams

VOCAB = 96
TOL = dict(rtol=1e-4, atol=1e-4)


# -- the dense reference ------------------------------------------------------------------------
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class DenseReference:
    """One sequence, no cache, no padding: embeddings -> layers -> final norm -> LM head."""

    def __init__(self, model, rope_theta: float):
        self.m = model
        s = model.shape
        self.s = s
        self.inv_freq = 1.0 / rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim)

    def _rope(self, x, pos):  # x [T, H, D]; rotate-half RoPE as in Llama / Qwen3
        ang = pos.float()[:, None] * self.inv_freq[None, :]
        cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
        sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def _qkv(self, view, h, pos):
        s = self.s
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        w = view.qkv.weight
        b = view.qkv.bias
        wq, wk, wv = w[:q_size], w[q_size : q_size + kv_size], w[q_size + kv_size :]
        bq, bk, bv = (None,) * 3 if b is None else (b[:q_size], b[q_size : q_size + kv_size], b[q_size + kv_size :])
        T = h.shape[0]
        q = F.linear(h, wq, bq).view(T, s.num_heads, s.head_dim)
        k = F.linear(h, wk, bk).view(T, s.num_kv_heads, s.head_dim)
        v = F.linear(h, wv, bv).view(T, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q = _rms(q, view.q_norm.weight, s.rms_norm_eps)
            k = _rms(k, view.k_norm.weight, s.rms_norm_eps)
        return self._rope(q, pos), self._rope(k, pos), v

    def _attend(self, q, k, v, allowed):  # q [Tq,Hq,D], k/v [Tk,Hkv,D], allowed [Tq,Tk] bool
        rep = self.s.num_heads // self.s.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * self.s.head_dim**-0.5
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)

    def _mlp(self, layer, x):
        h = _rms(x, layer.post_attention_layernorm.weight, self.s.rms_norm_eps)
        gate, up = F.linear(h, layer.mlp.gate_up.weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.mlp.down.weight)

    def _logits(self, x):
        return F.linear(_rms(x, self.m.norm.weight, self.s.rms_norm_eps), self.m.lm_head.weight)[:, : self.s.vocab_size]

    @torch.no_grad()
    def ar(self, ids: list[int]):
        """Causal AR forward: logits [n, V] and per-layer post-RoPE keys and values [n, Hkv, D]."""
        n = len(ids)
        pos = torch.arange(n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        x = self.m.embed_tokens.weight[torch.tensor(ids, dtype=torch.long)]
        keys, values = [], []
        for layer in self.m.layers:
            att = layer.self_attn
            q, k, v = self._qkv(att.ar, _rms(x, layer.input_layernorm.weight, self.s.rms_norm_eps), pos)
            keys.append(k)
            values.append(v)
            x = x + F.linear(self._attend(q, k, v, causal), att.ar.o.weight)
            x = x + self._mlp(layer, x)
        return self._logits(x), keys, values

    @torch.no_grad()
    def draft(self, ids: list[int], k: int, mask_id: int):
        """Diffusion-view logits [K, V] of the block [anchor, MASK x (K-1)] after `ids[:-1]`."""
        n = len(ids)
        _, pk, pv = self.ar(ids[:-1]) if n > 1 else (None, None, None)
        block = [ids[-1]] + [mask_id] * (k - 1)
        pos = torch.arange(n - 1, n - 1 + k)
        allowed = torch.ones(k, n - 1 + k, dtype=torch.bool)  # whole prefix + whole block
        x = self.m.embed_tokens.weight[torch.tensor(block, dtype=torch.long)]
        for i, layer in enumerate(self.m.layers):
            att = layer.self_attn
            q, kb, vb = self._qkv(att.diff, _rms(x, layer.input_layernorm.weight, self.s.rms_norm_eps), pos)
            keys = kb if pk is None else torch.cat([pk[i], kb])
            vals = vb if pv is None else torch.cat([pv[i], vb])
            x = x + F.linear(self._attend(q, keys, vals, allowed), att.diff.o.weight)
            x = x + self._mlp(layer, x)
        return self._logits(x)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def ckpt(request, tmp_path_factory):
    return write_orthrus(tmp_path_factory.mktemp("views") / request.param, request.param)


def _rope_theta(path) -> float:
    raw = json.loads((path / "config.json").read_text())
    return float(raw.get("rope_theta") or raw["rope_parameters"]["rope_theta"])


def _prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB - 1) for _ in range(n)] for n in lengths]


def _engine(path, **kw):
    """An engine whose KV cache starts as seeded noise, so stale or unwritten slots are visible."""
    llm = LLM(str(path), block_size=8, num_pages=64, **kw)
    g = torch.Generator().manual_seed(123)
    for kc, vc in llm.core.runner.kv_cache:
        kc.copy_(torch.randn(kc.shape, generator=g))
        vc.copy_(torch.randn(vc.shape, generator=g))
    return llm.core


def _past_prefill(engine, prompts, decode_steps=0):
    """Add requests and step until every one is running and past prefill (plus `decode_steps`)."""
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    seqs = [engine.add_request(f"v{i}", p, params) for i, p in enumerate(prompts)]
    for _ in range(100):
        if all(s in engine.scheduler.running and not s.in_prefill for s in seqs):
            break
        engine.step()
    else:
        pytest.fail("requests never got past prefill")
    for _ in range(decode_steps):
        engine.step()
    assert all(engine.seqs.get(s.request_id) is s and not s.in_prefill for s in seqs)
    assert all(s.num_cached == len(s.token_ids) - 1 for s in seqs), "anchor invariant"
    return seqs


def _slot(seq, pos, page_size):
    return seq.page_table[pos // page_size] * page_size + pos % page_size


def _snapshot(engine):
    return [(k.clone(), v.clone()) for k, v in engine.runner.kv_cache]


def _changed_slots(before, after) -> set[int]:
    out = set()
    for (k0, v0), (k1, v1) in zip(before, after):
        diff = (k0 != k1).flatten(1).any(1) | (v0 != v1).flatten(1).any(1)
        out |= set(diff.nonzero().flatten().tolist())
    return out


CASES = {
    # name: prompt lengths, draft lengths K per sequence
    "uniform-K": ([3, 17, 40], [8, 8, 8]),
    "mixed-K": ([3, 17, 40], [2, 8, 5]),
    "with-1-token-prompt": ([1, 17, 40, 16], [4, 8, 2, 32]),
    "single-1-token-prompt": ([1], [6]),
    "single-long": ([40], [32]),
}


# -- draft ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("decode_steps", [0, 3], ids=["after-prefill", "after-3-steps"])
@pytest.mark.parametrize("case", list(CASES))
def test_draft_matches_dense_reference(ckpt, case, decode_steps):
    """Draft logits of every sequence of a batched, paged, padded pass equal the dense diffusion-view
    reference, and the draft writes nothing where any sequence holds valid K/V."""
    lengths, ks = CASES[case]
    engine = _engine(ckpt)
    ref = DenseReference(engine.runner.model, _rope_theta(ckpt))
    seqs = _past_prefill(engine, _prompts(lengths), decode_steps)
    P = engine.page_size
    for s, k in zip(seqs, ks):
        assert engine.pages.ensure(s, s.num_cached + k)
    before = _snapshot(engine)
    logits = engine.runner.draft(seqs, ks)
    assert logits.shape == (sum(k - 1 for k in ks), VOCAB)

    row = 0
    for s, k in zip(seqs, ks):
        want = ref.draft(s.token_ids, k, engine.runner.mask_token_id)[: k - 1]
        torch.testing.assert_close(logits[row : row + k - 1], want, **TOL,
                                   msg=lambda m: f"seq of {len(s.token_ids)} tokens, K={k}: {m}")
        row += k - 1

    changed = _changed_slots(before, _snapshot(engine))
    valid = {_slot(s, p, P) for s in seqs for p in range(s.num_cached)}
    lookahead = {_slot(s, p, P) for s, k in zip(seqs, ks) for p in range(s.num_cached, s.num_cached + k)}
    assert not changed & valid, "the draft pass overwrote valid cached K/V"
    assert changed <= lookahead, "the draft pass wrote outside the sequences' look-ahead slots"


def test_draft_block_is_bidirectional_and_reads_the_prefix(ckpt):
    """Sanity of the reference itself against the engine: with a causal block mask or without the
    prefix the reference would disagree with the engine (so the comparison above can fail)."""
    engine = _engine(ckpt)
    ref = DenseReference(engine.runner.model, _rope_theta(ckpt))
    (s,) = _past_prefill(engine, _prompts([20]))
    k = 8
    assert engine.pages.ensure(s, s.num_cached + k)
    got = engine.runner.draft([s], [k])
    mask_id = engine.runner.mask_token_id
    torch.testing.assert_close(got, ref.draft(s.token_ids, k, mask_id)[: k - 1], **TOL)
    no_prefix = ref.draft(s.token_ids[-1:], k, mask_id)[: k - 1]  # same tokens, prefix dropped (positions shift)
    assert not torch.allclose(got, no_prefix, **TOL)
    # A causal block: slot 0 would then see only the prefix and the anchor, i.e. the AR-shaped
    # context through the diffusion view; the engine's slot 0 must differ from that.
    causal_ref = _causal_block_draft(ref, s.token_ids, k, mask_id)
    assert not torch.allclose(got[0], causal_ref[0], **TOL)


def _causal_block_draft(ref, ids, k, mask_id):
    """The same as DenseReference.draft but with a causal mask inside the block (a wrong draft)."""
    n = len(ids)
    _, pk, pv = ref.ar(ids[:-1])
    block = [ids[-1]] + [mask_id] * (k - 1)
    pos = torch.arange(n - 1, n - 1 + k)
    allowed = torch.ones(k, n - 1 + k, dtype=torch.bool)
    allowed[:, n - 1 :] = torch.ones(k, k, dtype=torch.bool).tril()
    x = ref.m.embed_tokens.weight[torch.tensor(block)]
    with torch.no_grad():
        for i, layer in enumerate(ref.m.layers):
            att = layer.self_attn
            q, kb, vb = ref._qkv(att.diff, _rms(x, layer.input_layernorm.weight, ref.s.rms_norm_eps), pos)
            o = ref._attend(q, torch.cat([pk[i], kb]), torch.cat([pv[i], vb]), allowed)
            x = x + F.linear(o, att.diff.o.weight)
            x = x + ref._mlp(layer, x)
        return ref._logits(x)


# -- verify ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("decode_steps", [0, 3], ids=["after-prefill", "after-3-steps"])
@pytest.mark.parametrize("case", list(CASES))
def test_verify_matches_causal_forward(ckpt, case, decode_steps):
    """Verify logits of `[anchor, drafts...]` equal a plain causal AR forward over the whole
    sequence; the cache then holds the reference K/V of every position up to the block's end, and
    nothing but the block's K positions was written."""
    lengths, ks = CASES[case]
    engine = _engine(ckpt)
    ref = DenseReference(engine.runner.model, _rope_theta(ckpt))
    seqs = _past_prefill(engine, _prompts(lengths), decode_steps)
    P = engine.page_size
    rng = random.Random(5)
    blocks = [[s.token_ids[-1]] + [rng.randrange(VOCAB - 1) for _ in range(k - 1)] for s, k in zip(seqs, ks)]
    for s, k in zip(seqs, ks):
        assert engine.pages.ensure(s, s.num_cached + k)
    before = _snapshot(engine)
    logits = engine.runner.verify(seqs, blocks)
    assert logits.shape == (sum(ks), VOCAB)

    row = 0
    for s, k, block in zip(seqs, ks, blocks):
        full = s.token_ids + block[1:]
        want, keys, values = ref.ar(full)
        n = len(s.token_ids)
        torch.testing.assert_close(logits[row : row + k], want[n - 1 : n - 1 + k], **TOL,
                                   msg=lambda m: f"seq of {n} tokens, K={k}: {m}")
        row += k
        # Every cached position (prefill, earlier verifies, this block) holds the reference K/V.
        slots = torch.tensor([_slot(s, p, P) for p in range(len(full))])
        for layer, (kc, vc) in enumerate(engine.runner.kv_cache):
            torch.testing.assert_close(kc[slots], keys[layer], **TOL, msg=lambda m: f"K cache, layer {layer}: {m}")
            torch.testing.assert_close(vc[slots], values[layer], **TOL, msg=lambda m: f"V cache, layer {layer}: {m}")

    changed = _changed_slots(before, _snapshot(engine))
    block_slots = {_slot(s, p, P) for s, k in zip(seqs, ks) for p in range(s.num_cached, s.num_cached + k)}
    assert changed == block_slots, (
        f"verify wrote {len(changed - block_slots)} slots outside the blocks and missed {len(block_slots - changed)}")


@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_prefill_caches_reference_kv(ckpt, chunk):
    """Prefill in chunks of `chunk` tokens (across page edges) caches the same K/V as one causal
    forward, and the next draft and verify agree with the references."""
    engine = _engine(ckpt, max_num_batched_tokens=chunk)
    ref = DenseReference(engine.runner.model, _rope_theta(ckpt))
    seqs = _past_prefill(engine, _prompts([40, 23], seed=1))
    P = engine.page_size
    for s in seqs:
        _, keys, values = ref.ar(s.token_ids[:-1])
        slots = torch.tensor([_slot(s, p, P) for p in range(s.num_cached)])
        for layer, (kc, vc) in enumerate(engine.runner.kv_cache):
            torch.testing.assert_close(kc[slots], keys[layer], **TOL)
            torch.testing.assert_close(vc[slots], values[layer], **TOL)
    ks = [6, 3]
    for s, k in zip(seqs, ks):
        assert engine.pages.ensure(s, s.num_cached + k)
    logits = engine.runner.draft(seqs, ks)
    torch.testing.assert_close(logits[:5], ref.draft(seqs[0].token_ids, 6, engine.runner.mask_token_id)[:5], **TOL)
    torch.testing.assert_close(logits[5:], ref.draft(seqs[1].token_ids, 3, engine.runner.mask_token_id)[:2], **TOL)
