"""Triton KV store: copy chosen new K/V rows into their cache slots (one program per row written)."""

import torch

from orthrus_kernels.triton_setup import tl, triton


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, rows_ptr, slots_ptr,
    sk_t, sk_h, sv_t, sv_h, skc_s, skc_h, svc_s, svc_h, num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    w = tl.program_id(0)
    row = tl.load(rows_ptr + w).to(tl.int64)
    slot = tl.load(slots_ptr + w).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = (h < num_kv_heads) & (d < head_dim)
    kx = tl.load(k_ptr + row * sk_t + h * sk_h + d, mask=ok)
    vx = tl.load(v_ptr + row * sv_t + h * sv_h + d, mask=ok)
    tl.store(k_cache_ptr + slot * skc_s + h * skc_h + d, kx.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + slot * svc_s + h * svc_h + d, vx.to(v_cache_ptr.dtype.element_ty), mask=ok)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             rows: torch.Tensor, slots: torch.Tensor) -> None:
    """k_cache[slots[i]] = k[rows[i]] (and v), for k, v: [T, Hkv, D] and caches [num_slots, Hkv, D],
    head_dim contiguous in all four."""
    assert rows.shape == slots.shape, (rows.shape, slots.shape)
    if slots.numel() == 0:
        return
    _, num_kv_heads, head_dim = k.shape
    _store_kv_kernel[(slots.numel(),)](
        k, v, k_cache, v_cache, rows, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
