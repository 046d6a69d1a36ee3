"""Request checks shared by the engine and the serving layer's ingress (same messages everywhere)."""

from orthrus_engines.errors import OrthrusInputError


def check_token_ids(ids, field: str, vocab_size: int, max_model_len: int) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise OrthrusInputError(field, "must be a list of integers")
    if not ids:
        raise OrthrusInputError(field, "must not be empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise OrthrusInputError(field, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise OrthrusInputError(field, f"{len(ids)} tokens leave no room in the model's window of {max_model_len}")
    return list(ids)


def check_budget(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    if prompt_tokens + max_tokens > max_model_len:
        raise OrthrusInputError(
            "max_tokens", f"prompt ({prompt_tokens}) + max_tokens ({max_tokens}) exceeds the window of {max_model_len}")


def check_stop_token_ids(ids: list[int], vocab_size: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise OrthrusInputError("stop_token_ids", f"token id {bad[0]} is outside the vocabulary")


def check_logit_bias(bias: dict[int, float], vocab_size: int) -> None:
    bad = [t for t in bias if not 0 <= t < vocab_size]
    if bad:
        raise OrthrusInputError("logit_bias", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
