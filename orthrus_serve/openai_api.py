"""OpenAI-compatible request parsing and response shapes (completions, chat, models)."""

import json
import time
import uuid

from collections.abc import Callable

from orthrus_engines import OrthrusInputError, RequestOutput
from orthrus_engines.outputs import COUNTERS, TokenLogprob
from orthrus_serve import structured_fields
from orthrus_serve.openai_fields import SAMPLING_MAP, logit_bias, logprobs_request, check_values


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_body(raw: bytes) -> dict:
    """The request's JSON object, its values checked (openai_fields.check_values). Not JSON: NaN and
    Infinity (Python's extensions), integers past Python's 4300 digits, nesting past its recursion limit."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise OrthrusInputError("body", f"not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise OrthrusInputError("body", "must be a JSON object")
    check_values(body)
    return body


def sampling_fields(body: dict, room: int, chat: bool = False) -> dict:
    """The body's sampling fields under SamplingParams' names (request_prep.sampling_params checks them).
    `room`: what the window leaves after the prompt, the max_tokens of a request that sets none (as vLLM)."""
    params = {ours: body[theirs] for theirs, ours in SAMPLING_MAP.items() if body.get(theirs) is not None}
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    if "logit_bias" in params:
        params["logit_bias"] = logit_bias(params["logit_bias"])
    params.setdefault("max_tokens", room)
    if (logprobs := logprobs_request(body, chat)) is not None:
        params["logprobs"] = logprobs
    if (structured := structured_fields.from_http(body)) is not None:
        params["structured"] = structured
    return params


TokenText = Callable[[int], str]  # a token id's text
LogprobsOf = Callable[[RequestOutput], dict | None]  # a sample's logprobs object, if the request asked


def completion_logprobs(lps: list[TokenLogprob], text: TokenText, offset: int = 0) -> dict:
    """The completions API's logprobs object; text_offset counts from `offset` in the completion's text."""
    tokens = [text(lp.token_id) for lp in lps]
    offsets = [offset + sum(map(len, tokens[:i])) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}


def chat_logprobs(lps: list[TokenLogprob], text: TokenText) -> dict:
    """The chat API's logprobs object: per token its text, logprob, UTF-8 bytes and top alternatives."""
    def entry(token_id: int, logprob: float) -> dict:
        s = text(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


def completion_prompt(body: dict):
    """A string or a list of token ids (one prompt per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
        return prompt
    raise OrthrusInputError("prompt", "must be a string or a list of token ids")


# Counters with a place in OpenAI's usage object; the others go in its "orthrus" extension.
_OPENAI_USAGE = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")


def usage(counters: dict[str, int]) -> dict:
    """OpenAI's usage object of a request's counters (`RequestOutput.counters()`)."""
    return {"prompt_tokens": counters["prompt_tokens"], "completion_tokens": counters["completion_tokens"],
            "total_tokens": counters["prompt_tokens"] + counters["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": counters["cached_prompt_tokens"]},
            "orthrus": {name: counters[name] for name in COUNTERS if name not in _OPENAI_USAGE}}


def usage_counters(obj: dict) -> dict[str, int]:
    """The counters back from a usage object (what a client reads; absent ones are 0)."""
    ext = obj.get("orthrus", {})
    return {name: ext.get(name, 0) for name in COUNTERS if name not in _OPENAI_USAGE} | {
        "prompt_tokens": obj.get("prompt_tokens", 0), "completion_tokens": obj.get("completion_tokens", 0),
        "cached_prompt_tokens": obj.get("prompt_tokens_details", {}).get("cached_tokens", 0)}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_response(rid: str, model: str, result: RequestOutput, logprobs: LogprobsOf = lambda s: None) -> dict:
    """`result`: the whole request (`RequestAccumulator.result()`), a choice per sample."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": s.index, "text": s.text, "finish_reason": s.finish_reason, "logprobs": logprobs(s)}
                        for s in result.outputs],
            "usage": usage(result.counters())}


def completion_chunk(rid: str, model: str, delta: RequestOutput, include_usage: bool,
                     logprobs: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": [{"index": delta.index, "text": delta.text, "finish_reason": delta.finish_reason,
                          "logprobs": logprobs}]}
    return chunk | ({"usage": None} if include_usage else {})


def chat_response(rid: str, model: str, result: RequestOutput, logprobs: LogprobsOf = lambda s: None) -> dict:
    """`result`: the whole request (`RequestAccumulator.result()`), a choice per sample."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": s.index, "message": {"role": "assistant", "content": s.text},
                         "finish_reason": s.finish_reason, "logprobs": logprobs(s)} for s in result.outputs],
            "usage": usage(result.counters())}


def chat_chunk(rid: str, model: str, delta: RequestOutput | None, include_usage: bool, index: int = 0,
               logprobs: dict | None = None) -> dict:
    """delta None: the opening chunk of choice `index`, which names the role."""
    if delta is None:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    else:
        choice = {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
                  "finish_reason": delta.finish_reason, "logprobs": logprobs}
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [choice]}
    return chunk | ({"usage": None} if include_usage else {})


def usage_chunk(rid: str, model: str, chat: bool, counters: dict[str, int]) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the request's usage
    (`counters`: `RequestAccumulator.counters()`)."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": usage(counters)}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def error_body(message: str, field: str | None, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": field, "code": code}}
