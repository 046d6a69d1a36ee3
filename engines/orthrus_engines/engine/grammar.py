"""Structured output in the engine: a grammar (orthrus_engines.structured, llguidance) as a logits processor
(engine/logits_processors.py) that masks every token the grammar forbids after the row's history.

The AR rows and the draft rows are processed at the same histories, so a draft that would leave the grammar
is never drawn and the AR's own choice is always in it: drafting stays exact with respect to the constrained
distribution. EOS is allowed only where the grammar may end (an EOS then ends the request, even with
ignore_eos), and padding ids past the tokenizer's vocabulary are always masked.
"""

import threading
from collections import OrderedDict

import torch

from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.structured import check_spec

_LL_TOKENIZERS: dict[tuple, object] = {}  # llguidance's view of a tokenizer, ~0.25 s to build: once per process
_LL_LOCK = threading.Lock()


class Grammars:
    """An engine's grammars: each distinct spec compiled once (requests often share a schema), a matcher
    per request copied from it."""

    def __init__(self, tokenizer, tokenizer_key: str, vocab_size: int, eos_ids: set[int], capacity: int = 64):
        self.tokenizer = tokenizer  # the HF tokenizer (None: structured output is refused)
        self.key = (tokenizer_key, tuple(sorted(eos_ids)))
        self.vocab_size = vocab_size  # the model's (maybe padded) vocabulary: the logits' width
        self.eos_ids = sorted(t for t in eos_ids if t < vocab_size)
        self.capacity = capacity
        self.compiled: OrderedDict[tuple[str, str], object] = OrderedDict()

    def ll_tokenizer(self):
        from llguidance import LLTokenizer

        with _LL_LOCK:
            if self.key not in _LL_TOKENIZERS:
                n_vocab = len(self.tokenizer)  # with added tokens
                eos = [t for t in self.key[1] if t < n_vocab] or None
                _LL_TOKENIZERS[self.key] = LLTokenizer(self.tokenizer.backend_tokenizer.to_str(), n_vocab=n_vocab,
                                                       eos_token=eos)
            return _LL_TOKENIZERS[self.key]

    def processor(self, spec: dict, prompt_len: int) -> "GrammarProcessor":
        """A new request's processor: its own matcher, at the start of the output."""
        if self.tokenizer is None or not hasattr(self.tokenizer, "backend_tokenizer"):
            raise OrthrusInputError("structured", "structured output needs the model's (fast) tokenizer")
        if not self.eos_ids:
            raise OrthrusInputError("structured", "structured output needs a model with an EOS token")
        from llguidance import LLMatcher

        kind, grammar = check_spec(spec)
        key = (kind, grammar)
        template = self.compiled.pop(key, None)
        if template is None:
            template = LLMatcher(self.ll_tokenizer(), grammar, log_level=0)
            if template.is_error():
                raise OrthrusInputError(f"structured.{kind}", template.get_error())
        self.compiled[key] = template  # the most recently used last
        while len(self.compiled) > self.capacity:
            self.compiled.popitem(last=False)
        return GrammarProcessor(template.deep_copy(), prompt_len, self.vocab_size, self.eos_ids)


class GrammarProcessor:
    """(history, logits [V]) -> logits with -inf where the grammar forbids the next token. Its matcher follows
    the output part of whatever history it is given (committed tokens, then a block's drafts): it rolls back
    to the longest common prefix with what it has consumed and consumes the rest, so AR rows, draft rows,
    rejected drafts and a recompute after preemption all see the grammar state of their own history."""

    def __init__(self, matcher, prompt_len: int, vocab_size: int, eos_ids: list[int]):
        self.matcher = matcher
        self.prompt_len = prompt_len
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.consumed: list[int] = []  # the output tokens the matcher has consumed, in order

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~self.allowed(history).to(logits.device), float("-inf"))

    def allowed(self, history: list[int]) -> torch.Tensor:
        """[V] bool: the tokens the grammar allows after `history`. A history the grammar cannot follow (only
        rows after an EOS, whose tokens are never committed) allows EOS only, so no row is all -inf."""
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        if self._follow(history[self.prompt_len :]):
            bias = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)
            n = min(len(bias), self.vocab_size)  # ids past the tokenizer's vocabulary stay masked
            allowed[:n] = bias[:n] > 0
        if not allowed.any():
            allowed[self.eos_ids] = True
        return allowed

    def _follow(self, output: list[int]) -> bool:
        """Bring the matcher to `output`; False where the grammar cannot consume all of it."""
        n = _common_prefix(self.consumed, output)
        if n < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - n)
            del self.consumed[n:]
        rest = output[n:]
        if not rest:
            return True
        ok = self.matcher.validate_tokens(rest)
        if ok:
            self.matcher.consume_tokens(rest[:ok])
            self.consumed += rest[:ok]
        return ok == len(rest)


def _common_prefix(a: list[int], b: list[int]) -> int:
    if b[: len(a)] == a:  # the usual case: b goes on from a
        return len(a)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
