"""Attention ops for the Orthrus engine: one entry point per op, dispatching by device."""

from orthrus_kernels.attention import (
    AttentionMetadata,
    build_attention_metadata,
    build_verify_draft_metadata,
    paged_attention,
)
from orthrus_kernels.pass_kind import PassKind

__all__ = ["AttentionMetadata", "PassKind", "build_attention_metadata", "build_verify_draft_metadata", "paged_attention"]
