"""The Triton backend of paged_attention against the torch reference (itself tested against a dense
attention in test_attention.py), for every kind of pass, on random tensors, shuffled page tables and
random cache contents. Without a GPU the kernels run under Triton's interpreter (conftest.py), so the
shapes stay small; on CUDA the same tests run compiled.
"""

import random
import subprocess
import sys

import pytest
import torch
from orthrus_kernels import PassKind, build_attention_metadata, build_verify_draft_metadata, paged_attention

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

KINDS = {  # prefill, decode and verify are all "causal-write" passes
    "causal-write": PassKind.CAUSAL,
    "draft": PassKind.BLOCK,
    "draft-anchor": PassKind.BLOCK_CAUSAL_ANCHOR,
    "draft-written": PassKind.BLOCK_WRITTEN,  # draft_kv="tail": the block's K/V in the tail slots
    "draft-anchor-written": PassKind.BLOCK_CAUSAL_ANCHOR_WRITTEN,
}

CASES = {
    # name: (prefix_lens, q_lens)
    "prefill-no-prefix": ([0, 0], [5, 19]),  # 19 rows: two tiles of one sequence
    "chunked-prefill": ([9, 70], [7, 18]),  # 70 cached keys: several key blocks
    "decode": ([5, 33, 1, 16], [1, 1, 1, 1]),
    "verify": ([4, 15, 0], [4, 4, 4]),
    "ragged": ([3, 40, 17], [2, 8, 5]),
}


