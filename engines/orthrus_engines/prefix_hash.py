"""Prefix identity shared by the engine's prefix cache and the cluster router (docs/ARCHITECTURE.md §4).

A full page of `page_size` tokens is named by a hash chain: sha256(previous page's hash, the
page's token ids), seeded with a fingerprint of the model and tokenizer. The same in every process
and on every machine. Hashes are 32 hex characters.
"""

import hashlib
import json
import struct


def model_fingerprint(config: dict, tokenizer_vocab: dict[str, int] | None, weight_sample: bytes = b"") -> str:
    """The hash chain's seed: the checkpoint's config.json, the tokenizer's vocabulary and a sample of the
    weights as stored (models.checkpoint.weights_digest), never of the runtime dtype or device."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    if tokenizer_vocab is not None:
        h.update(json.dumps(sorted(tokenizer_vocab.items())).encode())
    h.update(weight_sample)
    return h.hexdigest()[:32]


def next_page_hash(parent: str, page: list[int] | tuple[int, ...]) -> str:
    h = hashlib.sha256(parent.encode())
    h.update(struct.pack(f"<{len(page)}q", *page))
    return h.hexdigest()[:32]


def page_hashes(token_ids: list[int], page_size: int, seed: str, start: int = 0, parent: str | None = None) -> list[str]:
    """Hashes of the full pages of `token_ids`, starting at page `start` whose parent hash is
    `parent` (the seed when start is 0)."""
    out: list[str] = []
    h = seed if parent is None else parent
    for b in range(start, len(token_ids) // page_size):
        h = next_page_hash(h, token_ids[b * page_size : (b + 1) * page_size])
        out.append(h)
    return out
