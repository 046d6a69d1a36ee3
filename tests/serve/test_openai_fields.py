"""The OpenAI surface without Ray: each endpoint's allow-list refuses what the server does not implement by
name, chat content parts are joined, max_tokens defaults to the window's room, usage goes in a last chunk."""

import pytest

from orthrus_engines import OrthrusInputError, RequestOutput
from orthrus_engines.outputs import COUNTERS
from orthrus_serve import openai_api as oai
from orthrus_serve import openai_fields as fields

USER = [{"role": "user", "content": "hi"}]


def refused(fn, *args) -> OrthrusInputError:
    with pytest.raises(OrthrusInputError) as e:
        fn(*args)
    return e.value


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"), ("functions", [{}]),
    ("function_call", "auto"), ("response_format", {"type": "json_object"}), ("logprobs", True),
    ("top_logprobs", 2), ("n", 2), ("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"5": 1}),
    ("audio", {"voice": "x"}), ("modalities", ["text"]), ("parallel_tool_calls", True), ("min_tokens", 2),
    ("n", True), ("a_field_openai_adds_later", 1)])
def test_chat_refuses_what_it_does_not_implement_by_name(field, value):
    e = refused(fields.check_fields, {"messages": USER, field: value}, fields.CHAT_FIELDS)
    assert e.field == field


@pytest.mark.parametrize("field,value", [("best_of", 3), ("suffix", "end"), ("echo", True), ("logprobs", 1),
                                         ("max_completion_tokens", 4), ("messages", USER)])
def test_completions_refuse_what_they_do_not_implement_by_name(field, value):
    assert refused(fields.check_fields, {"prompt": "hi", field: value}, fields.COMPLETION_FIELDS).field == field


@pytest.mark.parametrize("allowed", [fields.CHAT_FIELDS, fields.COMPLETION_FIELDS])
def test_harmless_fields_and_no_op_values_are_accepted(allowed):
    body = {"model": "m", "user": "u", "stream": True, "stream_options": {"include_usage": True}, "n": 1,
            "presence_penalty": 0, "frequency_penalty": 0.0, "seed": 3, "stop": ["x"], "tools": None,
            "logprobs": False, "max_tokens": 4, "temperature": 0}
    fields.check_fields(body, allowed)
    assert fields.include_usage(body)


@pytest.mark.parametrize("body,field", [
    ({"model": 5}, "model"), ({"user": 1}, "user"), ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"stream": True, "stream_options": []}, "stream_options"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage")])
def test_accepted_fields_of_the_wrong_kind_are_named(body, field):
    assert refused(fields.check_fields, body, fields.CHAT_FIELDS).field == field


def test_model_must_name_the_served_model():
    fields.check_model({}, "served")
    fields.check_model({"model": "served"}, "served")
    with pytest.raises(fields.UnknownModel, match="`gpt-4`"):
        fields.check_model({"model": "gpt-4"}, "served")


def test_content_parts_are_joined_and_other_parts_refused_by_name():
    msgs = [{"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": None}]
    assert fields.chat_messages(msgs) == [{"role": "system", "content": "Be terse."},
                                          {"role": "user", "content": "a\nb"}]
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x"}}]
    e = refused(fields.chat_messages, [{"role": "user", "content": image}])
    assert e.field == "messages[0].content[1].type" and "'image_url'" in str(e)


@pytest.mark.parametrize("messages,field", [
    ("hi", "messages"), ([], "messages"), ([{"role": "user"}], "messages[0]"), (["hi"], "messages[0]"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "x", "name": "bob"}], "messages[0].name"),
    ([{"role": "user", "content": []}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]}],
     "messages[0].content[0].cache_control")])
def test_bad_messages_are_named(messages, field):
    assert refused(fields.chat_messages, messages).field == field


def test_max_tokens_defaults_to_the_room_the_window_leaves():
    assert oai.sampling_fields({"prompt": "hi"}, 200)["max_tokens"] == 200
    assert oai.sampling_fields({"max_tokens": None}, 200)["max_tokens"] == 200
    assert oai.sampling_fields({"max_tokens": 5}, 200)["max_tokens"] == 5
    assert oai.sampling_fields({"max_completion_tokens": 7, "stop": "x"}, 200) == {"max_tokens": 7, "stop": ["x"]}


def test_usage_only_in_a_last_chunk_without_choices_when_asked():
    last = RequestOutput("r", [5], "a", finished=True, finish_reason="length",
                         **{name: i + 1 for i, name in enumerate(COUNTERS)})
    for chunk in (oai.completion_chunk("id", "m", last, False), oai.chat_chunk("id", "m", last, False)):
        assert "usage" not in chunk and chunk["choices"][0]["finish_reason"] == "length"
    for chunk in (oai.completion_chunk("id", "m", last, True), oai.chat_chunk("id", "m", None, True)):
        assert chunk["usage"] is None
    for chat in (False, True):
        final = oai.usage_chunk("id", "m", chat, last)
        assert final["choices"] == [] and final["usage"] == oai.usage(last.counters())


@pytest.mark.parametrize("raw,field", [
    ('{"prompt": "a\\ud800"}', "prompt"), ('{"messages": [{"role": "user", "content": "\\udc00"}]}',
                                           "messages[0].content"),
    ('{"stop": ["ok", "\\udbff"]}', "stop[1]"), ('{"x": {"\\ud800": 1}}', "x"),
    ('{"seed": 9223372036854775808}', "seed"),
    ('{"prompt": [1, -9223372036854775809]}', "prompt[1]"), ('{"temperature": 1e999}', "temperature"),
    ('{"temperature": NaN}', "body"), ('{"top_p": -Infinity}', "body"), ('{"seed": 1' + "0" * 4400 + "}", "body"),
    ('{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}", "body")])
def test_every_json_value_is_checked_at_any_depth(raw, field):
    assert refused(oai.parse_body, raw.encode()).field == field


def test_64_bit_extremes_and_surrogate_pairs_are_valid():
    body = oai.parse_body(b'{"seed": -9223372036854775808, "top_k": 9223372036854775807, "prompt": "\\ud83d\\ude00"}')
    assert body["prompt"] == "\U0001F600" and body["seed"] == -(2**63)
