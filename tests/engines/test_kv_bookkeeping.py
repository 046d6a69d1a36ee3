"""kv_bookkeeping: TensorRT-LLM's draft-pass kv_lens bump, the deferred rewind and the packed block
mask, against hand-computed cases."""

import pytest
import torch

from orthrus_engines.engine.kv_bookkeeping import draft_kv_lens, packed_block_mask, query_starts, rewind_kv_lens


def test_draft_bumps_kv_lens_by_the_block():
    # a batch: 10 committed + K 4; 0 committed (a 1-token prompt) + K 2; 31 + K 8 (crosses a page)
    assert draft_kv_lens([10, 0, 31], [4, 2, 8]) == [14, 2, 39]
    assert query_starts([14, 2, 39], [4, 2, 8]) == [10, 0, 31]  # the block starts at the committed length


def test_rewind_to_the_committed_length():
    kv = draft_kv_lens([10, 0, 31], [4, 2, 8])
    # the draft pass commits nothing: back to the committed lengths
    assert rewind_kv_lens(kv, [4, 2, 8], [0, 0, 0]) == [10, 0, 31]
    # the verify pass of the same blocks: the anchor and 2, 0, 7 accepted drafts commit
    assert rewind_kv_lens(kv, [4, 2, 8], [3, 1, 8]) == [13, 1, 39]


@pytest.mark.parametrize("args", [([5], [3], [4]), ([5], [3], [-1]), ([2], [3], [1]), ([5, 6], [3], [1])])
def test_rewind_refuses_impossible_counts(args):
    with pytest.raises(ValueError):
        rewind_kv_lens(*args)


def test_bump_and_starts_refuse_bad_lengths():
    with pytest.raises(ValueError):
        draft_kv_lens([3], [0])
    with pytest.raises(ValueError):
        draft_kv_lens([3, 4], [2])
    with pytest.raises(ValueError):
        query_starts([3], [4])


def _words(*ints: int) -> list[int]:
    """Unsigned 32-bit words as int32 values (bit 31 is the sign)."""
    return [w - 2**32 if w >= 2**31 else w for w in ints]


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_packed_mask_bidirectional_small(k):
    mask = packed_block_mask([k])
    assert mask.dtype == torch.int32 and mask.shape == (k, 1)
    assert mask[:, 0].tolist() == [2**k - 1] * k  # every row sees tokens 0..k-1


def test_packed_mask_causal_anchor():
    assert packed_block_mask([4], causal_anchor=True)[:, 0].tolist() == [0b0001, 0b1111, 0b1111, 0b1111]
    assert packed_block_mask([1], causal_anchor=True).tolist() == [[1]]


def test_packed_mask_32_fills_the_sign_bit():
    assert packed_block_mask([32]).tolist() == [_words(0xFFFFFFFF)] * 32
    assert packed_block_mask([32], causal_anchor=True)[:2].tolist() == [[1], _words(0xFFFFFFFF)]


def test_packed_mask_more_than_32():
    mask = packed_block_mask([40], causal_anchor=True)
    assert mask.shape == (40, 2)
    assert mask[0].tolist() == [1, 0]
    assert mask[1:].tolist() == [_words(0xFFFFFFFF, 0xFF)] * 39  # tokens 32..39: bits 0..7 of word 1


def test_packed_mask_batch():
    mask = packed_block_mask([2, 33, 3], causal_anchor=True)
    assert mask.shape == (38, 2)  # rows block by block; words for the longest block
    assert mask[:2].tolist() == [[1, 0], [3, 0]]
    assert mask[2].tolist() == [1, 0] and mask[3:35].tolist() == [_words(0xFFFFFFFF, 1)] * 32
    assert mask[35:].tolist() == [[1, 0], [7, 0], [7, 0]]
    plain = packed_block_mask([2, 33, 3])
    assert plain[0].tolist() == [3, 0] and plain[2].tolist() == _words(0xFFFFFFFF, 1) and plain[35].tolist() == [7, 0]


def test_packed_mask_refuses_empty_blocks():
    with pytest.raises(ValueError):
        packed_block_mask([])
    with pytest.raises(ValueError):
        packed_block_mask([3, 0])
