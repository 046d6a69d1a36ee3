from dataclasses import dataclass

# The request's counters, by the one name each has everywhere: here, in the gRPC response, in the
# OpenAI usage object ("orthrus" extension), the CLIs' JSON and the benchmarks.
COUNTERS = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "forward_passes", "drafted_tokens",
            "accepted_tokens")


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

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}
