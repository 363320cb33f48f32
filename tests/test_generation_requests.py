"""Generation requests: the one validator the client, the worker and the HTTP API share.

Pure: no engine, no processes. Each bad request names its field, and the reader and the
builder agree (a request the client builds is one a worker reads).
"""
from __future__ import annotations

import pytest

from runtime.errors import InvalidInput
from runtime.wire.generation import InvalidField, build_request, read_request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
HI = [{"role": "user", "content": "Hi"}]


def test_a_request_the_client_builds_is_one_the_worker_reads():
    body = build_request(HI, {"max_tokens": 8, "tools": [WEATHER], "tool_choice": "required",
                              "presence_penalty": 0.5, "logprobs": True})
    r = read_request(body)
    assert (r.max_tokens, r.tool_choice, r.presence_penalty, r.logprobs) == (8, "required",
                                                                               0.5, True)
    assert [t.name for t in r.tools] == ["get_weather"] and r.calls_tools and r.constrained


def test_tools_default_to_auto_and_a_named_tool_is_required_and_forced():
    assert read_request({"messages": HI, "tools": [WEATHER]}).tool_choice == "auto"
    assert read_request({"messages": HI}).tool_choice == "none"
    for choice in ({"type": "function", "function": {"name": "get_weather"}},  # chat shape
                   {"type": "function", "name": "get_weather"}, "get_weather"):  # Responses, ours
        r = read_request({"messages": HI, "tools": [WEATHER], "tool_choice": choice})
        assert (r.tool_choice, r.forced_tool) == ("required", "get_weather")
        assert [t.name for t in r.offered_tools()] == ["get_weather"]


def test_the_responses_api_flat_tool_and_format_shapes_read_the_same():
    flat = {"type": "function", **WEATHER["function"]}
    assert read_request({"messages": HI, "tools": [flat]}).tools == \
        read_request({"messages": HI, "tools": [WEATHER]}).tools
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = {"type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}}
    responses = {"type": "json_schema", "name": "A", "schema": schema, "strict": True}
    assert read_request({"messages": HI, "response_format": chat}).response_format == \
        read_request({"messages": HI, "response_format": responses}).response_format == \
        {"type": "json_schema", "name": "A", "schema": schema, "strict": True}
    assert read_request({"messages": HI, "response_format": {"type": "text"}}).response_format \
        is None


def test_a_tool_history_reads_with_calls_and_the_results_they_answer():
    history = [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]
    r = read_request({"messages": history, "tools": [WEATHER]})
    assert r.messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert r.messages[2] == {"role": "tool", "content": "Sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize("field, request_, why", [
    ("messages", {"messages": []}, "must be a non-empty list"),
    ("messages[0].role", {"messages": [{"role": "robot", "content": "hi"}]}, "must be one of"),
    ("messages[0].content", {"messages": [{"role": "user"}]}, "must be a string"),
    ("messages[0].tool_call_id", {"messages": [{"role": "tool", "content": "x"}]},
     "must name the call"),
    ("messages[0].tool_calls", {"messages": [{"role": "user", "content": "x",
                                               "tool_calls": []}]}, "assistant messages only"),
    ("max_tokens", {"prompt": "hi", "max_tokens": 0}, "must be an integer >= 1, got 0"),
    ("temperature", {"prompt": "hi", "temperature": -0.5}, "must be a number in 0..2"),
    ("temperature", {"prompt": "hi", "temperature": 3}, "must be a number in 0..2"),
    ("top_p", {"prompt": "hi", "top_p": 0}, "must be a number in (0, 1]"),
    ("top_p", {"prompt": "hi", "top_p": 1.5}, "must be a number in 0..1"),
    ("presence_penalty", {"prompt": "hi", "presence_penalty": 2.5}, "in -2..2"),
    ("frequency_penalty", {"prompt": "hi", "frequency_penalty": "x"}, "in -2..2"),
    ("stop", {"prompt": "hi", "stop": [""]}, "list of up to 16 non-empty strings"),
    ("logprobs", {"prompt": "hi", "logprobs": 1}, "must be true or false"),
    ("tools[0]", {"prompt": "hi", "tools": [{"type": "web_search"}]}, "must be a function tool"),
    ("tools[0].function.name", {"prompt": "hi", "tools": [
        {"type": "function", "function": {"name": "get weather"}}]}, "letters, digits"),
    ("tools[0].function.parameters", {"prompt": "hi", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "must describe an object"),
    ("tools[0].function.parameters.properties.x.type", {"prompt": "hi", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "strin"}}}}}]}, "must be among"),
    ("tools", {"prompt": "hi", "tools": [WEATHER, WEATHER]}, "names each function once"),
    ("tool_choice", {"prompt": "hi", "tools": [WEATHER], "tool_choice": "always"},
     "must be one of"),
    ("tool_choice", {"prompt": "hi", "tools": [WEATHER], "tool_choice": {"function": {
        "name": "nope"}}}, "not among the tools"),
    ("tool_choice", {"prompt": "hi", "tool_choice": "required"}, "needs tools"),
    ("response_format", {"prompt": "hi", "response_format": {"type": "xml"}},
     'must be "text", "json_object" or "json_schema"'),
    ("response_format.json_schema.schema", {"prompt": "hi", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x"}}}, "is required"),
    ("response_format.json_schema.schema.$ref", {"prompt": "hi", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "$ref": "https://example.com/s.json"}}}}, "must point inside the schema"),
])
def test_a_bad_field_is_invalid_input_that_names_it(field, request_, why):
    with pytest.raises(InvalidField) as info:
        read_request(request_)
    assert info.value.field == field and why in str(info.value)


def test_requests_that_are_wrong_as_a_whole_are_invalid_input():
    with pytest.raises(InvalidInput, match="either chat messages or a prompt"):
        read_request({})
    with pytest.raises(InvalidInput, match="unknown generation field"):
        read_request({"prompt": "hi", "top_k": 4})
    with pytest.raises(InvalidInput, match="more than max_tokens 2"):
        read_request({"prompt": "hi", "max_tokens": 2}, prefix_ids=[1, 2, 3])


def test_a_sampled_request_gets_a_seed_of_its_own_so_a_re_run_draws_the_same():
    body = build_request(HI, {"temperature": 0.7})
    assert isinstance(body["seed"], int)
    assert "seed" not in build_request(HI, {"temperature": 0.0})
    assert build_request(HI, {"temperature": 0.7, "seed": 3})["seed"] == 3
