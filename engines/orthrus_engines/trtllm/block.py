"""The draft block's tensors in the one-model TensorRT-LLM step, computed on device (no host sync).

After the verify pass of an iteration, sequence b has committed `n_b` new tokens (the accepted drafts
and the bonus); its draft block is `[anchor, MASK x D]` (D = max_draft_len), the anchor being the bonus
token, at positions `committed_b .. committed_b + D`. The block's K/V go into those tail slots
(`draft_kv="tail"`, proven on CPU by engine/kv_bookkeeping.py and tests/engines/test_draft_kv_tail.py):
the next verify pass rewrites them with AR K/V before anything reads them. These functions are the
tensor forms of kv_bookkeeping's list functions and are tested against them (tests/engines/test_trtllm_block.py).
"""

import torch

from orthrus_engines.engine.kv_bookkeeping import WORD_BITS


def committed_lens(iteration_kv_lens: torch.Tensor, tokens_per_gen_step: int, num_accepted: torch.Tensor
                   ) -> torch.Tensor:
    """Committed K/V per sequence after verification: the iteration's kv_len counted all of its
    `tokens_per_gen_step` rows; of those, the first `num_accepted` are committed."""
    return iteration_kv_lens - tokens_per_gen_step + num_accepted


def draft_kv_lens(committed: torch.Tensor, block_len: int) -> torch.Tensor:
    """kv_bookkeeping.draft_kv_lens: the block of `block_len` rows written after the committed K/V."""
    return committed + block_len


def rewind_kv_lens(kv_lens: torch.Tensor, block_len: int, num_committed: torch.Tensor | int) -> torch.Tensor:
    """kv_bookkeeping.rewind_kv_lens: drop the block's uncommitted rows (all of them after a draft pass)."""
    return kv_lens - (block_len - num_committed)


def block_position_ids(committed: torch.Tensor, block_len: int) -> torch.Tensor:
    """[B * block_len] positions: the anchor sits at `committed`, the masks after it."""
    offsets = torch.arange(block_len, dtype=committed.dtype, device=committed.device)
    return (committed.unsqueeze(1) + offsets).flatten()


def block_input_ids(anchors: torch.Tensor, mask_token_id: int, block_len: int) -> torch.Tensor:
    """[B * block_len] tokens: each sequence's anchor followed by block_len - 1 MASK tokens."""
    ids = torch.full((anchors.shape[0], block_len), mask_token_id, dtype=torch.int32, device=anchors.device)
    ids[:, 0] = anchors
    return ids.flatten()


def block_packed_mask(block_len: int, causal_anchor: bool, words: int, device=None) -> torch.Tensor:
    """One block's packed mask `[block_len, words]` int32, the layout of kv_bookkeeping.packed_block_mask
    (bit j % 32 of word j // 32: the row sees block row j; bidirectional; `causal_anchor`: row 0 sees
    only itself), padded to the attention metadata's `words`."""
    if block_len < 1 or words * WORD_BITS < block_len:
        raise ValueError(f"a block of {block_len} rows does not fit {words} mask words")
    sees = torch.ones(block_len, block_len, dtype=torch.bool)
    if causal_anchor:
        sees[0, 1:] = False
    bits = torch.zeros(block_len, words * WORD_BITS, dtype=torch.int64)
    bits[:, :block_len] = sees.long()
    packed = (bits.view(block_len, words, WORD_BITS) << torch.arange(WORD_BITS)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).to(device)


def draft_gather_rows(batch_size: int, block_len: int, device=None) -> torch.Tensor:
    """Rows of a batch's blocks whose outputs are drafts: rows 0 .. block_len - 2 of each block (row i
    predicts block slot i + 1); the last MASK row is context only."""
    starts = torch.arange(batch_size, device=device) * block_len
    return (starts.unsqueeze(1) + torch.arange(block_len - 1, device=device)).flatten()
