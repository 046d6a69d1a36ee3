"""Attention ops for the Orthrus engine: one entry point per op, dispatching by device."""

from orthrus_kernels.attention import (
    AttentionMetadata,
    build_attention_metadata,
    build_verify_draft_metadata,
    paged_attention,
)

__all__ = ["AttentionMetadata", "build_attention_metadata", "build_verify_draft_metadata", "paged_attention"]
