"""Per-request logits processing, applied alike to every AR row and every draft row.

A processor maps one row's logits [V] to new logits [V], given the tokens before that row: the prompt, the
committed output and, inside a block, the block's tokens before the row. The AR view's rows are processed
with the drafts before them, and each draft is drawn from its row processed with the drafts drawn before
it, so p and q are the processed distributions at the same histories: acceptance stays exact (greedy:
the processed argmax; seeded: the processed Gumbel-max draw) with respect to the processed distribution,
as plain AR decoding with the same processors gives.
"""

from typing import Callable

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]  # (history, logits [V]) -> logits [V]


def process_row(processors: list[LogitsProcessor], history: list[int], logits: torch.Tensor) -> torch.Tensor:
    """One row's float32 logits [V] after every processor, in order."""
    row = logits.float()
    for processor in processors:
        row = processor(history, row)
    return row


def process_rows(processors: list[LogitsProcessor], history: list[int], tokens: list[int],
                 logits: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n, V]: row j follows history + tokens[:j] (an AR block: its anchor's history and drafts)."""
    return torch.stack([process_row(processors, history + tokens[:j], logits[j]) for j in range(logits.shape[0])])
