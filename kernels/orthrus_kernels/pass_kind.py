"""The kinds of attention pass: what a pass's new tokens see and whether their K/V stay in the cache."""

import enum


class PassKind(enum.Enum):
    """What the new tokens of a pass see among themselves, and whether their K/V are kept. Every new
    token also sees its sequence's whole cached prefix."""

    CAUSAL = "causal"  # prefill, decode, verify: the earlier new tokens (bottom-right causal); K/V written
    BLOCK = "block"  # a diffusion draft block: the whole block; K/V transient
    BLOCK_CAUSAL_ANCHOR = "block_causal_anchor"  # a draft block whose first row (the anchor) sees only itself

    @property
    def causal(self) -> bool:
        return self is PassKind.CAUSAL

    @property
    def write_kv(self) -> bool:
        return self is PassKind.CAUSAL

    @property
    def causal_anchor(self) -> bool:
        return self is PassKind.BLOCK_CAUSAL_ANCHOR
