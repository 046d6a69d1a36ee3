"""`OrthrusWorker`: the ORTHRUS one-model speculative step, run after the target (verify) pass.

Per iteration, for the generation requests: (1) accept the drafts the target pass verified: greedy
(longest matching prefix plus the AR's token) or rejection sampling against the draft probabilities the
last twin pass stored (`SpecWorkerBase._accept_draft_tokens`); (2) one twin pass over `[anchor, MASK x D]`
per request at the positions after its committed tokens, its K/V written into the tail slots
(block.py: kv_len bumped to committed + D + 1, a bidirectional packed mask over the block, then the
deferred rewind); rows 0..D-1 give the D next drafts. Iterations with context requests draft nothing
(their requests verify zeros next time: plain AR for one step), as PARD does for new requests.

Request layout is PARD's (the config extends it): 2D tokens per generation request in the target
pass, the first D + 1 verified; `next_draft_tokens` carries 2D - 1 slots, the first D real.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from tensorrt_llm._torch.speculative.interface import SpecMetadata, SpecWorkerBase
from tensorrt_llm.mapping import Mapping

from orthrus_engines.trtllm import block


@dataclass
class OrthrusSpecMetadata(SpecMetadata):
    batch_indices_cuda: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.batch_indices_cuda = torch.empty([self.max_num_requests], dtype=torch.int, device="cuda")
        self.is_spec_dec_tree = False
        self.is_spec_dec_dynamic_tree = False

    def prepare(self):
        super().prepare()
        num_seqs = len(self.request_ids)
        self.batch_indices_cuda[:num_seqs].copy_(torch.arange(num_seqs, dtype=torch.int), non_blocking=True)


class OrthrusWorker(SpecWorkerBase):
    def __init__(self, spec_config, mapping: Mapping):
        super().__init__(use_separate_draft_kv_cache=False)  # the twins share the AR layers' KV pool
        self.spec_config = spec_config
        self.mapping = mapping
        self._mask: Optional[torch.Tensor] = None  # one block's packed mask, built once per device

    @property
    def max_draft_len(self) -> int:
        return self.spec_config.max_draft_len

    @property
    def tokens_per_gen_step(self) -> int:
        return 2 * self.max_draft_len

    def forward(self, input_ids, position_ids, hidden_states, logits, attn_metadata, spec_metadata, draft_model,
                resource_manager=None):
        batch_size, num_contexts = attn_metadata.num_seqs, attn_metadata.num_contexts
        num_gens, D = batch_size - num_contexts, self.max_draft_len
        self._execute_guided_decoder_if_present(logits)

        draft_tokens = spec_metadata.draft_tokens.reshape(num_gens, 2 * D - 1)[:, :D]
        accepted, num_accepted = self._accept_draft_tokens(self._verify_logits(logits, num_contexts, num_gens),
                                                           draft_tokens, num_contexts, batch_size, spec_metadata)
        if D > 1:  # (batch, D + 1) -> (batch, 2D), the sampler's buffer
            accepted = torch.cat([accepted, accepted.new_zeros(batch_size, D - 1)], dim=1)

        if num_gens > 0 and num_contexts == 0:
            drafts = self._twin_pass(accepted, num_accepted, attn_metadata, spec_metadata, draft_model)
        else:
            drafts = torch.zeros((batch_size, D), dtype=torch.int32, device=logits.device)
        next_draft_tokens = torch.cat([drafts, drafts.new_zeros(batch_size, D - 1)], dim=1)
        next_new_tokens = self._prepare_next_new_tokens(accepted, next_draft_tokens, spec_metadata.batch_indices_cuda,
                                                        batch_size, num_accepted)
        return {"logits": logits, "new_tokens": accepted, "new_tokens_lens": num_accepted,
                "next_draft_tokens": next_draft_tokens, "next_new_tokens": next_new_tokens}

    def _verify_logits(self, logits: torch.Tensor, num_contexts: int, num_gens: int) -> torch.Tensor:
        """The context rows, then the first D + 1 of each generation request's 2D rows."""
        if num_gens == 0:
            return logits
        vocab = logits.shape[-1]
        gen = logits[num_contexts:].reshape(num_gens, self.tokens_per_gen_step, vocab)[:, : self.max_draft_len + 1]
        return torch.cat([logits[:num_contexts], gen.reshape(-1, vocab)], dim=0)

    def _twin_pass(self, accepted, num_accepted, attn_metadata, spec_metadata, draft_model) -> torch.Tensor:
        """[batch, D] int32 drafts from one twin pass over the blocks; the attention metadata is restored
        and kv_lens end where PARD leaves them (the iteration's value plus the accepted count)."""
        batch_size, D = attn_metadata.num_seqs, self.max_draft_len
        block_len = D + 1
        capturing = torch.cuda.is_current_stream_capturing()
        if spec_metadata.is_cuda_graph and not capturing:  # warmup: kv_lens_cuda restored, not accumulated
            attn_metadata.prepare_for_spec_dec("_seq_lens", "_seq_lens_cuda", "kv_lens_cuda")
        else:
            attn_metadata.prepare_for_spec_dec("_seq_lens", "_seq_lens_cuda")
        iteration_kv = attn_metadata.kv_lens_cuda[:batch_size].clone()
        committed = block.committed_lens(iteration_kv, self.tokens_per_gen_step, num_accepted[:batch_size])
        try:
            attn_metadata._seq_lens[:batch_size].fill_(block_len)
            attn_metadata._seq_lens_cuda[:batch_size].fill_(block_len)
            attn_metadata.kv_lens_cuda[:batch_size] = block.draft_kv_lens(committed, block_len)
            self._set_block_mask(attn_metadata, batch_size, block_len)
            attn_metadata.on_update()
            attn_metadata.update_for_spec_dec()

            anchors = accepted.gather(1, (num_accepted[:batch_size].long() - 1).unsqueeze(1)).squeeze(1)
            input_ids = block.block_input_ids(anchors, self._mask_token_id(draft_model), block_len)
            position_ids = block.block_position_ids(committed.to(torch.int32), block_len).unsqueeze(0)
            ar_rows = (torch.arange(batch_size, device=input_ids.device) * block_len
                       if self.spec_config.anchor_ar else None)
            hidden = draft_model.model.twin_forward(input_ids, position_ids, attn_metadata, ar_rows)
            rows = block.draft_gather_rows(batch_size, block_len, device=hidden.device)
            logits = draft_model.logits_processor(hidden[rows], draft_model.lm_head, attn_metadata, True)
            logits = logits.reshape(batch_size, D, -1)
            drafts = self._draft_sampler_greedy(logits.reshape(batch_size * D, -1)).reshape(batch_size, D)
            if spec_metadata.use_rejection_sampling:
                self._compute_and_store_draft_probs([logits[:, i] for i in range(D)], spec_metadata, batch_size)
        finally:
            self._restore_attn_metadata_from_spec_dec(attn_metadata)
        if not (spec_metadata.is_cuda_graph and not capturing):
            # the draft pass committed nothing: rewind to committed, then leave kv_lens as the executor expects
            rewound = block.rewind_kv_lens(block.draft_kv_lens(committed, block_len), block_len, 0)
            attn_metadata.kv_lens_cuda[:batch_size] = rewound + self.tokens_per_gen_step
        return drafts

    def _set_block_mask(self, attn_metadata, batch_size: int, block_len: int) -> None:
        """Spec-dec tensors for the blocks: generation length, position offsets 0..D, the packed mask."""
        packed = attn_metadata.spec_decoding_packed_mask
        if self._mask is None or self._mask.device != packed.device:
            self._mask = block.block_packed_mask(block_len, self.spec_config.anchor_causal, packed.shape[-1],
                                                 device=packed.device)
        packed[:batch_size].zero_()
        packed[:batch_size, :block_len] = self._mask
        offsets = attn_metadata.spec_decoding_position_offsets.view(-1)
        per_req = offsets.shape[0] // packed.shape[0]
        offsets.view(-1, per_req)[:batch_size, :block_len] = torch.arange(block_len, dtype=offsets.dtype,
                                                                          device=offsets.device)
        attn_metadata.spec_decoding_generation_lengths[:batch_size].fill_(block_len)
        attn_metadata.use_spec_decoding = True

    def _mask_token_id(self, draft_model) -> int:
        token = getattr(self.spec_config, "mask_token_id", None)
        if token is None:
            token = getattr(draft_model.model_config.pretrained_config, "mask_token_id", None)
        if token is None:
            raise ValueError("Orthrus needs a mask token: set mask_token_id in the config or use a head file")
        return int(token)
