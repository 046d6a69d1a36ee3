"""The OpenAI surface without Ray: each endpoint's allow-list refuses what the server does not implement by
name, chat content parts are joined, max_tokens defaults to the window's room, usage goes in a last chunk."""

import pytest

from orthrus_engines import OrthrusInputError, RequestOutput
from orthrus_engines.outputs import COUNTERS, RequestAccumulator
from orthrus_engines.sampling_params import MAX_N
from orthrus_serve import openai_api as oai
from orthrus_serve import openai_fields as fields
from orthrus_serve.request_prep import sampling_params

USER = [{"role": "user", "content": "hi"}]


def refused(fn, *args) -> OrthrusInputError:
    with pytest.raises(OrthrusInputError) as e:
        fn(*args)
    return e.value


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"), ("functions", [{}]),
    ("function_call", "auto"), ("audio", {"voice": "x"}),
    ("modalities", ["text"]), ("parallel_tool_calls", True), ("best_of", 2), ("a_field_openai_adds_later", 1)])
def test_chat_refuses_what_it_does_not_implement_by_name(field, value):
    e = refused(fields.check_fields, {"messages": USER, field: value}, fields.CHAT_FIELDS)
    assert e.field == field


@pytest.mark.parametrize("field,value", [("best_of", 3), ("suffix", "end"), ("echo", True),
                                         ("max_completion_tokens", 4), ("top_logprobs", 2), ("messages", USER)])
def test_completions_refuse_what_they_do_not_implement_by_name(field, value):
    assert refused(fields.check_fields, {"prompt": "hi", field: value}, fields.COMPLETION_FIELDS).field == field


@pytest.mark.parametrize("allowed", [fields.CHAT_FIELDS, fields.COMPLETION_FIELDS])
def test_harmless_fields_and_no_op_values_are_accepted(allowed):
    body = {"model": "m", "user": "u", "stream": True, "stream_options": {"include_usage": True}, "n": 1,
            "presence_penalty": 0, "frequency_penalty": 0.0, "seed": 3, "stop": ["x"], "tools": None,
            "max_tokens": 4, "temperature": 0}
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


PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2, "min_tokens": 2,
             "logit_bias": {"5": 1, "017": -100}}


@pytest.mark.parametrize("allowed", [fields.CHAT_FIELDS, fields.COMPLETION_FIELDS])
def test_penalties_and_bias_are_sampling_fields(allowed):
    """OpenAI's penalties and logit_bias (token ids as strings) and vLLM's repetition_penalty, min_tokens."""
    fields.check_fields(dict(PENALTIES), allowed)
    params = oai.sampling_fields(PENALTIES, 200)
    assert params == {**PENALTIES, "logit_bias": {5: 1, 17: -100}, "max_tokens": 200}


@pytest.mark.parametrize("bias", [[5], {"a": 1}, {"-3": 1}, {"1.5": 1}, {"٣": 1}])
def test_logit_bias_keys_must_be_token_ids(bias):
    assert refused(oai.sampling_fields, {"logit_bias": bias}, 200).field == "logit_bias"


def test_usage_only_in_a_last_chunk_without_choices_when_asked():
    last = RequestOutput("r", [5], "a", finished=True, finish_reason="length",
                         **{name: i + 1 for i, name in enumerate(COUNTERS)})
    for chunk in (oai.completion_chunk("id", "m", last, False), oai.chat_chunk("id", "m", last, False)):
        assert "usage" not in chunk and chunk["choices"][0]["finish_reason"] == "length"
    for chunk in (oai.completion_chunk("id", "m", last, True), oai.chat_chunk("id", "m", None, True)):
        assert chunk["usage"] is None
    for chat in (False, True):
        final = oai.usage_chunk("id", "m", chat, last.counters())
        assert final["choices"] == [] and final["usage"] == oai.usage(last.counters())


@pytest.mark.parametrize("allowed", [fields.CHAT_FIELDS, fields.COMPLETION_FIELDS])
def test_n_is_a_sampling_field_and_best_of_may_equal_it(allowed):
    body = {"n": 3, "best_of": 3}
    fields.check_fields(body, allowed)
    assert sampling_params(oai.sampling_fields(body, 10)).n == 3
    assert refused(fields.check_fields, {"n": 3, "best_of": 2}, allowed).field == "best_of"
    for bad in (0, True, 1.5, MAX_N + 1):  # checked where every sampling field is, named
        assert refused(sampling_params, oai.sampling_fields({"n": bad}, 10)).field == "n"


def test_choices_per_sample_and_the_prompt_counted_once():
    acc = RequestAccumulator()
    for i, text, passes in ((1, "b", 3), (0, "a", 2), (1, "c", 4)):  # interleaved deltas, counters per sample
        acc.add(RequestOutput("r", [i], text, finished=text != "b", finish_reason=None if text == "b" else "stop",
                              index=i, prompt_tokens=9, cached_prompt_tokens=8 * i, completion_tokens=len(text),
                              forward_passes=passes))
    result = acc.result()
    for response in (oai.completion_response("id", "m", result), oai.chat_response("id", "m", result)):
        texts = [c.get("text", c.get("message", {}).get("content")) for c in response["choices"]]
        assert [c["index"] for c in response["choices"]] == [0, 1] and texts == ["a", "bc"]
        usage = response["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (9, 2, 11)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0 and usage["orthrus"]["forward_passes"] == 6
    chunk = oai.chat_chunk("id", "m", None, False, index=1)
    assert chunk["choices"][0]["index"] == 1 and chunk["choices"][0]["delta"]["role"] == "assistant"
    assert oai.completion_chunk("id", "m", acc.samples[1], False)["choices"][0]["index"] == 1


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
