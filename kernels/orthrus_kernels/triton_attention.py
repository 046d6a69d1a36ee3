"""Triton kernels for paged attention: the KV store and one attention kernel for every kind of pass.

The attention kernel reads the per-row ranges of `RowRanges` (row_ranges.py): row r attends to the
first `cache_len[r]` cache keys of its sequence and to the new K/V rows `[new_lo[r], new_hi[r])`, so
prefill (chunked or not), decode, verify, the diffusion block (with or without the causal anchor)
and the fused verify+draft pass are one kernel with different metadata. A program handles one tile
(consecutive rows of one sequence) and a group of query heads sharing one KV head: its M dimension
is (row, head) pairs, so decode rows of a GQA model fill the tile with heads. Scores, softmax and
the output accumulate in fp32 (online softmax); fp32 inputs multiply in IEEE fp32 (no TF32).

Without a GPU, Triton's interpreter runs the kernels on CPU tensors (see triton_setup.py).
"""

import torch

from orthrus_kernels.triton_setup import INTERPRET, tl, triton
from orthrus_kernels.triton_store import store_kv

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
MAX_BLOCK_M = 128  # (row, head) pairs per program
NEG_START = tl.constexpr(-1.0e30)  # the running max starts finite, so that fully masked blocks give no NaN


@triton.jit
def _attend(acc, m_i, l_i, q, kt, vb, visible, scale_log2, DOT_PRECISION: tl.constexpr):
    """One block of keys into the online softmax. kt: [D, N]; vb: [N, D]; visible: [M, N]."""
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, k_cache_ptr, v_cache_ptr, key_slots_ptr, rows_ptr, tiles_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, skc_s, skc_h, svc_s, svc_h, slots_b,
    scale_log2, head_dim,
    GROUP: tl.constexpr, HEADS: tl.constexpr, SPLITS: tl.constexpr, TILE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1) // SPLITS
    head0 = kv_head * GROUP + (tl.program_id(1) % SPLITS) * HEADS
    seq = tl.load(tiles_ptr + tile * 6)
    first = tl.load(tiles_ptr + tile * 6 + 1)
    end = tl.load(tiles_ptr + tile * 6 + 2)
    cache_end = tl.load(tiles_ptr + tile * 6 + 3)
    lo = tl.load(tiles_ptr + tile * 6 + 4)
    hi = tl.load(tiles_ptr + tile * 6 + 5)

    m = tl.arange(0, BLOCK_M)
    row = first + m // HEADS
    head = head0 + m % HEADS
    m_ok = (m < TILE_ROWS * HEADS) & (row < end)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + row[:, None].to(tl.int64) * sq_t + head[:, None] * sq_h + d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    cache_len = tl.load(rows_ptr + row * 3, mask=m_ok, other=0)
    new_lo = tl.load(rows_ptr + row * 3 + 1, mask=m_ok, other=0)
    new_hi = tl.load(rows_ptr + row * 3 + 2, mask=m_ok, other=0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_START, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # the cached keys, gathered slot by slot through the sequence's page table
    kc_base = k_cache_ptr + kv_head * skc_h
    vc_base = v_cache_ptr + kv_head * svc_h
    for n0 in range(0, cache_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < cache_end
        slot = tl.load(key_slots_ptr + seq.to(tl.int64) * slots_b + n, mask=n_ok, other=0).to(tl.int64)
        kt = tl.load(kc_base + slot[None, :] * skc_s + d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vb = tl.load(vc_base + slot[:, None] * svc_s + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        visible = n[None, :] < cache_len[:, None]
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, kt.to(q.dtype), vb.to(q.dtype), visible, scale_log2, DOT_PRECISION)

    # the pass's own new keys, straight from k / v
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        kt = tl.load(k_ptr + n[None, :].to(tl.int64) * sk_t + kv_head * sk_h + d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vb = tl.load(v_ptr + n[:, None].to(tl.int64) * sv_t + kv_head * sv_h + d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        visible = (n[None, :] >= new_lo[:, None]) & (n[None, :] < new_hi[:, None])
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, kt.to(q.dtype), vb.to(q.dtype), visible, scale_log2, DOT_PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + row[:, None].to(tl.int64) * so_t + head[:, None] * so_h + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _heads_per_program(group: int, tile_rows: int) -> int:
    """The largest divisor of the GQA group that keeps tile_rows x heads within MAX_BLOCK_M."""
    return max(h for h in range(1, group + 1) if group % h == 0 and (h == 1 or tile_rows * h <= MAX_BLOCK_M))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
    """`paged_attention` for metadata built with backend="triton". q: [T, Hq, D]; k, v: [T, Hkv, D]."""
    r = meta.ranges
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "the KV cache's head_dim must be contiguous"
    if meta.write_slots is not None and meta.write_slots.numel() > 0:
        store_kv(k, v, k_cache, v_cache, r.write_rows, meta.write_slots)
    T, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    heads = _heads_per_program(group, r.tile_rows)
    block_m = max(16, triton.next_power_of_2(r.tile_rows * heads))
    block_d = max(16, triton.next_power_of_2(head_dim))
    out = q.new_empty(q.shape)
    if T == 0:
        return out
    splits = group // heads
    # the interpreter multiplies bf16 as raw integers: there, bf16 products run in fp32
    interpret_bf16 = q.dtype == torch.bfloat16 and INTERPRET
    dot_dtype = tl.float32 if q.dtype == torch.float32 or interpret_bf16 else _TL_DTYPES[q.dtype]
    key_slots = meta.key_slots
    grid = (r.tiles.shape[0], num_kv_heads * splits)
    _paged_attention_kernel[grid](
        q, k, v, out, k_cache, v_cache, key_slots, r.rows, r.tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), key_slots.stride(0),
        scale * 1.4426950408889634, head_dim,  # exp2 softmax: scores in log2 units
        GROUP=group, HEADS=heads, SPLITS=splits, TILE_ROWS=r.tile_rows,
        BLOCK_M=block_m, BLOCK_N=32 if block_d > 64 else 64, BLOCK_D=block_d,
        DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        num_warps=8 if block_m * block_d >= 128 * 64 else 4,
    )
    return out
