"""Structured output on the wire without Ray: OpenAI's response_format and vLLM's guided_* fields (HTTP), the
GenerateRequest's guided_* fields (gRPC), as SamplingParams.structured; one option per request; a bad value,
a schema or regex the grammar library refuses included, names the request's own field."""

import pytest

from orthrus_engines import OrthrusInputError
from orthrus_serve import openai_api as oai
from orthrus_serve import openai_fields as fields
from orthrus_serve import structured_fields as sf
from orthrus_serve.api import orthrus_pb2 as pb
from orthrus_serve.grpc_api import sampling_fields
from orthrus_serve.request_prep import sampling_params

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,spec", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     {"json": SCHEMA}),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"response_format": {"type": "text"}}, None),
    ({"guided_json": SCHEMA}, {"json": SCHEMA}),
    ({"guided_regex": "[0-9]+"}, {"regex": "[0-9]+"}),
    ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
    ({"guided_grammar": 'start: "a"+'}, {"grammar": 'start: "a"+'}),
    ({}, None)])
def test_http_structured_output_becomes_sampling_params(body, spec):
    for allowed in (fields.CHAT_FIELDS, fields.COMPLETION_FIELDS):
        fields.check_fields({"messages": USER, **body} if allowed is fields.CHAT_FIELDS else body, allowed)
    params = sampling_params(oai.sampling_fields(body, room=8))
    assert params.structured == spec


@pytest.mark.parametrize("body,field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "extra": 1}}},
     "response_format.json_schema.extra"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": "y"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_object", "json_schema": {}}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_json": "{nope"}, "guided_json"),
    ({"guided_choice": "yes"}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_json": SCHEMA}, "guided_json")])
def test_http_bad_structured_output_names_its_field(body, field):
    with pytest.raises(OrthrusInputError) as e:
        oai.sampling_fields(body, room=8)
    assert e.value.field == field


@pytest.mark.parametrize("request_fields,spec", [
    (dict(guided_json='{"type": "object"}'), {"json": '{"type": "object"}'}),
    (dict(guided_json_object=True), {"json_object": True}),
    (dict(guided_regex="[0-9]+"), {"regex": "[0-9]+"}),
    (dict(guided_choice=["yes", "no"]), {"choice": ["yes", "no"]}),
    (dict(guided_grammar='start: "a"'), {"grammar": 'start: "a"'}),
    (dict(), None)])
def test_grpc_structured_output_becomes_sampling_params(request_fields, spec):
    params = sampling_params(sampling_fields(pb.GenerateRequest(prompt="hi", **request_fields)))
    assert params.structured == spec


@pytest.mark.parametrize("request_fields,field", [
    (dict(guided_json='{"type": "foo"}'), "guided_json"), (dict(guided_regex="a(b"), "guided_regex"),
    (dict(guided_regex="a", guided_choice=["a"]), "guided_choice")])
def test_grpc_bad_structured_output_names_its_field(request_fields, field):
    with pytest.raises(OrthrusInputError) as e:
        sampling_fields(pb.GenerateRequest(prompt="hi", **request_fields))
    assert e.value.field == field
