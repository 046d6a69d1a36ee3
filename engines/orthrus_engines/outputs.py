from dataclasses import dataclass

# The request's counters, by the one name each has everywhere: here, in the gRPC response, in the
# OpenAI usage object ("orthrus" extension), the CLIs' JSON and the benchmarks.
COUNTERS = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "forward_passes", "drafted_tokens",
            "accepted_tokens")


MAX_LOGPROBS = 20  # the most alternatives a request may ask for per token (OpenAI's chat limit)


@dataclass
class TokenLogprob:
    """An output token's log probability under the AR view's distribution (after the request's processing,
    temperature, top-k and top-p; greedy: the model's own log-softmax), and the `top` most likely tokens at
    its position, best first (tokens that top-k / top-p drop are never among them)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """What a request produced. From `AsyncEngine.generate`: a delta (the new tokens and text since
    the previous output). From `LLM.generate`: the whole result. Counters are totals so far."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    forward_passes: int = 0  # every pass this request took part in: prefill, draft, verify
    drafted_tokens: int = 0  # draft tokens proposed by the diffusion view
    accepted_tokens: int = 0  # drafts the AR view accepted (counted before a stop cuts the block)
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, if the request asked for them

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}
