"""Per-row attention ranges: the metadata of the Triton backend (host side only, no Triton import).

Every kind of pass reduces to one rule per new query row r: it sees the first `cache_len[r]` keys of
its sequence's cache (`key_slots[seq]`) and the pass's own new K/V rows `[new_lo[r], new_hi[r])`
(flat row indexes). The KV store runs first, so a row may read rows written by the same pass from the
cache (the verify+draft blocks read the AR rows that way). The attention kernel walks tiles: up to
`tile_rows` consecutive rows of one sequence.
"""

from dataclasses import dataclass

import torch

from orthrus_kernels.pass_kind import PassKind

MAX_TILE_ROWS = 16


@dataclass
class RowRanges:
    rows: torch.Tensor  # [T, 3] int32: cache_len, new_lo, new_hi of each new query row
    # [num_tiles, 6] int32: sequence, first row, end row (exclusive), and over the tile's rows: the most
    # cache keys, the lowest new_lo and the highest new_hi (the key loops' bounds)
    tiles: torch.Tensor
    tile_rows: int  # the most rows in a tile (a power of 2)
    write_rows: torch.Tensor  # [W] int32: the new rows whose K/V go to `write_slots` (in order)


def _tiles(q_lens: list[int], tile_rows: int, rows: torch.Tensor) -> torch.Tensor:
    tiles, start = [], 0
    for b, q in enumerate(q_lens):
        for s in range(start, start + q, tile_rows):
            t = rows[s : min(s + tile_rows, start + q)]
            tiles.append([b, s, s + len(t), t[:, 0].max(), t[:, 1].min(), t[:, 2].max()])
        start += q
    return torch.tensor(tiles, dtype=torch.int32).view(-1, 6)


def build_row_ranges(
    q_lens: list[int],
    cache_lens: list[torch.Tensor],
    new_lo: list[torch.Tensor],
    new_hi: list[torch.Tensor],
    write_rows: list[int],
    device: torch.device,
) -> RowRanges:
    """Per sequence: the cache length and new-key range of each of its rows, relative to the sequence's
    first row; `write_rows` are flat."""
    starts = torch.tensor([0] + q_lens[:-1]).cumsum(0).tolist()
    rows = torch.stack([torch.cat(cache_lens),
                        torch.cat([lo + s for lo, s in zip(new_lo, starts)]),
                        torch.cat([hi + s for hi, s in zip(new_hi, starts)])], dim=1)
    tile_rows = min(MAX_TILE_ROWS, 1 << (max(q_lens) - 1).bit_length())
    return RowRanges(
        rows=rows.to(torch.int32).to(device),
        tiles=_tiles(q_lens, tile_rows, rows).to(device),
        tile_rows=tile_rows,
        write_rows=torch.tensor(write_rows, dtype=torch.int32).to(device),
    )


def pass_row_ranges(kind: PassKind, q_lens: list[int], prefix_lens: list[int], device: torch.device) -> RowRanges:
    """A prefill / decode / verify / draft pass: every row sees the cached prefix; among the new rows,
    the earlier ones and itself (causal), or all of them, or (causal anchor) the first row only itself.
    A written draft block reads its own rows from the cache (stored first), so its new-key ranges are empty."""
    cache, lo, hi = [], [], []
    from_cache = kind.write_kv and not kind.causal
    for p, q in zip(prefix_lens, q_lens):
        i = torch.arange(q)
        end = i + 1 if kind.causal else torch.full((q,), q)
        if kind.causal_anchor:
            end[0] = 1
        cache.append(p + end if from_cache else torch.full((q,), p))
        lo.append(torch.zeros(q, dtype=torch.long))
        hi.append(torch.zeros(q, dtype=torch.long) if from_cache else end)
    return build_row_ranges(q_lens, cache, lo, hi, list(range(sum(q_lens))) if kind.write_kv else [], device)


def verify_draft_row_ranges(verify_lens: list[int], block_lens: list[int], prefix_lens: list[int],
                            device: torch.device) -> RowRanges:
    """`build_verify_draft_metadata`'s pass: AR row i sees the cache prefix and AR rows 0..i; a row of
    block j sees the cache through AR row j (written by then) and its own block."""
    q_lens = [v + v * m for v, m in zip(verify_lens, block_lens)]
    cache, lo, hi, write, start = [], [], [], [], 0
    for p, v, m, q in zip(prefix_lens, verify_lens, block_lens, q_lens):
        block_of = torch.arange(v * m) // max(m, 1)
        cache.append(torch.cat([torch.full((v,), p), p + block_of + 1]))
        lo.append(torch.cat([torch.zeros(v, dtype=torch.long), v + block_of * m]))
        hi.append(torch.cat([torch.arange(v) + 1, v + (block_of + 1) * m]))
        write += range(start, start + v)
        start += q
    return build_row_ranges(q_lens, cache, lo, hi, write, device)
