import math
from dataclasses import dataclass, field, replace

from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.outputs import MAX_LOGPROBS
from orthrus_engines.structured import check_spec

MAX_N = 128  # the most samples one request may ask for
MAX_LOGIT_BIAS = 300  # entries in logit_bias (as OpenAI limits it)


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
    # Log probabilities of the output tokens and this many alternatives each (0: the tokens' own only).
    logprobs: int | None = None
    # Penalties and bias (engine/penalties.py), applied before temperature as vLLM applies them.
    presence_penalty: float = 0.0  # OpenAI: minus this for each token the output holds; [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output; [-2, 2]
    repetition_penalty: float = 1.0  # vLLM / HF: prompt and output tokens' logits > 0 / it, else * it
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, [-100, 100]
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are generated
    # Offline use: callables (history, logits [V]) -> logits [V] applied to every AR and draft row alike.
    logits_processors: list = field(default_factory=list)
    # Samples of the prompt (vLLM's and OpenAI's n): sample i is seeded with seed + i (as vLLM seeds them).
    n: int = 1
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
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise OrthrusInputError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.structured is not None:
            check_spec(self.structured)
        if self.block_size is not None and (not is_int(self.block_size) or self.block_size < 1):
            raise OrthrusInputError("block_size", f"must be an integer >= 1, got {self.block_size!r}")
        if not is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise OrthrusInputError("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_num(value) or not -2 <= value <= 2:
                raise OrthrusInputError(name, f"must be a number in [-2, 2], got {value!r}")
        if not is_num(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise OrthrusInputError("repetition_penalty", f"must be > 0 (1: off), got {self.repetition_penalty!r}")
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise OrthrusInputError("logit_bias", f"must be an object of at most {MAX_LOGIT_BIAS} token id -> bias")
        for token, bias in self.logit_bias.items():
            if not is_int(token) or token < 0:
                raise OrthrusInputError("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
            if not is_num(bias) or not -100 <= bias <= 100:
                raise OrthrusInputError("logit_bias", f"bias of token {token} must be in [-100, 100], got {bias!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise OrthrusInputError("min_tokens", f"must be an integer in [0, max_tokens], got {self.min_tokens!r}")

    def sample_params(self, index: int) -> "SamplingParams":
        """The params of sample `index` of an n > 1 request: n = 1 and, with a seed, seed + index."""
        seed = self.seed + index if self.seed is not None else None
        return replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        """Temperatures this small are greedy (dividing logits by them overflows float32)."""
        return self.temperature < 1e-5
