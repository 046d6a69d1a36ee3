from dataclasses import dataclass, field

from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.structured import check_spec


@dataclass
class SamplingParams:
    """How to decode one request. temperature 0 = greedy; top_k 0 or -1 = off; top_p 1 = off."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Orthrus: None = the engine's draft length; 1 = plain AR for this request.
    block_size: int | None = None
    use_diffusion: bool = True
    # Offline use: callables (history, logits [V]) -> logits [V] applied to every AR and draft row alike.
    logits_processors: list = field(default_factory=list)
    # Structured output: one {kind: value}, kind json | json_object | regex | choice | grammar (structured.py).
    structured: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise OrthrusInputError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not is_num(self.temperature) or not self.temperature >= 0:
            raise OrthrusInputError("temperature", f"must be a number >= 0, got {self.temperature!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise OrthrusInputError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise OrthrusInputError("top_k", f"must be an integer >= -1 (0 or -1: off), got {self.top_k!r}")
        if self.seed is not None and not is_int(self.seed):
            raise OrthrusInputError("seed", f"must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise OrthrusInputError("stop", f"must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list) or not all(is_int(t) for t in self.stop_token_ids):
            raise OrthrusInputError("stop_token_ids", f"must be a list of integers, got {self.stop_token_ids!r}")
        if not isinstance(self.logits_processors, list) or not all(map(callable, self.logits_processors)):
            raise OrthrusInputError("logits_processors", "must be a list of callables (history, logits) -> logits")
        if self.structured is not None:
            check_spec(self.structured)
        if self.block_size is not None and (not is_int(self.block_size) or self.block_size < 1):
            raise OrthrusInputError("block_size", f"must be an integer >= 1, got {self.block_size!r}")

    @property
    def greedy(self) -> bool:
        """Temperatures this small are greedy (dividing logits by them overflows float32)."""
        return self.temperature < 1e-5
