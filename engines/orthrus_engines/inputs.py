"""Request preparation, written once: the engine, `LLM`, the serving ingress and training all turn
prompts and chat conversations into token ids here, with the same checks and the same messages."""

from pathlib import Path

from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.sampling_params import SamplingParams
from orthrus_engines.validation import check_budget, check_logit_bias, check_stop_token_ids, check_token_ids

Prompt = str | list[int] | dict  # text, token ids, or {"prompt": ...} / {"prompt_token_ids": [...]}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: Path):
    """The HF tokenizer in a local directory, or None where the directory has none."""
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(path))


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt in any of its forms."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return self.token_ids(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise OrthrusInputError("prompt", "a dict prompt needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return self.text_ids(prompt)
        if isinstance(prompt, (list, tuple)):
            return self.token_ids(prompt)
        raise OrthrusInputError("prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}")

    def text_ids(self, text, field: str = "prompt") -> list[int]:
        if not isinstance(text, str):
            raise OrthrusInputError(field, f"must be a string, got {type(text).__name__}")
        if not text:
            raise OrthrusInputError(field, "must not be empty")
        if self.tokenizer is None:
            raise OrthrusInputError(field, "this model has no tokenizer: pass token ids")
        return self.token_ids(self.tokenizer(text)["input_ids"], field)

    def token_ids(self, ids, field: str = "prompt_token_ids") -> list[int]:
        return check_token_ids(ids, field, self.vocab_size, self.max_model_len)

    def chat_ids(self, messages, field: str = "messages") -> list[int]:
        """Token ids of one conversation ([{role, content}, ...]) through the model's chat template,
        ready for the assistant's answer."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise OrthrusInputError(field, "this model has no chat template")
        if not isinstance(messages, list) or not messages:
            raise OrthrusInputError(field, "must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise OrthrusInputError(f"{field}[{i}]", "must have string 'role' and 'content'")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return self.token_ids(list(out["input_ids"]), field)

    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        """What a prompt and its params must satisfy together (each was checked on its own before)."""
        check_budget(len(ids), params.max_tokens, self.max_model_len)
        if params.stop and self.tokenizer is None:
            raise OrthrusInputError("stop", "stop strings need a tokenizer")
        check_stop_token_ids(params.stop_token_ids, self.vocab_size)
        check_logit_bias(params.logit_bias, self.vocab_size)
