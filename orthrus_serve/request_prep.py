"""What the ingress adds to request preparation: a request id, the sampling params built and checked
once (a `SamplingParams` the replica uses as is) and the prompt's page hashes for routing.
Tokenizing, chat templates and the token-id checks are `orthrus_engines.inputs.InputProcessor`'s.

Everything raises OrthrusInputError naming the field, which the ingress maps to gRPC
INVALID_ARGUMENT or HTTP 400.
"""

import math
import uuid
from dataclasses import dataclass
from pathlib import Path

from orthrus_engines import OrthrusInputError, SamplingParams
from orthrus_engines.inputs import InputProcessor, load_tokenizer
from orthrus_engines.prefix_hash import page_hashes
from orthrus_engines.validation import check_token_ids
from orthrus_serve.config import InputLimits

# The sampling fields a request may set (the gRPC GenerateRequest's and the OpenAI body's, mapped).
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "block_size", "use_diffusion", "n", "logprobs", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens")
STRUCTURED = "structured"  # set from response_format / guided_* (structured_fields), not a field of its own


@dataclass
class PreparedRequest:
    request_id: str
    token_ids: list[int]
    params: SamplingParams  # checked here; the replica passes it to its engine as is
    page_hashes: list[str]


_BOOL_FIELDS = ("ignore_eos", "use_diffusion")
_FLOAT_FIELDS = ("temperature", "top_p")
_INT64_FIELDS = ("max_tokens", "top_k", "seed", "block_size")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def check_limits(fields: dict, limits: InputLimits) -> None:
    """What SamplingParams leaves to the server: flags that are booleans, finite numbers (a gRPC float may be
    inf or nan), integers within 64 bits, and the limits on stop strings and stop token ids."""
    for name in _BOOL_FIELDS:
        if name in fields and not isinstance(fields[name], bool):
            raise OrthrusInputError(name, f"must be true or false, got {fields[name]!r}")
    for name in _FLOAT_FIELDS:
        if isinstance(fields.get(name), float) and not math.isfinite(fields[name]):
            raise OrthrusInputError(name, f"must be a finite number, got {fields[name]!r}")
    for name in _INT64_FIELDS:
        value = fields.get(name)
        if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
            raise OrthrusInputError(name, "is outside the 64-bit integer range")
    stop, stop_ids = fields.get("stop"), fields.get("stop_token_ids")
    if isinstance(stop, list):
        if len(stop) > limits.max_stop_strings:
            raise OrthrusInputError("stop", f"{len(stop)} stop strings: at most {limits.max_stop_strings} "
                                            "(limits.max_stop_strings)")
        longest = max((len(s) for s in stop if isinstance(s, str)), default=0)
        if longest > limits.max_stop_string_chars:
            raise OrthrusInputError("stop", f"a stop string of {longest} characters: at most "
                                            f"{limits.max_stop_string_chars} (limits.max_stop_string_chars)")
    if isinstance(stop_ids, list) and len(stop_ids) > limits.max_stop_token_ids:
        raise OrthrusInputError("stop_token_ids", f"{len(stop_ids)} stop token ids: at most "
                                                  f"{limits.max_stop_token_ids} (limits.max_stop_token_ids)")


def sampling_params(fields: dict, limits: InputLimits | None = None) -> SamplingParams:
    """A request's sampling fields as checked SamplingParams; an unknown field is named in the error."""
    unknown = set(fields) - set(SAMPLING_FIELDS) - {STRUCTURED}
    if unknown:
        raise OrthrusInputError(sorted(unknown)[0], "unknown sampling field")
    check_limits(fields, limits or InputLimits())
    try:
        return SamplingParams(**fields)
    except TypeError as e:
        raise OrthrusInputError("params", str(e)) from None


class RequestPreparer:
    """Built from an engine replica's `model_info()`, with the tokenizer that replica's engine uses."""

    def __init__(self, info: dict, limits: InputLimits | None = None):
        self.limits = limits or InputLimits()
        self.inputs = InputProcessor(load_tokenizer(Path(info["tokenizer"])), info["vocab_size"],
                                     info["max_model_len"])
        self.page_size = info["page_size"]
        self.fingerprint = info["prefix_fingerprint"]

    def prepare(self, token_ids: list[int], params: dict, request_id: str | None = None) -> PreparedRequest:
        """`token_ids`: from `self.inputs` (checked there); `params`: the request's sampling fields."""
        sp = sampling_params(params, self.limits)
        self.inputs.check_request(token_ids, sp)
        # The engine caches all but the last prompt token: those are the pages a replica can hold.
        hashes = page_hashes(token_ids[:-1], self.page_size, self.fingerprint)
        return PreparedRequest(request_id or uuid.uuid4().hex, token_ids, sp, hashes)

    def token_text(self, token_id: int) -> str:
        """One token's text (its id in brackets for a model without a tokenizer)."""
        tok = self.inputs.tokenizer
        return tok.decode([token_id]) if tok is not None else f"<{token_id}>"

    def detokenize(self, tokens, field: str = "tokens") -> str:
        """The text of token ids in the vocabulary (any number of them: an output may fill the window)."""
        if tokens == []:
            return ""
        ids = check_token_ids(tokens, field, self.inputs.vocab_size, math.inf)  # no window limit here
        if self.inputs.tokenizer is None:
            raise OrthrusInputError(field, "this model has no tokenizer")
        return self.inputs.tokenizer.decode(ids)
