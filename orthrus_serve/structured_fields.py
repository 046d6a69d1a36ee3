"""Structured output requests on the wire, as `SamplingParams.structured` (orthrus_engines.structured).

HTTP: OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema"}) or one of vLLM's
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (a Lark grammar); gRPC: the GenerateRequest's
`guided_*` fields. At most one per request; a bad value (a schema or regex the grammar library cannot compile
included) is an OrthrusInputError naming the request's own field."""

from orthrus_engines import OrthrusInputError
from orthrus_engines.structured import grammar_of

# request field -> the structured kind it sets (response_format: by its type)
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
HTTP_FIELDS = frozenset({"response_format", *GUIDED})
_SCHEMA_KEYS = ("name", "schema", "strict", "description")


def from_http(body: dict) -> dict | None:
    """The body's structured-output spec, checked; None without one."""
    given = [f for f in ("response_format", *GUIDED) if body.get(f) is not None]
    if len(given) > 1:
        raise OrthrusInputError(given[1], f"give one structured-output option, not {given[0]} too")
    if not given:
        return None
    field = given[0]
    if field != "response_format":
        return _checked(GUIDED[field], body[field], field)
    return _response_format(body[field])


def from_grpc(request) -> dict | None:
    """A GenerateRequest's structured-output spec (its guided_* fields), checked; None without one."""
    given = {f: getattr(request, f) for f in (*GUIDED, "guided_json_object") if getattr(request, f)}
    if len(given) > 1:
        first, second = list(given)[:2]
        raise OrthrusInputError(second, f"give one structured-output option, not {first} too")
    if not given:
        return None
    field, value = next(iter(given.items()))
    if field == "guided_json_object":
        return {"json_object": True}
    return _checked(GUIDED[field], list(value) if field == "guided_choice" else value, field)


def _response_format(fmt) -> dict | None:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise OrthrusInputError("response_format", "must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}")
    kind = fmt["type"]
    extra = next((k for k, v in fmt.items() if k not in ("type", "json_schema") and v is not None), None)
    if extra is None and kind != "json_schema" and fmt.get("json_schema") is not None:
        extra = "json_schema"
    if extra is not None:
        raise OrthrusInputError(f"response_format.{extra}", f"is not a field of type {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    spec = fmt.get("json_schema")
    field = "response_format.json_schema"
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise OrthrusInputError(field, "must be an object with a string 'name' and a 'schema'")
    extra = next((k for k, v in spec.items() if k not in _SCHEMA_KEYS and v is not None), None)
    if extra is not None:
        raise OrthrusInputError(f"{field}.{extra}", "is not supported by this server")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise OrthrusInputError(f"{field}.strict", "must be true or false")  # strict or not, the schema is enforced
    if spec.get("schema") is None:
        raise OrthrusInputError(f"{field}.schema", "is required (a JSON schema)")
    return _checked("json", spec["schema"], f"{field}.schema")


def _checked(kind: str, value, field: str) -> dict:
    grammar_of(kind, value, field)  # raises naming `field`; compiled once, the engine reuses it
    return {kind: value}