def _page_tables(lens: list[int], page_size: int, rng: random.Random) -> tuple[list[list[int]], int]:
    """Disjoint tables over shuffled pages (never contiguous in order), with spare pages nobody owns."""
    num_pages = sum(-(-n // page_size) + 1 for n in lens) + 4
    pages = list(range(num_pages))
    rng.shuffle(pages)
    return [[pages.pop() for _ in range(-(-n // page_size) + rng.randrange(2))] for n in lens], num_pages


def _tensors(T: int, num_slots: int, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (hq, hkv, hkv))
    k_cache, v_cache = (torch.randn(num_slots, hkv, d, generator=g) for _ in range(2))
    return [t.to(dtype).to(DEVICE) for t in (q, k, v, k_cache, v_cache)]


def _both_backends(build, q, k, v, k_cache, v_cache, scale):
    """(torch output, torch caches), (triton output, triton caches), each backend on its own cache copy."""
    results = []
    for backend in ("torch", "triton"):
        kc, vc = k_cache.clone(), v_cache.clone()
        meta = build(backend)
        assert meta.backend == backend
        out = paged_attention(q, k, v, kc, vc, meta, scale)
        results.append((out.float().cpu(), kc.cpu(), vc.cpu()))
    return results


def _check(prefix_lens, q_lens, kind, hq=4, hkv=2, d=16, page_size=4, dtype=torch.float32, tol=1e-5, seed=0):
    kind = KINDS[kind]
    tables, num_pages = _page_tables([p + n for p, n in zip(prefix_lens, q_lens)], page_size, random.Random(seed))
    q, k, v, k_cache, v_cache = _tensors(sum(q_lens), num_pages * page_size, hq, hkv, d, dtype, seed)

    def build(backend):
        return build_attention_metadata(kind, q_lens, prefix_lens, tables, page_size, DEVICE, backend=backend)

    (want, kc_want, vc_want), (got, kc, vc) = _both_backends(build, q, k, v, k_cache, v_cache, d**-0.5)
    assert got.shape == (sum(q_lens), hq, d)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(kc, kc_want) and torch.equal(vc, vc_want)  # the same slots written, the same values
    written = [t[pos // page_size] * page_size + pos % page_size
               for p, n, t in zip(prefix_lens, q_lens, tables) for pos in range(p, p + n)] if kind.write_kv else []
    untouched = torch.ones(kc.shape[0], dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(kc[untouched], k_cache.cpu()[untouched]) and torch.equal(vc[untouched], v_cache.cpu()[untouched])
    if kind.write_kv:
        assert torch.equal(kc[written], k.cpu()) and torch.equal(vc[written], v.cpu())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", list(CASES))
def test_every_pass_kind_matches_torch(case, kind):
    """Prefill (with and without a cached prefix), decode, verify, the diffusion block (plain and with
    the causal anchor), on ragged batches crossing page boundaries."""
    _check(*CASES[case], kind)


@pytest.mark.parametrize("heads", [(4, 4, 64), (6, 2, 128), (8, 1, 64), (16, 1, 32), (4, 2, 24)],
                         ids=["mha-d64", "gqa3-d128", "gqa8-d64", "gqa16-d32", "gqa2-d24-padded"])
@pytest.mark.parametrize("kind", ["causal-write", "draft-anchor"])
@pytest.mark.parametrize("case", ["chunked-prefill", "decode"])
def test_gqa_and_head_dims(heads, kind, case):
    """Query heads per KV head 1, 2, 3 (not a power of 2), 8 and 16 (split over two programs); head_dim
    24 (padded to 32), 32, 64 and 128."""
    hq, hkv, d = heads
    _check(*CASES[case], kind, hq=hq, hkv=hkv, d=d, page_size=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["causal-write", "draft"])
def test_half_precision(dtype, kind):
    """bf16 / fp16 inputs (fp32 accumulation) stay close to the torch reference in the same dtype."""
    _check(*CASES["ragged"], kind, hq=4, hkv=2, d=64, dtype=dtype, tol=2e-2)


@pytest.mark.parametrize("lens", [
    # (prefix_lens, verify_lens, block_lens)
    ([5, 33, 16], [3, 3, 3], [2, 2, 2]),
    ([0, 40, 17], [1, 4, 2], [3, 0, 5]),  # a plain AR row (m = 0) beside drafting sequences
    ([15], [8], [7]),  # 64 rows: four tiles
    ([31, 2], [1, 1], [0, 0]),
])
@pytest.mark.parametrize("heads", [(4, 2, 16), (6, 2, 64)], ids=["gqa2-d16", "gqa3-d64"])
def test_verify_draft_pass_matches_torch(lens, heads):
    """The fused verify+draft pass: AR rows causal and written, then per verify slot a transient block
    that reads the cache through that slot (the AR rows the same pass wrote) and itself."""
    prefix_lens, verify_lens, block_lens = lens
    hq, hkv, d = heads
    page_size = 4
    tables, num_pages = _page_tables([p + n for p, n in zip(prefix_lens, verify_lens)], page_size, random.Random(1))
    T = sum(nv + nv * m for nv, m in zip(verify_lens, block_lens))
    q, k, v, k_cache, v_cache = _tensors(T, num_pages * page_size, hq, hkv, d, torch.float32, 1)

    def build(backend):
        return build_verify_draft_metadata(verify_lens, block_lens, prefix_lens, tables, page_size, DEVICE, backend)

    (want, kc_want, vc_want), (got, kc, vc) = _both_backends(build, q, k, v, k_cache, v_cache, d**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(kc, kc_want) and torch.equal(vc, vc_want)
    assert not torch.equal(kc, k_cache.cpu())  # the AR rows were written


def test_strided_inputs():
    """q, k, v as the model makes them: views into one fused projection (rows not contiguous)."""
    prefix_lens, q_lens, page_size, hq, hkv, d = [6, 20], [3, 9], 8, 4, 2, 32
    tables, num_pages = _page_tables([p + n for p, n in zip(prefix_lens, q_lens)], page_size, random.Random(2))
    T = sum(q_lens)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    q, k, v = (x.view(T, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], dim=1))
    assert not q.is_contiguous() and not k.is_contiguous()
    _, _, _, k_cache, v_cache = _tensors(1, num_pages * page_size, hq, hkv, d, torch.float32, 2)

    def build(backend):
        return build_attention_metadata(PassKind.CAUSAL, q_lens, prefix_lens, tables, page_size, DEVICE,
                                        backend=backend)

    (want, kc_want, vc_want), (got, kc, vc) = _both_backends(build, q, k, v, k_cache, v_cache, d**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(kc, kc_want) and torch.equal(vc, vc_want)


def test_store_kv_writes_exactly_its_slots():
    """The KV store copies row rows[i] of k / v to slot slots[i] and touches no other slot."""
    from orthrus_kernels.triton_store import store_kv

    _, k, v, k_cache, v_cache = _tensors(6, 40, 1, 3, 16, torch.float32, 3)
    rows = torch.tensor([4, 0, 5], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([39, 7, 8], dtype=torch.long, device=DEVICE)
    kc, vc = k_cache.clone(), v_cache.clone()
    store_kv(k, v, kc, vc, rows, slots)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k[slots.long()], want_v[slots.long()] = k[rows.long()], v[rows.long()]
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="attention backend"):
        build_attention_metadata(PassKind.CAUSAL, [1], [0], [[0]], 4, DEVICE, backend="cuda")
    with pytest.raises(ValueError, match="attention backend"):
        build_verify_draft_metadata([1], [1], [0], [[0]], 4, DEVICE, backend="flash")


def test_importing_the_kernels_package_does_not_import_triton():
    """The torch backend (the CPU default) never pays for importing Triton."""
    code = ("import sys, torch; from orthrus_kernels import PassKind, build_attention_metadata, paged_attention; "
            "m = build_attention_metadata(PassKind.CAUSAL, [2], [0], [[0]], 4, torch.device('cpu')); "
            "paged_attention(*[torch.zeros(2, 1, 16)] * 3, torch.zeros(4, 1, 16), torch.zeros(4, 1, 16), m, 1.0); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=None)
