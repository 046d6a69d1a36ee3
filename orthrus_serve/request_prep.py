"""What the ingress does once per request: validate, tokenize, hash the prompt's blocks.

Everything raises OrthrusInputError naming the field, which the ingress maps to gRPC
INVALID_ARGUMENT or HTTP 400.
"""

import uuid
from dataclasses import dataclass

from orthrus_engines import OrthrusInputError, SamplingParams
from orthrus_engines.prefix_hash import page_hashes
from orthrus_engines.validation import check_budget, check_stop_token_ids, check_token_ids

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "block_size", "use_diffusion")


@dataclass
class PreparedRequest:
    request_id: str
    token_ids: list[int]
    params: dict  # SamplingParams fields, validated
    page_hashes: list[str]


class RequestPreparer:
    def __init__(self, tokenizer, info: dict):
        self.tokenizer = tokenizer
        self.vocab_size = info["vocab_size"]
        self.max_model_len = info["max_model_len"]
        self.page_size = info["page_size"]
        self.fingerprint = info["prefix_fingerprint"]

    def tokenize_text(self, text, field: str = "prompt") -> list[int]:
        if not isinstance(text, str):
            raise OrthrusInputError(field, f"must be a string, got {type(text).__name__}")
        if not text:
            raise OrthrusInputError(field, "must not be empty")
        return self.tokenizer(text)["input_ids"]

    def chat_ids(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise OrthrusInputError("messages", "must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise OrthrusInputError(f"messages[{i}]", "must have string 'role' and 'content'")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def prepare(self, token_ids: list[int], params: dict, request_id: str | None = None,
                field: str = "prompt_token_ids") -> PreparedRequest:
        ids = check_token_ids(token_ids, field, self.vocab_size, self.max_model_len)
        unknown = set(params) - set(SAMPLING_FIELDS)
        if unknown:
            raise OrthrusInputError(sorted(unknown)[0], "unknown sampling field")
        try:
            sp = SamplingParams(**params)
        except TypeError as e:
            raise OrthrusInputError("params", str(e)) from None
        check_budget(len(ids), sp.max_tokens, self.max_model_len)
        check_stop_token_ids(sp.stop_token_ids, self.vocab_size)
        # The engine caches all but the last prompt token: those are the blocks a replica can hold.
        hashes = page_hashes(ids[:-1], self.page_size, self.fingerprint)
        return PreparedRequest(request_id or uuid.uuid4().hex, ids, params, hashes)
