"""Which OpenAI request fields the server honours, per endpoint. The lists are explicit: a field the server
does not implement (tools, audio, ...) gets a 400 naming it rather than being
silently ignored, and a field OpenAI adds later is refused until it is implemented. Chat messages are checked
and their content parts joined here too."""

import math

from orthrus_engines import OrthrusInputError
from orthrus_serve import structured_fields
from orthrus_serve.request_prep import INT64_MAX, INT64_MIN

# OpenAI field -> SamplingParams field (top_k, stop_token_ids, ignore_eos: vLLM's; the last two: ours).
SAMPLING_MAP = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
                "top_p": "top_p", "top_k": "top_k", "seed": "seed", "n": "n", "stop": "stop",
                "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos", "block_size": "block_size",
                "use_diffusion": "use_diffusion",
                # penalties and bias: OpenAI's (logit_bias keys are token ids as strings), then vLLM's extras
                "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                "logit_bias": "logit_bias", "repetition_penalty": "repetition_penalty", "min_tokens": "min_tokens"}
_GENERATE = {"model", "user", "stream", "stream_options", *SAMPLING_MAP}
_GENERATE |= structured_fields.HTTP_FIELDS  # response_format, guided_*: SamplingParams.structured
COMPLETION_FIELDS = frozenset(_GENERATE - {"max_completion_tokens"} | {"prompt", "logprobs"})
CHAT_FIELDS = frozenset(_GENERATE | {"messages", "logprobs", "top_logprobs"})
TOKENIZE_FIELDS = frozenset({"model", "prompt"})
TOKENIZE_CHAT_FIELDS = frozenset({"model", "messages"})
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})

# Fields accepted only at the value that changes nothing (null, OpenAI's "not set", is accepted for any field).
NO_OP_VALUES = {"best_of": 1, "echo": False}
_STRING_FIELDS = ("model", "user")
CHAT_ROLES = ("system", "user", "assistant")


class UnknownModel(Exception):
    """The request names a model this server does not serve (HTTP 404)."""


