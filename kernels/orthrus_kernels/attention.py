"""Paged attention over a KV cache shared by both Orthrus views (torch reference).

A forward pass covers B sequences. Sequence b has `prefix_lens[b]` tokens already in the paged cache
and `q_lens[b]` new tokens in this pass. Every new query sees the whole cached prefix; among the
new tokens it sees either the earlier ones (causal: prefill, AR verify) or all of them
(bidirectional: the diffusion draft block; with `causal_anchor`, the block's first token sees only
itself among them, so that it is computed exactly as the AR view would). Whether the new K/V are
written to the cache is the caller's choice (the PassKind): the AR view writes them, the diffusion view
keeps them transient or (`PassKind.BLOCK_WRITTEN`, `BLOCK_CAUSAL_ANCHOR_WRITTEN`) writes them into the
uncommitted tail slots that the verify pass overwrites. A verify+draft pass
(`build_verify_draft_metadata`) mixes both: AR rows written and causal, then transient diffusion
blocks that each read the cache up to one of those AR rows.

Cache layout per layer: `[num_slots, num_kv_heads, head_dim]`, slot = page * page_size + offset.

Two backends compute the same op: "torch" (this file: gather + masked SDPA, any device) and "triton"
(triton_attention.py: a KV store and one attention kernel for every kind of pass, driven by per-row
ranges; compiled on CUDA, Triton's interpreter on CPU). The metadata builders choose it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orthrus_kernels.pass_kind import PassKind
from orthrus_kernels.row_ranges import RowRanges, pass_row_ranges, verify_draft_row_ranges

BACKENDS = ("torch", "triton")


@dataclass
class AttentionMetadata:
    # Sizes (B, max_q) are read from the tensors below, so that torch.compile keeps them symbolic.
    uniform_q: bool  # every sequence has the same number of new tokens (no padding of queries)
    # Keys per sequence, padded. Written pass: slots of positions [0, prefix + q) (the new K/V are
    # in the cache by then). Transient pass: slots of the cached prefix only; the new K/V follow.
    key_slots: torch.Tensor  # [B, max_keys] (padding: slot 0, masked out)
    write_slots: torch.Tensor | None  # [T] slots that receive the new K/V; None = transient
    mask: torch.Tensor | None  # [B, max_q, keys] bool; None: see is_causal
    pad_index: torch.Tensor | None  # [T] row of each new token in the padded [B * max_q] layout
    is_causal: bool = False  # no mask: plain top-left causal (True) or everything visible (False)
    # Verify+draft pass: only these rows of the new tokens are written (None: all rows, if any);
    # the others are transient keys, laid out after the gathered cache keys.
    write_rows: torch.Tensor | None = None
    backend: str = "torch"  # "triton": `ranges` drive the kernels; mask, pad_index and is_causal are unused
    ranges: RowRanges | None = None


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")


def _slots(table: list[int], n: int, page_size: int) -> torch.Tensor:
    """Cache slots of positions 0..n-1 of a sequence with this page table."""
    pos = torch.arange(n)
    return torch.tensor(table, dtype=torch.long)[pos // page_size] * page_size + pos % page_size


def build_attention_metadata(
    kind: PassKind,
    q_lens: list[int],
    prefix_lens: list[int],
    page_tables: list[list[int]],
    page_size: int,
    device: torch.device,
    every_field: bool = False,
    backend: str = "torch",
) -> AttentionMetadata:
    """Sequence b: q_lens[b] new tokens after prefix_lens[b] cached ones, its pages in page_tables[b].
    `every_field`: always build the mask and the padding index, never the shortcuts for one
    sequence or equal query lengths, so that a compiled model sees one structure per kind of pass
    (torch.compile makes a graph per structure; sizes stay symbolic).
    `backend`: "torch" or "triton" (`paged_attention` runs the one the metadata was built for)."""
    _check_backend(backend)
    causal, write_kv, causal_anchor = kind.causal, kind.write_kv, kind.causal_anchor
    B, max_q, max_p = len(q_lens), max(q_lens), max(prefix_lens)
    uniform = all(q == max_q for q in q_lens) and not every_field
    totals = [p + q for p, q in zip(prefix_lens, q_lens)]
    max_keys = max(totals) if write_kv else max_p
    key_slots = torch.zeros(B, max_keys, dtype=torch.long)
    write: list[int] = []
    for b, (p, q, table) in enumerate(zip(prefix_lens, q_lens, page_tables)):
        slots = _slots(table, p + q, page_size)
        n = p + q if write_kv else p
        key_slots[b, :n] = slots[:n]
        write.extend(slots[p:].tolist())
    write_slots = torch.tensor(write, dtype=torch.long, device=device) if write_kv else None
    if backend == "triton":
        ranges = pass_row_ranges(kind, q_lens, prefix_lens, device)
        return AttentionMetadata(False, key_slots.to(device), write_slots, None, None, backend=backend, ranges=ranges)

    pad_index = None
    if not uniform:
        pad_index = torch.cat([torch.arange(q) + b * max_q for b, q in enumerate(q_lens)]).to(device)

    # One sequence needs no mask when every key is visible to every query (one query, or a
    # bidirectional block) or when plain top-left causal alignment is right (no cached prefix).
    anchor_only = causal_anchor and not causal and max_q > 1
    single_ok = B == 1 and (max_q == 1 or not causal or max_p == 0) and not every_field and not anchor_only
    is_causal = single_ok and causal and max_q > 1  # implies max_p == 0
    mask = None
    if not single_ok:
        pl = torch.tensor(prefix_lens).view(B, 1, 1)
        ql = torch.tensor(q_lens).view(B, 1, 1)
        i = torch.arange(max_q).view(1, max_q, 1)
        if write_kv:  # keys are positions 0..p+q-1 of each sequence
            j = torch.arange(max_keys).view(1, 1, max_keys)
            mask = (j < pl + ql) & ((j <= pl + i) if causal else ((i > 0) | (j <= pl)) if anchor_only else True)
        else:  # keys are [prefix (padded to max_p) | the new block (padded to max_q)]
            j = torch.arange(max_q).view(1, 1, max_q)
            prefix_ok = torch.arange(max_p).view(1, 1, max_p) < pl
            block_ok = (j < ql) & ((j <= i) if causal else ((i > 0) | (j == 0)) if anchor_only else True)
            mask = torch.cat([prefix_ok.expand(B, max_q, max_p), block_ok.expand(B, max_q, max_q)], dim=2)
        mask = mask.expand(B, max_q, mask.shape[-1]).clone()
        mask[:, :, 0 if write_kv else max_p] = True  # padded query rows need one visible key (dropped later)
        mask = mask.to(device)
    return AttentionMetadata(uniform, key_slots.to(device), write_slots, mask, pad_index, is_causal)


def build_verify_draft_metadata(
    verify_lens: list[int],
    block_lens: list[int],
    prefix_lens: list[int],
    page_tables: list[list[int]],
    page_size: int,
    device: torch.device,
    backend: str = "torch",
) -> AttentionMetadata:
    """One pass that verifies a block and drafts the next (causal-anchor heads). Sequence b has
    v = verify_lens[b] AR rows `[anchor, drafts...]` at positions p..p+v-1 (p = prefix_lens[b]),
    causal and written to the cache, then v transient blocks of m = block_lens[b] rows: block j
    (rows v + j*m ..) sees the cache through AR row j and its own rows (bidirectional), nothing else.
    Keys: the cache slots of positions [0, p + v), then the new tokens padded to max_q."""
    _check_backend(backend)
    B = len(verify_lens)
    q_lens = [v + v * m for v, m in zip(verify_lens, block_lens)]
    max_q = max(q_lens)
    max_keys = max(p + v for p, v in zip(prefix_lens, verify_lens))
    key_slots = torch.zeros(B, max_keys, dtype=torch.long)
    mask = torch.zeros(B, max_q, max_keys + max_q, dtype=torch.bool)
    write, write_rows, row = [], [], 0
    for b, (p, v, m, table) in enumerate(zip(prefix_lens, verify_lens, block_lens, page_tables)):
        slots = _slots(table, p + v, page_size)
        key_slots[b, : p + v] = slots
        write.extend(slots[p:].tolist())
        write_rows.extend(range(row, row + v))
        row += q_lens[b]
        ar_sees = p + torch.arange(v)  # AR row i (and block i) see cache positions 0..p+i
        block_of = torch.arange(v * m) // max(m, 1)
        sees = torch.cat([ar_sees, ar_sees[block_of]])
        mask[b, : q_lens[b], :max_keys] = torch.arange(max_keys).view(1, -1) <= sees.view(-1, 1)
        blocks = mask[b, v : q_lens[b], max_keys + v : max_keys + q_lens[b]]
        blocks.copy_(block_of.view(-1, 1) == block_of.view(1, -1))
    if backend == "triton":
        return AttentionMetadata(
            uniform_q=False,
            key_slots=key_slots.to(device),
            write_slots=torch.tensor(write, dtype=torch.long, device=device),
            mask=None,
            pad_index=None,
            backend=backend,
            ranges=verify_draft_row_ranges(verify_lens, block_lens, prefix_lens, device),
        )
    mask[:, :, 0] = True  # padded query rows need one visible key (dropped later)
    pad_index = torch.cat([torch.arange(q) + b * max_q for b, q in enumerate(q_lens)]).to(device)
    return AttentionMetadata(
        uniform_q=False,
        key_slots=key_slots.to(device),
        write_slots=torch.tensor(write, dtype=torch.long, device=device),
        mask=mask.to(device),
        pad_index=pad_index,
        write_rows=torch.tensor(write_rows, dtype=torch.long, device=device),
    )


def _pad(x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[T, H, D] flat tokens -> [B, max_q, H, D]."""
    B = meta.key_slots.shape[0]
    if meta.uniform_q:
        return x.view(B, -1, *x.shape[1:])
    max_q = meta.mask.shape[1]  # padded queries imply several sequences, hence a mask
    out = x.new_zeros(B * max_q, *x.shape[1:])
    out[meta.pad_index] = x
    return out.view(B, max_q, *x.shape[1:])


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[B, L] slots -> [B, L, H, D] (index_select is much faster than advanced indexing on CPU)."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] for the new tokens. Returns [T, Hq, D]."""
    if meta.backend == "triton":
        from orthrus_kernels.triton_attention import triton_paged_attention  # imports Triton on first use

        return triton_paged_attention(q, k, v, k_cache, v_cache, meta, scale)
    qp = _pad(q, meta)
    if meta.write_rows is not None:  # verify+draft: AR rows to the cache, keys = [cache | every new row]
        k_cache.index_copy_(0, meta.write_slots, k.index_select(0, meta.write_rows))
        v_cache.index_copy_(0, meta.write_slots, v.index_select(0, meta.write_rows))
        kp = torch.cat([_gather(k_cache, meta.key_slots), _pad(k, meta)], dim=1)
        vp = torch.cat([_gather(v_cache, meta.key_slots), _pad(v, meta)], dim=1)
    elif meta.write_slots is not None:
        k_cache.index_copy_(0, meta.write_slots, k)
        v_cache.index_copy_(0, meta.write_slots, v)
        kp, vp = _gather(k_cache, meta.key_slots), _gather(v_cache, meta.key_slots)
    else:
        kp, vp = _pad(k, meta), _pad(v, meta)
        if meta.key_slots.shape[1] > 0:
            kp = torch.cat([_gather(k_cache, meta.key_slots), kp], dim=1)
            vp = torch.cat([_gather(v_cache, meta.key_slots), vp], dim=1)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),
        kp.transpose(1, 2),
        vp.transpose(1, 2),
        attn_mask=None if meta.mask is None else meta.mask.unsqueeze(1),  # broadcast over heads
        is_causal=meta.is_causal,
        scale=scale,
        enable_gqa=True,
    ).transpose(1, 2)
    out = out.reshape(-1, *out.shape[2:])
    return out if meta.uniform_q else out[meta.pad_index]
