"""Token choice and draft acceptance (docs/ARCHITECTURE.md §1).

Greedy: accept the longest prefix of drafts that equals the AR argmax, then the AR argmax after it.
Temperature > 0: speculative rejection sampling with p (AR) and q (draft) filtered the same way,
which leaves the output distribution exactly that of AR sampling.
Seeded, temperature > 0: the token at sequence position t is argmax_v(log p_t(v) + g(seed, t, v)) with
counter-based Gumbel noise g (Gumbel-max: exactly a draw from p_t). Drafts are drawn with the same noise
over q, and a draft is accepted iff it equals the AR draw at its position, so the output is that of
plain AR with this noise whatever the block size, cycle or batch.
"""

import torch

from orthrus_engines.engine.gumbel import gumbel_noise
from orthrus_engines.outputs import TokenLogprob
from orthrus_engines.sampling_params import SamplingParams


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[N, V] logits -> [N, V] float32 logits / temperature, -inf where top-k or top-p drops a token."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[N, V] logits -> [N, V] float32 probabilities after temperature, top-k and top-p."""
    return filtered_logits(logits, params).softmax(-1)


def seeded_draws(logits: torch.Tensor, params: SamplingParams, seed: int, start: int) -> list[int]:
    """Row i's token at sequence position start + i: the Gumbel-max draw from the filtered distribution,
    with noise fixed by (seed, position); tokens top-k / top-p drop (-inf) are never drawn."""
    z = filtered_logits(logits, params)
    positions = torch.arange(start, start + z.shape[0], device=z.device)
    return (z + gumbel_noise(seed, positions, z.shape[-1])).argmax(-1).tolist()


def token_logprobs(logits: torch.Tensor, params: SamplingParams, tokens: list[int]) -> list[TokenLogprob]:
    """Row i's log probability of tokens[i] and its params.logprobs best alternatives, under the distribution
    the token was chosen from: the log-softmax of the logits (greedy) or of the filtered logits (sampled)."""
    rows = logits[: len(tokens)].float()
    lp = torch.log_softmax(rows if params.greedy else filtered_logits(rows, params), -1)
    chosen = lp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    top_lp, top_ids = lp.topk(params.logprobs, -1) if params.logprobs else (lp[:, :0], lp[:, :0].long())
    return [TokenLogprob(t, c, [(i, v) for i, v in zip(ids, vals) if v > float("-inf")])
            for t, c, ids, vals in zip(tokens, chosen, top_ids.tolist(), top_lp.tolist())]


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def greedy_accept(drafts: list[int], target: list[int]) -> list[int]:
    """target[i] is the AR argmax (or seeded draw) at block slot i (len(drafts) + 1 of them)."""
    a = 0
    while a < len(drafts) and drafts[a] == target[a]:
        a += 1
    return drafts[:a] + [target[a]]


def speculative_accept(drafts: list[int], q: torch.Tensor, p: torch.Tensor, generator: torch.Generator) -> list[int]:
    """q: [k-1, V] draft probabilities the drafts were sampled from; p: [k, V] AR probabilities."""
    for i, d in enumerate(drafts):
        ratio = (p[i, d] / q[i, d]).item()
        if torch.rand((), generator=generator).item() < min(1.0, ratio):
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = residual.sum()
        return drafts[:i] + [sample(residual / total if total > 0 else p[i], generator)]
    return drafts + [sample(p[len(drafts)], generator)]
