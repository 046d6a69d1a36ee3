from dataclasses import dataclass


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
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_forward_passes: int = 0  # every pass this request took part in: prefill, draft, verify
    num_drafted_tokens: int = 0  # draft tokens proposed by the diffusion view
    num_accepted_tokens: int = 0  # drafts the AR view accepted (counted before a stop cuts the block)
    num_output_tokens: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return self.num_output_tokens / max(self.num_forward_passes, 1)
