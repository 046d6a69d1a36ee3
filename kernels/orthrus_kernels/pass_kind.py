"""The kinds of attention pass: what a pass's new tokens see and whether their K/V stay in the cache."""

import enum


class PassKind(enum.Enum):
    """What the new tokens of a pass see among themselves, and whether their K/V are kept. Every new
    token also sees its sequence's whole cached prefix."""

    CAUSAL = "causal"  # prefill, decode, verify: the earlier new tokens (bottom-right causal); K/V written
    BLOCK = "block"  # a diffusion draft block: the whole block; K/V transient
    BLOCK_CAUSAL_ANCHOR = "block_causal_anchor"  # a draft block whose first row (the anchor) sees only itself
    # The same draft blocks with their K/V written to the slots of their positions (the uncommitted tail
    # of the sequence, which the verify pass overwrites) and read back from the cache: TensorRT-LLM's
    # one-model draft pass.
    BLOCK_WRITTEN = "block_written"
    BLOCK_CAUSAL_ANCHOR_WRITTEN = "block_causal_anchor_written"

    @property
    def causal(self) -> bool:
        return self is PassKind.CAUSAL

    @property
    def write_kv(self) -> bool:
        return self in (PassKind.CAUSAL, PassKind.BLOCK_WRITTEN, PassKind.BLOCK_CAUSAL_ANCHOR_WRITTEN)

    @property
    def causal_anchor(self) -> bool:
        return self in (PassKind.BLOCK_CAUSAL_ANCHOR, PassKind.BLOCK_CAUSAL_ANCHOR_WRITTEN)

    @staticmethod
    def draft_block(causal_anchor: bool, written: bool) -> "PassKind":
        """The kind of a diffusion draft block."""
        if causal_anchor:
            return PassKind.BLOCK_CAUSAL_ANCHOR_WRITTEN if written else PassKind.BLOCK_CAUSAL_ANCHOR
        return PassKind.BLOCK_WRITTEN if written else PassKind.BLOCK
