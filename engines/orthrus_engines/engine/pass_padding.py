"""Static shapes for CUDA graphs: a pass padded to a batch bucket, with one row count per sequence.

On the Triton backend a pass is flat rows plus per-row attention ranges (orthrus_kernels.row_ranges),
so padding is a relayout: sequence b's rows move to rows b*Q .. b*Q + q_b - 1 (Q: the most rows of any
sequence), and the batch grows to a bucket with dummy sequences of Q pad rows. A pad row sees no key
(its output is zero) and no real row sees it; the padded K/V store entries write a scratch slot that
no page holds. A real row keeps its keys, its key blocks and its tile's bounds, so its attention is
computed exactly as without padding (pad rows take the key range of their sequence's last real row).
All host side: the builders run on the CPU, the padded tensors then go to the device.
"""

from dataclasses import dataclass

import torch
from orthrus_kernels import AttentionMetadata
from orthrus_kernels.row_ranges import MAX_TILE_ROWS, RowRanges


def batch_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes graphs are captured for (as nano-vllm: 1, 2, 4, 8, then every 16)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


def choose_bucket(buckets: list[int], batch: int) -> int | None:
    """The smallest bucket that holds `batch` sequences; None above the largest (the pass runs eagerly)."""
    return next((b for b in buckets if b >= batch), None)


@dataclass
class PassInputs:
    """One pass as the runner builds it, unpadded; `meta` was built on the CPU for the Triton backend."""

    ids: list[int]
    positions: torch.Tensor  # [T] CPU
    meta: AttentionMetadata
    q_lens: list[int]  # rows per sequence, in order
    diffusion: bool
    ar_rows: list[int] | None = None  # rows of a diffusion pass that use the AR projections


