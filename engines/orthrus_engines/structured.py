"""Structured output requests: `SamplingParams.structured` is one {kind: value} of

  json         a JSON schema (an object, or its JSON text): the output is JSON that validates against it
  json_object  true: the output is a JSON object
  regex        the output matches the regular expression (Rust `regex` syntax)
  choice       a non-empty list of strings: the output is one of them
  grammar      a Lark grammar (llguidance's format)

each checked here and turned into an llguidance grammar (the engine compiles it: engine/grammar.py). A
value of the wrong shape, a schema or regex llguidance cannot compile: OrthrusInputError naming the field.
"""

import functools
import json

from orthrus_engines.errors import OrthrusInputError

KINDS = ("json", "json_object", "regex", "choice", "grammar")


def check_spec(spec, field: str = "structured") -> tuple[str, str]:
    """(kind, the llguidance grammar) of a structured-output spec; raises naming `field` or `field.kind`."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise OrthrusInputError(field, f"must be one {{kind: value}} with kind one of {', '.join(KINDS)}; got {spec!r}")
    kind, value = next(iter(spec.items()))
    return kind, grammar_of(kind, value, f"{field}.{kind}")


def grammar_of(kind: str, value, field: str) -> str:
    """The llguidance grammar of one kind's value, checked (compiled once per distinct value)."""
    grammar, error = _grammar(kind, _canonical(kind, value, field))
    if error:
        raise OrthrusInputError(field, error)
    return grammar


def _canonical(kind: str, value, field: str) -> str:
    """The value as a string (the cache key), after checking its shape."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise OrthrusInputError(field, f"not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise OrthrusInputError(field, "must be a JSON schema (an object)")
        return json.dumps(value)  # the properties in their order: the output follows it
    if kind == "json_object":
        if value is not True:
            raise OrthrusInputError(field, "must be true")
        return ""
    if kind in ("regex", "grammar"):
        if not isinstance(value, str) or not value:
            raise OrthrusInputError(field, "must be a non-empty string")
        return value
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise OrthrusInputError(field, "must be a non-empty list of non-empty strings")
    return json.dumps(value)


@functools.lru_cache(maxsize=256)
def _grammar(kind: str, text: str) -> tuple[str, str]:
    """(grammar, "") or ("", llguidance's error)."""
    from llguidance import LLMatcher

    if kind == "json":
        grammar = LLMatcher.grammar_from_json_schema(text)
    elif kind == "json_object":
        grammar = LLMatcher.grammar_from_json_schema({"type": "object"})
    elif kind == "regex":
        grammar = LLMatcher.grammar_from_regex(text)
    elif kind == "grammar":
        grammar = LLMatcher.grammar_from_lark(text)
    else:  # choice: Lark string literals (JSON's escapes)
        grammar = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(text)))
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    return ("", messages[0]) if failed else (grammar, "")
