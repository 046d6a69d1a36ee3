"""Owns the model and the paged KV cache; runs the three kinds of forward pass.

- prefill: AR view, causal, writes KV; logits only at the anchor of a chunk that ends with it (the
           first token, as the official generate's first pass);
- draft:   diffusion view over `[anchor, MASK x (k-1)]`, bidirectional in the block, reads the cached
           prefix, writes nothing (`draft_kv: "tail"`: writes the block into the tail slots that the
           verify pass overwrites, TensorRT-LLM's one-model draft pass); logits at slots 0..k-2 (with
           an `anchor_view: "ar"` head the anchor rows use the AR projections; with `"causal"` they
           also see only the prefix and themselves, so that the first draft is exactly the AR's next token);
- verify:  AR view over `[anchor, d_1..d_{k-1}]`, causal, writes KV for all k; logits at all k slots;
- verify+draft (`anchor_view: "causal"` heads): the verify rows, and after each of them a transient
           diffusion block of MASK rows that reads the cache through that row, so that whichever
           row turns out to be the last accepted one, the next cycle's drafts are already there.
"""

import time
from types import SimpleNamespace

import torch
from orthrus_kernels import AttentionMetadata, PassKind, build_attention_metadata, build_verify_draft_metadata

from orthrus_engines.engine.cuda_graphs import PassGraphs
from orthrus_engines.engine.pass_padding import PassInputs, metadata_to
from orthrus_engines.engine.sequence import Sequence
from orthrus_engines.models.layers import cpu_packing_supported, pack_weights_for_cpu
from orthrus_engines.models.loader import ModelSource, build_model