def check_values(body: dict) -> None:
    """Every value in a JSON body, at any depth, is one the server can carry: text valid Unicode (JSON's
    \\ud800 escapes make lone surrogates, which no tokenizer or UTF-8 encoder takes: refused, not replaced),
    integers within 64 bits, numbers finite (1e999 parses as inf). The first other is named by its path."""
    stack: list[tuple[str, object, object]] = [("", k, v) for k, v in reversed(body.items())]
    while stack:
        parent, key, value = stack.pop()
        if isinstance(key, str):
            _check_text(key, parent or "body")
        if isinstance(value, (str, int, float)):
            if isinstance(value, str):
                _check_text(value, _path(parent, key))
            elif isinstance(value, float) and not math.isfinite(value):
                raise OrthrusInputError(_path(parent, key), "must be a finite number")
            elif isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
                raise OrthrusInputError(_path(parent, key), "is outside the 64-bit integer range")
        elif isinstance(value, list):
            path = _path(parent, key)
            stack.extend((path, i, v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            path = _path(parent, key)
            stack.extend((path, k, v) for k, v in reversed(value.items()))


def _path(parent: str, key) -> str:
    """messages[0].content: a value's path in the body (key: a list index or an object key)."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def _check_text(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise OrthrusInputError(field, f"is not valid Unicode (a lone surrogate at character {e.start})") from None


def _is_no_op(value, no_op) -> bool:
    return isinstance(value, bool) == isinstance(no_op, bool) and value == no_op


def check_fields(body: dict, allowed: frozenset[str]) -> None:
    """Every set field is one the endpoint implements, at a value of the right kind; the first other is named."""
    for field, value in body.items():
        if value is None or field in allowed:
            continue
        if field in NO_OP_VALUES:
            if _is_no_op(value, NO_OP_VALUES[field]) or (field == "best_of" and _is_no_op(value, body.get("n"))):
                continue  # best_of = n: n samples, all returned
            also = " (or n)" if field == "best_of" else ""
            raise OrthrusInputError(field, f"only {NO_OP_VALUES[field]!r}{also} is supported")
        raise OrthrusInputError(field, "is not supported by this server")
    for field in _STRING_FIELDS:
        if body.get(field) is not None and not isinstance(body[field], str):
            raise OrthrusInputError(field, "must be a string")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise OrthrusInputError("stream", "must be true or false")
    include_usage(body)


def logit_bias(value) -> dict[int, float]:
    """OpenAI's logit_bias ({"token id": bias}, keys strings in JSON) with integer keys; the values and the
    vocabulary are SamplingParams' and the request's checks."""
    if not isinstance(value, dict):
        raise OrthrusInputError("logit_bias", "must be an object of token id -> bias")
    bad = next((k for k in value if not (isinstance(k, str) and k.isascii() and k.isdigit())), None)
    if bad is not None:
        raise OrthrusInputError("logit_bias", f"keys must be token ids written as strings, got {bad!r}")
    return {int(k): v for k, v in value.items()}


def include_usage(body: dict) -> bool:
    """stream_options.include_usage (stream_options only with stream: true, as OpenAI has it)."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not body.get("stream"):
        raise OrthrusInputError("stream_options", "is only allowed with stream: true")
    if not isinstance(opts, dict):
        raise OrthrusInputError("stream_options", "must be an object")
    for key, value in opts.items():
        if key != "include_usage" and value is not None:
            raise OrthrusInputError(f"stream_options.{key}", "is not supported by this server")
    if opts.get("include_usage") is not None and not isinstance(opts["include_usage"], bool):
        raise OrthrusInputError("stream_options.include_usage", "must be true or false")
    return bool(opts.get("include_usage"))


def logprobs_request(body: dict, chat: bool) -> int | None:
    """SamplingParams.logprobs from OpenAI's fields: completions `logprobs: n` (alternatives per token);
    chat `logprobs: true` and `top_logprobs: n` (default 0). SamplingParams checks the range."""
    if not chat:
        return body.get("logprobs")
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise OrthrusInputError("logprobs", "must be true or false")
    if top is not None and not wanted:
        raise OrthrusInputError("top_logprobs", "requires logprobs: true")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool)):
        raise OrthrusInputError("top_logprobs", f"must be an integer, got {top!r}")
    return (top or 0) if wanted else None


def check_model(body: dict, served: str) -> None:
    """`model` may be left out; set, it must name the served model."""
    if body.get("model") is not None and body["model"] != served:
        raise UnknownModel(f"The model `{body['model']}` does not exist (this server serves `{served}`).")


def chat_messages(messages, field: str = "messages") -> list[dict]:
    """The conversation as [{role, content: str}]: a content given as parts has its text parts joined
    with newlines (as vLLM joins them); any other part type, role or message key is refused by name."""
    if not isinstance(messages, list) or not messages:
        raise OrthrusInputError(field, "must be a non-empty list of {role, content} objects")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(messages)]


def _message(m, field: str) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m.get("content") is None:
        raise OrthrusInputError(field, "must have string 'role' and 'content'")
    extra = next((k for k, v in m.items() if k not in ("role", "content") and v is not None), None)
    if extra is not None:
        raise OrthrusInputError(f"{field}.{extra}", "is not supported by this server")
    if m["role"] not in CHAT_ROLES:
        raise OrthrusInputError(f"{field}.role", f"{m['role']!r} is not supported (one of {', '.join(CHAT_ROLES)})")
    return {"role": m["role"], "content": _content(m["content"], f"{field}.content")}


def _content(content, field: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise OrthrusInputError(field, "must be a string or a non-empty list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            if isinstance(kind, str):
                raise OrthrusInputError(f"{field}[{j}].type", f"{kind!r} content parts are not supported (only 'text')")
            raise OrthrusInputError(f"{field}[{j}]", "must be a {type, ...} object")
        extra = next((k for k, v in part.items() if k not in ("type", "text") and v is not None), None)
        if extra is not None:
            raise OrthrusInputError(f"{field}[{j}].{extra}", "is not supported by this server")
        if not isinstance(part.get("text"), str):
            raise OrthrusInputError(f"{field}[{j}].text", "must be a string")
        texts.append(part["text"])
    return "\n".join(texts)
