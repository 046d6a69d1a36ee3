from dataclasses import dataclass, field, replace

# The request's counters, by the one name each has everywhere: here, in the gRPC response, in the
# OpenAI usage object ("orthrus" extension), the CLIs' JSON and the benchmarks.
COUNTERS = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "forward_passes", "drafted_tokens",
            "accepted_tokens")
# Counted once per request whatever its n (as OpenAI's usage counts the prompt once); the others are summed.
PROMPT_COUNTERS = ("prompt_tokens", "cached_prompt_tokens")


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
    the previous output) of one of its samples, `index`. From `LLM.generate`: the whole result. Counters
    are totals so far (a delta's: its sample's)."""

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
    index: int = 0  # which of the request's n samples (vLLM's CompletionOutput.index)
    # LLM.generate: every sample's whole result, by index (vLLM's RequestOutput.outputs); the fields above
    # are sample 0's, the counters the request's. Empty in deltas.
    outputs: list["RequestOutput"] = field(default_factory=list)

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


class RequestAccumulator:
    """One request's deltas gathered into each sample's whole result and the request's (`result`)."""

    def __init__(self) -> None:
        self.samples: dict[int, RequestOutput] = {}

    def add(self, delta: RequestOutput) -> None:
        acc = self.samples.get(delta.index)
        if acc is None:
            self.samples[delta.index] = replace(delta, token_ids=list(delta.token_ids),
                                                logprobs=None if delta.logprobs is None else list(delta.logprobs))
            return
        text, tokens, logprobs = acc.text + delta.text, acc.token_ids, acc.logprobs
        tokens.extend(delta.token_ids)
        if logprobs is not None:
            logprobs.extend(delta.logprobs or [])
        acc.__dict__.update(delta.__dict__)
        acc.text, acc.token_ids, acc.logprobs = text, tokens, logprobs

    def counters(self) -> dict[str, int]:
        """The request's counters: the prompt's once (its first sample's, the one that prefilled it), the
        others summed over the samples (forward_passes too: completion / passes stays tokens per pass)."""
        first = self.samples[min(self.samples)]
        return {name: getattr(first, name) if name in PROMPT_COUNTERS else
                sum(getattr(s, name) for s in self.samples.values()) for name in COUNTERS}

    def result(self) -> RequestOutput:
        """Sample 0's result (the whole of it for n = 1) with the request's counters and every sample in
        `outputs`; finished once every sample is."""
        samples = [self.samples[i] for i in sorted(self.samples)]
        return replace(samples[0], finished=all(s.finished for s in samples), outputs=samples, **self.counters())
