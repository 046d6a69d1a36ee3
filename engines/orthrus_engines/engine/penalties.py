"""The sampling parameters that reshape logits before temperature, as processors on the logits hook
(engine/logits_processors.py), in the order of vLLM's sampler: min_tokens, logit_bias, then the
repetition, frequency and presence penalties. Each works on one row [V] with tensor ops (no loop over
the vocabulary); the penalties count the sequence's committed output once, adding each new token as it
is committed, and a row's block tokens on top.
"""

import torch

from orthrus_engines.engine.logits_processors import LogitsProcessor
from orthrus_engines.sampling_params import SamplingParams


def token_counts(tokens: list[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] int64: how often each token id occurs in `tokens`."""
    return torch.bincount(torch.tensor(tokens, dtype=torch.int64, device=device), minlength=vocab_size)


class _OnDevice:
    """A CPU tensor's copy on the device of the logits it is applied to, made once per device."""

    def __init__(self, tensor: torch.Tensor):
        self.copies = {tensor.device: tensor}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self.copies:
            self.copies[device] = next(iter(self.copies.values())).to(device)
        return self.copies[device]


class MinTokens:
    """`banned` (EOS and the stop token ids) at -inf while the history holds fewer than `min_tokens`
    generated tokens."""

    def __init__(self, min_tokens: int, prompt_len: int, banned: list[int]):
        self.min_tokens, self.prompt_len = min_tokens, prompt_len
        self.banned = _OnDevice(torch.tensor(sorted(banned), dtype=torch.int64))

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(history) - self.prompt_len >= self.min_tokens:
            return logits
        return logits.index_fill(0, self.banned.on(logits.device), float("-inf"))


class LogitBias:
    """OpenAI's logit_bias: each listed token's bias added to its logit."""

    def __init__(self, bias: dict[int, float]):
        self.ids = _OnDevice(torch.tensor(list(bias), dtype=torch.int64))
        self.values = _OnDevice(torch.tensor(list(bias.values()), dtype=torch.float32))

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(0, self.ids.on(logits.device), self.values.on(logits.device).to(logits.dtype))


class Penalties:
    """vLLM's penalties: repetition (HF's: the logits of tokens in the prompt or the output divided by it
    where > 0, multiplied by it otherwise), then OpenAI's frequency (times each token's count in the output)
    and presence (once for each token the output holds) subtracted.

    `committed` is the sequence's token list (prompt, then output, appended to as tokens are committed):
    its output counts are kept and extended, and a row's history adds only the tokens after it. A history
    that does not start with it is counted whole."""

    def __init__(self, params: SamplingParams, prompt_len: int, committed: list[int]):
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.repetition = params.repetition_penalty
        self.prompt_len = prompt_len
        self.committed = committed
        self._counts: torch.Tensor | None = None  # of committed[prompt_len:_counted]
        self._counted = prompt_len
        self._prompt_seen: torch.Tensor | None = None  # [V] bool: the prompt's tokens

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        own = len(history) >= len(self.committed) and history[: len(self.committed)] == self.committed
        counts = self._output_counts(history, logits) if own else token_counts(
            history[self.prompt_len :], logits.shape[0], logits.device)
        if self.repetition != 1:
            prompt_seen = self._prompt(logits) if own else token_counts(
                history[: self.prompt_len], logits.shape[0], logits.device) > 0
            penalised = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(prompt_seen | (counts > 0), penalised, logits)
        if self.frequency:
            logits = logits - self.frequency * counts.to(logits.dtype)
        if self.presence:
            logits = logits - self.presence * (counts > 0).to(logits.dtype)
        return logits

    def _output_counts(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Counts of history[prompt_len:], the committed part kept across calls."""
        vocab, device, end = logits.shape[0], logits.device, len(self.committed)
        if self._counts is None or self._counts.device != device:
            self._counts, self._counted = torch.zeros(vocab, dtype=torch.int64, device=device), self.prompt_len
        if self._counted < end:
            self._counts += token_counts(self.committed[self._counted : end], vocab, device)
            self._counted = end
        return self._counts + token_counts(history[end:], vocab, device) if len(history) > end else self._counts

    def _prompt(self, logits: torch.Tensor) -> torch.Tensor:
        if self._prompt_seen is None or self._prompt_seen.device != logits.device:
            self._prompt_seen = token_counts(self.committed[: self.prompt_len], logits.shape[0], logits.device) > 0
        return self._prompt_seen


def sampling_processors(params: SamplingParams, committed: list[int], prompt_len: int, eos_ids: set[int]
                        ) -> list[LogitsProcessor]:
    """The processors a request's params ask for, in vLLM's order; none for the defaults."""
    out: list[LogitsProcessor] = []
    banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    if params.min_tokens and banned:
        out.append(MinTokens(params.min_tokens, prompt_len, sorted(banned)))
    if params.logit_bias:
        out.append(LogitBias(params.logit_bias))
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1:
        out.append(Penalties(params, prompt_len, committed))
    return out