@dataclass(frozen=True)
class PassShape:
    """Everything a captured graph fixes: one graph per shape."""

    batch: int  # sequences (a bucket)
    rows_per_seq: int  # Q
    diffusion: bool
    ar_per_seq: int  # AR-projected rows per sequence (0: none)
    writes: bool  # the pass stores K/V (batch * Q store entries, the padding to the scratch slot)

    @property
    def rows(self) -> int:
        return self.batch * self.rows_per_seq

    @property
    def tile_rows(self) -> int:
        return min(MAX_TILE_ROWS, 1 << (self.rows_per_seq - 1).bit_length())

    @property
    def tiles(self) -> int:
        return self.batch * -(-self.rows_per_seq // self.tile_rows)


@dataclass
class PaddedPass:
    shape: PassShape
    ids: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    ar_rows: torch.Tensor | None  # [batch * ar_per_seq] long
    key_slots: torch.Tensor  # [B, keys] long: the real sequences' only (dummy rows read no key)
    write_rows: torch.Tensor | None  # [N] int32
    write_slots: torch.Tensor | None  # [N] long
    rows: torch.Tensor  # [N, 3] int32
    tiles: torch.Tensor  # [shape.tiles, 6] int32
    gather: torch.Tensor  # [T] long: the padded row of each real row

    def metadata(self) -> AttentionMetadata:
        ranges = RowRanges(self.rows, self.tiles, self.shape.tile_rows, self.write_rows)
        return AttentionMetadata(False, self.key_slots, self.write_slots, None, None, backend="triton", ranges=ranges)


def pass_shape(p: PassInputs, batch: int) -> PassShape:
    ar = 0
    if p.ar_rows is not None:
        seq_of_row = torch.repeat_interleave(torch.arange(len(p.q_lens)), torch.tensor(p.q_lens))
        ar = int(torch.bincount(seq_of_row[p.ar_rows], minlength=len(p.q_lens)).max())
    return PassShape(batch, max(p.q_lens), p.diffusion, ar, p.meta.write_slots is not None)


def pad_pass(p: PassInputs, shape: PassShape, scratch_slot: int) -> PaddedPass | None:
    """`p` laid out as `shape`; None if it does not fit (no pad row to take an AR-row entry)."""
    B, Q, N = len(p.q_lens), shape.rows_per_seq, shape.rows
    q_lens = torch.tensor(p.q_lens)
    starts = torch.cumsum(q_lens, 0) - q_lens
    seq_of_row = torch.repeat_interleave(torch.arange(B), q_lens)
    gather = torch.arange(len(p.ids)) - starts[seq_of_row] + seq_of_row * Q
    is_pad = torch.ones(N, dtype=torch.bool)
    is_pad[gather] = False
    pad_rows = is_pad.nonzero().flatten()

    ids = torch.zeros(N, dtype=torch.long)
    ids[gather] = torch.tensor(p.ids, dtype=torch.long)
    positions = torch.zeros(N, dtype=torch.long)
    positions[gather] = p.positions.long()

    r = p.meta.ranges
    real = r.rows.long()
    shift = (gather - torch.arange(len(p.ids))).view(-1, 1)
    # a pad row: no cache key, and the (empty) key range of its sequence's last real row, if any
    seq_base = torch.arange(shape.batch).repeat_interleave(Q) * Q
    rows = torch.stack([torch.zeros(N, dtype=torch.long), seq_base, seq_base], dim=1)
    last_lo = real[starts + q_lens - 1, 1] + (seq_base[::Q][:B] - starts)
    rows[: B * Q, 1:] = last_lo.repeat_interleave(Q).view(-1, 1)
    rows[gather] = real + torch.cat([torch.zeros_like(shift), shift, shift], dim=1)

    write_rows = write_slots = None
    if shape.writes:
        real_w = gather[r.write_rows.long()]
        write_rows = torch.zeros(N, dtype=torch.int32)
        write_rows[: len(real_w)] = real_w.to(torch.int32)
        write_slots = torch.full((N,), scratch_slot, dtype=torch.long)
        write_slots[: len(real_w)] = p.meta.write_slots

    ar_rows = None
    if p.ar_rows is not None:
        real_ar = gather[torch.tensor(p.ar_rows, dtype=torch.long)]
        missing = shape.batch * shape.ar_per_seq - len(real_ar)
        if missing > 0 and len(pad_rows) == 0:
            return None
        ar_rows = torch.cat([real_ar, pad_rows[:1].repeat(missing)]) if missing > 0 else real_ar

    return PaddedPass(shape, ids, positions, ar_rows, p.meta.key_slots, write_rows, write_slots,
                      rows.to(torch.int32), _uniform_tiles(shape, rows), gather)


def _uniform_tiles(shape: PassShape, rows: torch.Tensor) -> torch.Tensor:
    """The tiles of `shape.batch` sequences of Q rows each, as row_ranges builds them."""
    Q, tr = shape.rows_per_seq, shape.tile_rows
    per_seq = -(-Q // tr)
    row = torch.arange(shape.rows)
    tile_of = (row // Q) * per_seq + (row % Q) // tr
    t = torch.arange(shape.tiles)
    seq = t // per_seq
    first = seq * Q + (t % per_seq) * tr
    end = torch.minimum(first + tr, seq * Q + Q)

    def reduce(col: int, how: str) -> torch.Tensor:
        return torch.zeros(shape.tiles, dtype=torch.long).scatter_reduce(0, tile_of, rows[:, col], how,
                                                                         include_self=False)

    return torch.stack([seq, first, end, reduce(0, "amax"), reduce(1, "amin"), reduce(2, "amax")],
                       dim=1).to(torch.int32)


def metadata_to(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """A Triton-backend metadata built on the CPU, moved to `device` (a pass that runs unpadded)."""
    r = meta.ranges
    ranges = RowRanges(r.rows.to(device), r.tiles.to(device), r.tile_rows, r.write_rows.to(device))
    write = meta.write_slots.to(device) if meta.write_slots is not None else None
    return AttentionMetadata(False, meta.key_slots.to(device), write, None, None, backend="triton", ranges=ranges)
