"""The KV bookkeeping of TensorRT-LLM's one-model draft pass (PARD, DFlash), as pure functions.

There the draft pass runs through the target's attention and writes its block's K/V into the
uncommitted tail slots of the sequence's pages. Each sequence's `kv_len` (the keys it has in its
pages, the pass's own included; new row i sits at position kv_len - q_len + i) is bumped by the
block for the draft pass, and rewound afterwards, once acceptance is known, to the committed length:
the slots past it hold stale K/V that the next pass overwrites before anything reads them. The
draft block's mask travels packed into int32 bit words per row.

In the two-pass cycle with `draft_kv: "tail"` (docs/ARCHITECTURE.md §1): the draft pass of K rows runs
at kv_len = committed + K and commits nothing (rewind by K); the verify pass of the same K rows
runs at committed + K again and commits the anchor and the accepted drafts (rewind by the rest).
"""

import torch

WORD_BITS = 32


def draft_kv_lens(committed_lens: list[int], block_lens: list[int]) -> list[int]:
    """Each sequence's kv_len for a pass whose block of K rows is written after its committed K/V."""
    if len(committed_lens) != len(block_lens):
        raise ValueError(f"{len(committed_lens)} committed lengths for {len(block_lens)} blocks")
    if any(n < 0 for n in committed_lens) or any(k < 1 for k in block_lens):
        raise ValueError(f"committed lengths must be >= 0 and blocks >= 1, got {committed_lens}, {block_lens}")
    return [n + k for n, k in zip(committed_lens, block_lens)]


def query_starts(kv_lens: list[int], q_lens: list[int]) -> list[int]:
    """Position of each sequence's first new row: kv_len - q_len (the new rows are the last keys)."""
    starts = [kv - q for kv, q in zip(kv_lens, q_lens)]
    if len(kv_lens) != len(q_lens) or any(s < 0 for s in starts):
        raise ValueError(f"kv lengths {kv_lens} cannot hold queries {q_lens}")
    return starts


def rewind_kv_lens(kv_lens: list[int], block_lens: list[int], num_committed: list[int]) -> list[int]:
    """The deferred rewind after a pass of `block_lens[b]` written rows of which the first
    `num_committed[b]` are now committed (0 after a draft pass; the anchor and the accepted drafts
    after a verify pass): kv_len drops by the uncommitted rest."""
    if not len(kv_lens) == len(block_lens) == len(num_committed):
        raise ValueError("one kv length, block length and committed count per sequence")
    out = []
    for kv, k, n in zip(kv_lens, block_lens, num_committed):
        if not 0 <= n <= k <= kv:
            raise ValueError(f"cannot commit {n} of a block of {k} with kv length {kv}")
        out.append(kv - (k - n))
    return out


def packed_block_mask(block_lens: list[int], causal_anchor: bool = False) -> torch.Tensor:
    """The draft blocks' mask packed as TensorRT-LLM packs a spec-dec mask: int32
    `[sum(block_lens), ceil(max(block_lens) / 32)]`, the rows of each block one after another; bit j % 32
    of word j // 32 of a row says it sees token j of its block. Every row sees its whole block
    (bidirectional); with `causal_anchor` the first row sees only itself. (The committed prefix is
    always visible and not in the mask.)"""
    if not block_lens or any(k < 1 for k in block_lens):
        raise ValueError(f"blocks must have at least one row, got {block_lens}")
    words = -(-max(block_lens) // WORD_BITS)
    rows = []
    for k in block_lens:
        sees = torch.ones(k, k, dtype=torch.bool)
        if causal_anchor:
            sees[0, 1:] = False
        padded = torch.zeros(k, words * WORD_BITS, dtype=torch.int64)
        padded[:, :k] = sees.long()
        bits = padded.view(k, words, WORD_BITS) << torch.arange(WORD_BITS)
        rows.append(bits.sum(-1))  # distinct bits: the sum is the OR
    packed = torch.cat(rows)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # bit 31: the sign bit
