"""orthrus_kernels.paged_attention + build_attention_metadata against a dense per-sequence
reference, on random tensors, random page tables and random cache contents.

Semantics (docs/ARCHITECTURE.md §1 and the op's docstring): sequence b has prefix_lens[b] positions in the
paged cache and q_lens[b] new tokens; every new query sees the whole cached prefix and, among the
new tokens, the earlier ones (PassKind.CAUSAL, whose new K/V go to the cache slots of positions
[prefix, prefix + q)) or all of them (PassKind.BLOCK: the cache is untouched; with a causal anchor,
the first new token sees only itself among them). The *_WRITTEN block kinds see the same keys but write
them to the slots of positions [prefix, prefix + q) first and read them back from the cache.
"""

import random

import pytest
import torch
from orthrus_kernels import PassKind, build_attention_metadata, build_verify_draft_metadata, paged_attention

HQ, HKV, D = 4, 2, 16  # grouped-query attention: 2 query heads per KV head

CASES = {
    # name: (prefix_lens, q_lens)
    "decode-uniform": ([5, 33, 16, 0], [8, 8, 8, 8]),
    "mixed-lengths": ([3, 40, 17], [2, 8, 5]),
    "one-query-each": ([7, 64, 1], [1, 1, 1]),
    "page-edges": ([16, 15, 32], [1, 2, 17]),
    "single-prefill-no-prefix": ([0], [13]),
    "batch-no-prefix": ([0, 0], [5, 9]),
    "single-with-prefix": ([21], [6]),
    "single-decode": ([40], [1]),
}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _page_tables(prefix_lens, q_lens, page_size, num_pages, rng, share_first_page=False):
    """Random, disjoint page tables (shuffled page order, some spare pages at the end)."""
    pages = list(range(num_pages))
    rng.shuffle(pages)
    tables = []
    for p, q in zip(prefix_lens, q_lens):
        n = -(-(p + q) // page_size) + rng.randrange(2)
        tables.append([pages.pop() for _ in range(n)])
    if share_first_page:  # a prefix-cache hit: sequence 1 reuses sequence 0's first (full) page
        assert prefix_lens[0] >= page_size and prefix_lens[1] >= page_size
        tables[1][0] = tables[0][0]
    return tables


def _dense_reference(q, k, v, k_cache, v_cache, prefix_lens, q_lens, tables, page_size, causal, scale,
                     causal_anchor=False):
    """Per sequence: gather the prefix position by position, attend with an explicit mask."""
    outs, start = [], 0
    for p, n, table in zip(prefix_lens, q_lens, tables):
        slots = [table[pos // page_size] * page_size + pos % page_size for pos in range(p)]
        keys = torch.cat([k_cache[slots], k[start : start + n]]).double()
        vals = torch.cat([v_cache[slots], v[start : start + n]]).double()
        qs = q[start : start + n].double()
        allowed = torch.ones(n, p + n, dtype=torch.bool)
        if causal:
            allowed[:, p:] = torch.ones(n, n, dtype=torch.bool).tril()
        elif causal_anchor:  # the first new token sees the prefix and itself only
            allowed[0, p + 1 :] = False
        rep = qs.shape[1] // keys.shape[1]
        keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals))
        start += n
    return torch.cat(outs)


def _run_case(prefix_lens, q_lens, kind, page_size, device, dtype=torch.float32, seed=0, share_first_page=False,
              every_field=False):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-(p + n) // page_size) + 1 for p, n in zip(prefix_lens, q_lens)) + 8  # some never used
    tables = _page_tables(prefix_lens, q_lens, page_size, num_pages, rng, share_first_page)
    T = sum(q_lens)
    q = torch.randn(T, HQ, D, generator=g)
    k = torch.randn(T, HKV, D, generator=g)
    v = torch.randn(T, HKV, D, generator=g)
    k_cache = torch.randn(num_pages * page_size, HKV, D, generator=g)
    v_cache = torch.randn(num_pages * page_size, HKV, D, generator=g)
    scale = D**-0.5
    q, k, v, k_cache, v_cache = (t.to(dtype) for t in (q, k, v, k_cache, v_cache))
    want = _dense_reference(q.float(), k.float(), v.float(), k_cache.float(), v_cache.float(),
                            prefix_lens, q_lens, tables, page_size, kind.causal, scale, kind.causal_anchor)
    kc0, vc0 = k_cache.clone(), v_cache.clone()

    meta = build_attention_metadata(kind, q_lens, prefix_lens, tables, page_size, torch.device(device), every_field)
    if every_field:
        assert meta.mask is not None and meta.pad_index is not None and not meta.is_causal
    kc, vc = k_cache.to(device), v_cache.to(device)
    got = paged_attention(q.to(device), k.to(device), v.to(device), kc, vc, meta, scale)
    assert got.shape == (T, HQ, D) and got.dtype == dtype
    return got.cpu(), want, (kc.cpu(), vc.cpu()), (kc0, vc0), (k, v), tables


@pytest.mark.parametrize("kind", list(PassKind), ids=lambda k: k.value)
@pytest.mark.parametrize("case", list(CASES))
def test_every_field_metadata_gives_the_same_attention(case, kind):
    """The structure a compiled model uses (mask and padding index always built, no shortcuts for one
    sequence) computes the same attention as the shortcuts."""
    prefix_lens, q_lens = CASES[case]
    got, want, *_ = _run_case(prefix_lens, q_lens, kind, 16, "cpu", every_field=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [16, 4])
@pytest.mark.parametrize("kind", list(PassKind), ids=lambda k: k.value)
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_matches_dense(case, kind, page_size, device):
    """Output equals the dense reference; the cache changes at exactly the new tokens' slots (with
    the new K/V) when writing, and not at all otherwise."""
    prefix_lens, q_lens = CASES[case]
    got, want, (kc, vc), (kc0, vc0), (k, v), tables = _run_case(
        prefix_lens, q_lens, kind, page_size, device)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    written = [t[pos // page_size] * page_size + pos % page_size
               for p, n, t in zip(prefix_lens, q_lens, tables) for pos in range(p, p + n)]
    untouched = torch.ones(kc.shape[0], dtype=torch.bool)
    if kind.write_kv:
        untouched[written] = False
        torch.testing.assert_close(kc[written], k, rtol=0, atol=0)
        torch.testing.assert_close(vc[written], v, rtol=0, atol=0)
    assert torch.equal(kc[untouched], kc0[untouched]) and torch.equal(vc[untouched], vc0[untouched])


@pytest.mark.parametrize("every_field", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_causal_anchor(case, every_field):
    """A transient bidirectional block whose first token sees only the prefix and itself (the
    draft pass of an `anchor_view: "causal"` head); the others see the whole block."""
    prefix_lens, q_lens = CASES[case]
    got, want, *_ = _run_case(prefix_lens, q_lens, PassKind.BLOCK_CAUSAL_ANCHOR, 16, "cpu", every_field=every_field)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if max(q_lens) > 1:  # it differs from the plain bidirectional block
        plain, *_ = _run_case(prefix_lens, q_lens, PassKind.BLOCK, 16, "cpu", every_field=every_field)
        assert not torch.allclose(got, plain, atol=1e-4)


@pytest.mark.parametrize("kind", list(PassKind), ids=lambda k: k.value)
def test_shared_prefix_page(kind):
    """Two sequences reading one shared (prefix-cached) page see the same cached K/V there."""
    got, want, *_ = _run_case([20, 35], [3, 6], kind, 16, "cpu", share_first_page=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_random_batches(seed):
    """Random batch sizes, prefix and query lengths, page sizes and masks."""
    rng = random.Random(100 + seed)
    B = rng.randint(1, 6)
    prefix_lens = [rng.choice([0, rng.randint(1, 70)]) for _ in range(B)]
    q_lens = [rng.randint(1, 33) for _ in range(B)]
    kind, page_size = rng.choice(list(PassKind)), rng.choice([1, 8, 16, 32])
    got, want, *_ = _run_case(prefix_lens, q_lens, kind, page_size, "cpu", seed=seed)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(PassKind), ids=lambda k: k.value)
def test_bf16(kind):
    """The bf16 path (the CUDA default dtype) stays close to the fp32 reference."""
    got, want, *_ = _run_case([5, 33, 16], [8, 1, 17], kind, 16, "cpu", dtype=torch.bfloat16)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_metadata_write_slots():
    """The metadata names the slots of the new tokens' positions, or None when transient."""
    tables = [[3, 1], [0], [2]]
    m = build_attention_metadata(PassKind.CAUSAL, [2, 1, 3], [17, 0, 2], tables, 16, torch.device("cpu"))
    assert m.write_slots.tolist() == [1 * 16 + 1, 1 * 16 + 2, 0, 2 * 16 + 2, 2 * 16 + 3, 2 * 16 + 4]
    m = build_attention_metadata(PassKind.BLOCK, [4, 4], [3, 9], [[5], [6]], 16, torch.device("cpu"))
    assert m.write_slots is None


def _verify_draft_reference(q, k, v, k_cache, v_cache, prefix_lens, verify_lens, block_lens, tables, page_size,
                            scale):
    """Dense, per sequence and per row: AR row i attends to cache positions < p and the AR rows 0..i;
    a row of block j attends to cache positions < p, the AR rows 0..j and the rows of block j."""
    outs, start = [], 0
    for p, nv, m, table in zip(prefix_lens, verify_lens, block_lens, tables):
        slots = [table[pos // page_size] * page_size + pos % page_size for pos in range(p)]
        n = nv + nv * m
        keys = torch.cat([k_cache[slots], k[start : start + n]]).double()
        vals = torch.cat([v_cache[slots], v[start : start + n]]).double()
        allowed = torch.zeros(n, p + n, dtype=torch.bool)
        allowed[:, :p] = True
        for i in range(nv):
            allowed[i, p : p + i + 1] = True
        for j in range(nv):
            rows = slice(nv + j * m, nv + (j + 1) * m)
            allowed[rows, p : p + j + 1] = True
            allowed[rows, p + nv + j * m : p + nv + (j + 1) * m] = True
        rep = q.shape[1] // keys.shape[1]
        keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q[start : start + n].double(), keys) * scale
        outs.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vals))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lens", [
    # (prefix_lens, verify_lens, block_lens)
    ([5, 33, 16], [3, 3, 3], [2, 2, 2]),
    ([0, 40, 17], [1, 4, 2], [3, 0, 5]),  # a plain AR row (m = 0) beside drafting sequences
    ([15], [8], [7]),
    ([31, 2], [1, 1], [0, 0]),
])
def test_verify_draft_pass(lens, device):
    """One pass of AR rows (causal, written) and transient diffusion blocks that each read the cache
    up to one AR row: output equals the dense reference; the cache changes at exactly the AR rows'
    slots, with their K/V."""
    prefix_lens, verify_lens, block_lens = lens
    page_size = 4
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    q_lens = [nv + nv * m for nv, m in zip(verify_lens, block_lens)]
    num_pages = sum(-(-(p + nv) // page_size) + 1 for p, nv in zip(prefix_lens, verify_lens)) + 4
    tables = _page_tables(prefix_lens, verify_lens, page_size, num_pages, rng)
    T = sum(q_lens)
    q, k, v = torch.randn(T, HQ, D, generator=g), torch.randn(T, HKV, D, generator=g), torch.randn(T, HKV, D, generator=g)
    k_cache = torch.randn(num_pages * page_size, HKV, D, generator=g)
    v_cache = torch.randn(num_pages * page_size, HKV, D, generator=g)
    want = _verify_draft_reference(q, k, v, k_cache, v_cache, prefix_lens, verify_lens, block_lens, tables,
                                   page_size, D**-0.5)
    dev = torch.device(device)
    meta = build_verify_draft_metadata(verify_lens, block_lens, prefix_lens, tables, page_size, dev)
    kc, vc = k_cache.to(dev), v_cache.to(dev)
    got = paged_attention(q.to(dev), k.to(dev), v.to(dev), kc, vc, meta, D**-0.5).cpu()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    ar_rows, written, start = [], [], 0
    for p, nv, ql, t in zip(prefix_lens, verify_lens, q_lens, tables):
        ar_rows += range(start, start + nv)
        written += [t[pos // page_size] * page_size + pos % page_size for pos in range(p, p + nv)]
        start += ql
    kc, vc = kc.cpu(), vc.cpu()
    torch.testing.assert_close(kc[written], k[ar_rows], rtol=0, atol=0)
    torch.testing.assert_close(vc[written], v[ar_rows], rtol=0, atol=0)
    untouched = torch.ones(kc.shape[0], dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(kc[untouched], k_cache[untouched]) and torch.equal(vc[untouched], v_cache[untouched])