class ModelRunner:
    def __init__(self, src: ModelSource, device: torch.device, dtype: torch.dtype, page_size: int,
                 num_pages: int, max_model_len: int, pack_weights: bool = True, compile: bool = False,
                 attention_backend: str = "torch", cuda_graphs: bool = False, max_num_seqs: int = 64):
        self.device, self.dtype, self.page_size = device, dtype, page_size
        self.max_model_len = max_model_len  # rows of the rotary table: no pass may address a position past it
        self.attention_backend = attention_backend  # the metadata carries it to paged_attention
        self.mask_token_id = src.mask_token_id
        self.anchor_ar = src.anchor_view in ("ar", "causal")
        self.anchor_causal = src.anchor_view == "causal"
        self.model = build_model(src, dtype, device, max_model_len)
        if pack_weights and cpu_packing_supported(device, dtype):
            pack_weights_for_cpu(self.model)
        # Compiled: one graph per kind of pass (prefill, decode, draft, verify; one sequence or several),
        # sizes symbolic, thanks to `every_field` metadata. Each compiles the first time it runs (1-3
        # minutes each for the built-in model on 2 CPU cores); the logits (one op) stay eager.
        self.compiled = compile
        self.forward_model = torch.compile(self.model, dynamic=True) if compile else self.model
        if compile:  # room for every kind of pass before torch.compile falls back to eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
            # no guard that two sizes are equal because they were the first time (a prompt's first chunk
            # has as many keys as queries; a later chunk or a prefix hit has more)
            torch.fx.experimental._config.use_duck_shape = False
        s = self.model.shape
        attn = self.model.layers[0].self_attn
        slots = num_pages * page_size + 1  # the last slot is no page's: padded passes store their pad rows there
        # zeros, not empty: a masked-out key slot never written (padding reads slot 0) must not hold a NaN,
        # which a zero attention weight would still turn into a NaN output
        self.kv_cache = [
            (torch.zeros(slots, attn.num_kv_heads, s.head_dim, dtype=dtype, device=device),
             torch.zeros(slots, attn.num_kv_heads, s.head_dim, dtype=dtype, device=device))
            for _ in range(s.num_layers)
        ]
        # decode, verify, draft and fused passes at static shapes: CUDA graphs (Triton backend, eager model)
        self.graphs: PassGraphs | None = None
        if cuda_graphs and attention_backend == "triton" and not compile and device.type == "cuda":
            self.graphs = self.static_shape_passes(capture=True, max_num_seqs=max_num_seqs)

    def static_shape_passes(self, capture: bool, max_num_seqs: int = 64) -> PassGraphs:
        """The runner of padded passes over this model and cache (`capture=False`: eager, any device)."""
        return PassGraphs(self.model, self.kv_cache, self.kv_cache[0][0].shape[0] - 1, max_num_seqs,
                          self.max_model_len, self.device, capture)

    @staticmethod
    def bytes_per_page(src: ModelSource, dtype: torch.dtype, page_size: int, tp_size: int = 1) -> int:
        s = src.shape
        return s.num_layers * 2 * page_size * (s.num_kv_heads // tp_size) * s.head_dim * dtype.itemsize

    def _static(self, num_seqs: int, max_q: int) -> bool:
        """Whether a decode-time pass of this size runs padded (CUDA graphs): its metadata is built on the CPU."""
        return self.graphs is not None and self.graphs.shape_for(num_seqs, max_q)

    @torch.inference_mode()
    def _run(self, seqs: list[Sequence], ids: list[int], positions: torch.Tensor, meta: AttentionMetadata,
             diffusion: bool, ar_rows: list[int] | None = None, q_lens: list[int] | None = None) -> torch.Tensor:
        """Final hidden states [T, H] of one batched pass. `q_lens` (rows per sequence): the pass may run
        padded (CUDA graphs), its metadata built on the CPU."""
        last = int(positions.max()) if positions.numel() else -1
        if last >= self.max_model_len:  # the scheduler keeps every row inside; never index past the table
            raise RuntimeError(f"a pass would address position {last}, outside the window of {self.max_model_len}")
        if q_lens is not None:
            hidden = self.graphs.forward(PassInputs(ids, positions, meta, q_lens, diffusion, ar_rows))
            if hidden is not None:
                for s in seqs:
                    s.forward_passes += 1
                return hidden
            meta = metadata_to(meta, self.device)  # no static shape after all (see pad_pass): eager
        ar = torch.tensor(ar_rows, device=self.device) if ar_rows is not None else None
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden = self.forward_model(ids_t, positions.to(self.device), meta, self.kv_cache, diffusion, ar)
        for s in seqs:
            s.forward_passes += 1
        return hidden

    def _forward(self, kind: PassKind, seqs: list[Sequence], tokens: list[list[int]], logit_rows: list[int] | None,
                 ar_rows: list[int] | None = None, decode: bool = True) -> torch.Tensor | None:
        """One pass over `tokens` after each sequence's cached prefix: the AR view for a causal pass, the
        diffusion view (the AR projections at `ar_rows`) for a draft block; logits at `logit_rows`.
        `decode`: a decode-time pass (not a prefill), which may run at a static shape (CUDA graphs)."""
        starts, q_lens = [s.num_cached for s in seqs], [len(t) for t in tokens]
        positions = torch.cat([torch.arange(s, s + q) for s, q in zip(starts, q_lens)])
        static = decode and self._static(len(seqs), max(q_lens))
        meta = build_attention_metadata(kind, q_lens, starts, [s.page_table for s in seqs], self.page_size,
                                        torch.device("cpu") if static else self.device, every_field=self.compiled,
                                        backend=self.attention_backend)
        hidden = self._run(seqs, [t for ts in tokens for t in ts], positions, meta, not kind.causal, ar_rows,
                           q_lens if static else None)
        return None if logit_rows is None else self.logits(hidden, logit_rows)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return self.model.logits(hidden[torch.tensor(rows, dtype=torch.long, device=self.device)])

    def prefill(self, seqs: list[Sequence], ends: list[int]) -> torch.Tensor | None:
        """Cache positions [num_cached, end) of each sequence; AR logits [n, V] at the last row of each
        of the n chunks that end with the anchor (end = len(token_ids)), None if none does."""
        tokens = [s.token_ids[s.num_cached : e] for s, e in zip(seqs, ends)]
        rows, offset = [], 0
        for s, t, e in zip(seqs, tokens, ends):
            offset += len(t)
            if e == len(s.token_ids):
                rows.append(offset - 1)
        return self._forward(PassKind.CAUSAL, seqs, tokens, rows or None, decode=False)

    def draft(self, seqs: list[Sequence], ks: list[int], write_tail: bool = False) -> torch.Tensor:
        """[sum(k - 1), V] diffusion logits: row i of a sequence predicts block slot i + 1. `write_tail`
        (`draft_kv: "tail"`): the block's K/V go to the uncommitted slots of positions num_cached ..
        num_cached + k - 1 (the sequence's kv_len bumped by k for this pass) and are read from there;
        the sequence's committed length stays num_cached, and its verify pass overwrites them."""
        tokens = [[s.token_ids[-1]] + [self.mask_token_id] * (k - 1) for s, k in zip(seqs, ks)]
        rows, anchors, offset = [], [], 0
        for k in ks:
            rows.extend(range(offset, offset + k - 1))
            anchors.append(offset)
            offset += k
        if write_tail:  # the block sits at num_cached.. either way; written, it needs its pages
            for s, k in zip(seqs, ks):  # (the scheduler gives every block its pages before the step)
                if s.num_cached + k > len(s.page_table) * self.page_size:
                    raise RuntimeError(f"a draft block up to position {s.num_cached + k - 1} has no page to write")
        kind = PassKind.draft_block(self.anchor_causal, write_tail)
        return self._forward(kind, seqs, tokens, rows, anchors if self.anchor_ar else None)

    def verify(self, seqs: list[Sequence], blocks: list[list[int]]) -> torch.Tensor:
        """[sum(k), V] AR logits for `[anchor, drafts...]` of each sequence; writes their KV."""
        rows = list(range(sum(len(b) for b in blocks)))
        return self._forward(PassKind.CAUSAL, seqs, blocks, rows)

    @torch.inference_mode()
    def verify_and_draft(self, seqs: list[Sequence], blocks: list[list[int]], ms: list[int]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass, `anchor_view: "causal"` heads. Sequence b verifies `blocks[b]` = [anchor, drafts...]
        (v tokens, KV written) and drafts, after each verify slot j, a block of m = ms[b] MASK rows at
        the next m positions, reading the cache through slot j. Returns the AR logits [sum(v), V] and
        the hidden states of the MASK rows (sequence by sequence, block j at rows j*m .. j*m + m - 1):
        the caller turns the block of the last accepted slot into logits with `logits()`; its row i
        predicts the token i + 2 places after slot j."""
        starts = [s.num_cached for s in seqs]
        ids, positions, ar_rows, mask_rows, row = [], [], [], [], 0
        for start, block, m in zip(starts, blocks, ms):
            v = len(block)
            ids += block + [self.mask_token_id] * (v * m)
            positions += list(range(start, start + v))
            positions += [start + j + 1 + i for j in range(v) for i in range(m)]
            ar_rows += range(row, row + v)
            mask_rows += range(row + v, row + v + v * m)
            row += v + v * m
        q_lens = [len(b) * (1 + m) for b, m in zip(blocks, ms)]
        static = self._static(len(seqs), max(q_lens))
        meta = build_verify_draft_metadata([len(b) for b in blocks], ms, starts, [s.page_table for s in seqs],
                                           self.page_size, torch.device("cpu") if static else self.device,
                                           self.attention_backend)
        hidden = self._run(seqs, ids, torch.tensor(positions), meta, True, ar_rows, q_lens if static else None)
        return self.logits(hidden, ar_rows), hidden[torch.tensor(mask_rows, dtype=torch.long, device=self.device)]

    @torch.inference_mode()
    def time_forward(self, n: int, repeats: int = 1) -> float:
        """Seconds for one verify-like pass over n tokens (logits for all). Start-up only: it writes
        scratch K/V into the first pages, which hold nothing yet."""
        table = list(range(-(-n // self.page_size)))
        meta = build_attention_metadata(PassKind.CAUSAL, [n], [0], [table], self.page_size, self.device,
                                        every_field=self.compiled, backend=self.attention_backend)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device)
        return self._best_time(lambda: self.model.logits(self.forward_model(ids, positions, meta, self.kv_cache)),
                               repeats)

    def time_verify_and_draft(self, k: int, batch: int, repeats: int = 1) -> float:
        """Seconds for one verify+draft pass of `batch` sequences with k verify rows and k blocks of
        k - 1 each (batch * k * k rows), the draft logits of one block included. Start-up only, as
        `time_forward`."""
        seqs = [SimpleNamespace(num_cached=0, page_table=list(range(-(-k // self.page_size))), forward_passes=0)
                for _ in range(batch)]
        blocks, ms = [[0] * k] * batch, [k - 1] * batch

        def run():
            _, hidden = self.verify_and_draft(seqs, blocks, ms)
            self.logits(hidden, [b * k * (k - 1) + i for b in range(batch) for i in range(k - 1)])

        return self._best_time(run, repeats)

    def _best_time(self, fn, repeats: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best
