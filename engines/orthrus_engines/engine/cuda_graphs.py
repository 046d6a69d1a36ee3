"""Decode-time passes at static shapes: captured as CUDA graphs and replayed (or, `capture=False`, run
padded but eagerly: the CPU tests' way of checking the padding).

One graph per PassShape (batch bucket, rows per sequence, view, AR rows, K/V store), captured the first
time a pass of that shape runs, as nano-vllm captures one graph per batch size. All graphs share one
memory pool and one set of static input buffers sized for the largest shape (each graph reads its
slices of them); a replay copies the padded inputs in, replays, and gathers the real rows out. Passes
above the largest bucket or `max_rows` rows run eagerly. Only the Triton attention backend is
captured: its launches read every size from device tensors (no host sync, no data-dependent shape).
"""

import torch
from orthrus_kernels import AttentionMetadata
from orthrus_kernels.row_ranges import RowRanges

from orthrus_engines.engine.pass_padding import (
    PaddedPass,
    PassInputs,
    PassShape,
    batch_buckets,
    choose_bucket,
    pad_pass,
    pass_shape,
)


class _StaticInputs:
    """The input buffers every graph reads, at their largest sizes."""

    def __init__(self, max_rows: int, max_batch: int, max_keys: int, device: torch.device):
        def zeros(*size, dtype=torch.long):
            return torch.zeros(*size, dtype=dtype, device=device)

        self.ids, self.positions, self.ar_rows = zeros(max_rows), zeros(max_rows), zeros(max_rows)
        self.write_rows, self.write_slots = zeros(max_rows, dtype=torch.int32), zeros(max_rows)
        self.rows, self.tiles = zeros(max_rows, 3, dtype=torch.int32), zeros(max_rows, 6, dtype=torch.int32)
        self.key_slots = zeros(max_batch, max_keys)

    def load(self, p: PaddedPass) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None]:
        """Copy `p` in; the views a graph of its shape reads (ids, positions, metadata, AR rows)."""
        s, n = p.shape, p.shape.rows
        for buf, src in ((self.ids, p.ids), (self.positions, p.positions), (self.rows, p.rows),
                         (self.tiles, p.tiles)):
            buf[: len(src)].copy_(src, non_blocking=True)
        b, keys = p.key_slots.shape
        self.key_slots[:b, :keys].copy_(p.key_slots, non_blocking=True)
        write_rows = write_slots = ar_rows = None
        if s.writes:
            write_rows, write_slots = self.write_rows[:n], self.write_slots[:n]
            write_rows.copy_(p.write_rows, non_blocking=True)
            write_slots.copy_(p.write_slots, non_blocking=True)
        if p.ar_rows is not None:
            ar_rows = self.ar_rows[: len(p.ar_rows)]
            ar_rows.copy_(p.ar_rows, non_blocking=True)
        ranges = RowRanges(self.rows[:n], self.tiles[: s.tiles], s.tile_rows, write_rows)
        meta = AttentionMetadata(False, self.key_slots[: s.batch], write_slots, None, None, backend="triton",
                                 ranges=ranges)
        return self.ids[:n], self.positions[:n], meta, ar_rows


class PassGraphs:
    def __init__(self, model: torch.nn.Module, kv_cache: list, scratch_slot: int, max_num_seqs: int,
                 max_model_len: int, device: torch.device, capture: bool, max_rows: int = 512):
        self.model, self.kv_cache, self.scratch_slot, self.device = model, kv_cache, scratch_slot, device
        self.buckets = batch_buckets(max_num_seqs)
        self.max_rows, self.max_model_len = max_rows, max_model_len
        self.capture = capture  # False: run padded, eagerly (any device)
        self.graphs: dict[PassShape, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.static: _StaticInputs | None = None
        self.num_replays = 0  # passes that ran as a graph (or, capture=False, padded)

    def shape_for(self, num_seqs: int, max_q: int) -> bool:
        """Whether a pass of `num_seqs` sequences with at most `max_q` rows each runs at a static shape."""
        bucket = choose_bucket(self.buckets, num_seqs)
        return bucket is not None and bucket * max_q <= self.max_rows

    @torch.inference_mode()
    def forward(self, p: PassInputs) -> torch.Tensor | None:
        """The pass's final hidden states [T, H] (its real rows, in order); None if it has no static shape."""
        bucket = choose_bucket(self.buckets, len(p.q_lens))
        if bucket is None or bucket * max(p.q_lens) > self.max_rows:
            return None
        padded = pad_pass(p, pass_shape(p, bucket), self.scratch_slot)
        if padded is None:
            return None
        self.num_replays += 1
        if not self.capture:
            out = self.model(padded.ids, padded.positions, padded.metadata(), self.kv_cache, padded.shape.diffusion,
                             padded.ar_rows)
            return out[padded.gather]
        return self._replay(padded)

    def _replay(self, p: PaddedPass) -> torch.Tensor:
        if self.static is None:
            self.static = _StaticInputs(self.max_rows, self.buckets[-1], self.max_model_len, self.device)
        ids, positions, meta, ar_rows = self.static.load(p)
        entry = self.graphs.get(p.shape)
        if entry is None:
            entry = self._capture(p.shape, ids, positions, meta, ar_rows)
        graph, out = entry
        graph.replay()
        return out[p.gather.to(self.device, non_blocking=True)]

    def _capture(self, shape: PassShape, ids, positions, meta, ar_rows) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture one shape, its inputs already loaded: a warm-up run first (Triton compiles its kernels
        there; it writes the same K/V the replay will)."""
        self.model(ids, positions, meta, self.kv_cache, shape.diffusion, ar_rows)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, self.pool):
            out = self.model(ids, positions, meta, self.kv_cache, shape.diffusion, ar_rows)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[shape] = graph, out
        return graph, out
