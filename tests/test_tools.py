"""Tools and structured output end to end: the official openai client and the Python client
against a real cluster and the HTTP server, SmolLM2 on openvino-genai CPU workers.

One module cluster:
- ``cpu0`` batches 8 sequences and serves ``smollm2``, and is the fallback of the others;
- ``npu0`` is an NPU-like worker (one request at a time) whose pipeline may not constrain
  decoding (``structured_output: false``): ``smollm2-npu`` and ``-npu2`` prefer it;
- ``flaky`` fails every generation after 6 tokens (the fault wrapper): ``smollm2-flaky`` and
  ``-flaky2`` prefer it.
Placement goes by measured speed; these models skip the warm-up that measures it, so both
their devices are unmeasured alike and the model's device order decides each one's first
task (one model per check: after it, cpu0 is measured and the order no longer decides).
The CPU workers run deterministic numerics: a constrained re-run replays the streamed tokens
only if the device that re-runs it decodes them the same, batched or not.
"""
from __future__ import annotations

import asyncio
import json
import logging

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from runtime.bench.constrained import ADD, WEATHER  # the bench's tool-use table offers the same
from runtime.config.schema import HttpConfig
from runtime.frontdoors.http_server import HttpServer
from runtime.launchers.local import prepare
from runtime.wire.generation import ToolCall

CONFIG = """
    devices:
      - {name: cpu0, kind: cpu, backend: openvino-genai, capacity: 8,
         options: {deterministic: true}}
      - {name: npu0, kind: npu, backend: openvino-genai, capacity: 1,
         options: {device: CPU, continuous_batching: false, structured_output: false}}
      - {name: flaky, kind: cpu, backend: openvino-genai, capacity: 2,
         options: {deterministic: true},
         faults: {fail_after_tokens: 6, message: "device reset mid-stream"}}
    models:
      - {name: smollm2, source: "packaged:smollm2", devices: [cpu0]}
      - {name: smollm2-npu, source: "packaged:smollm2", devices: [npu0, cpu0], options: {
         npu0: {warmup: false}, cpu0: {warmup: false}}}
      - {name: smollm2-npu2, source: "packaged:smollm2", devices: [npu0, cpu0], options: {
         npu0: {warmup: false}, cpu0: {warmup: false}}}
      - {name: smollm2-flaky, source: "packaged:smollm2", devices: [flaky, cpu0], options: {
         flaky: {warmup: false}, cpu0: {warmup: false}}}
      - {name: smollm2-flaky2, source: "packaged:smollm2", devices: [flaky, cpu0], options: {
         flaky: {warmup: false}, cpu0: {warmup: false}}}
"""
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]
ASKS_FOR_A_CALL = [{"role": "user",
                    "content": "Reply with the JSON tool call for get_weather in Paris."}]
CITY = {"type": "object", "properties": {"city": {"type": "string"},
                                         "country": {"type": "string"}},
        "required": ["city", "country"]}
DESCRIBE_PARIS = [{"role": "user", "content": "Describe Paris as JSON."}]


class City(BaseModel):
    city: str
    country: str


@pytest.fixture(scope="module")
def cluster(module_clusters):
    return module_clusters.start(CONFIG)


@pytest.fixture(scope="module")
def server(cluster, module_clusters):
    config = prepare(module_clusters.write(CONFIG, "tools.yaml"))
    handle = HttpServer.from_config(config, cluster.address, cluster.token,
                                    http=HttpConfig(address="127.0.0.1:0")).serve_in_thread()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def valid_calls(calls) -> list:
    """Each call names an offered tool, has an OpenAI id, and its arguments match the tool's
    parameter schema (the jsonschema package decides)."""
    for call in calls:
        assert call.id.startswith("call_") and call.function.name in SCHEMAS
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return calls


# ---- the openai client ----------------------------------------------------------------------

def test_required_gives_a_tool_call_whose_arguments_match_the_schema(oai):
    reply = oai.chat.completions.create(model="smollm2", messages=PARIS, tools=[WEATHER],
                                        tool_choice="required", max_tokens=40)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = valid_calls(choice.message.tool_calls)
    assert call.type == "function" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_named_tool_is_the_one_called(oai):
    reply = oai.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is 2 plus 40?"}],
        tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=False, max_tokens=32)
    (call,) = valid_calls(reply.choices[0].message.tool_calls)
    assert call.function.name == "add" and reply.choices[0].finish_reason == "tool_calls"


def test_under_auto_a_chat_is_answered_in_text_and_a_call_asked_for_is_made(oai):
    hello = oai.chat.completions.create(model="smollm2", tools=[WEATHER], max_tokens=16,
                                        messages=[{"role": "user", "content": "Hello!"}])
    assert hello.choices[0].finish_reason == "stop" and hello.choices[0].message.content
    assert hello.choices[0].message.tool_calls is None
    reply = oai.chat.completions.create(model="smollm2", messages=ASKS_FOR_A_CALL,
                                        tools=[WEATHER], max_tokens=60)
    (call,) = valid_calls(reply.choices[0].message.tool_calls)
    assert reply.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_round_trip_goes_from_the_call_to_its_result_to_an_answer(oai):
    first = oai.chat.completions.create(model="smollm2", messages=PARIS, tools=[WEATHER],
                                        tool_choice="required", max_tokens=40).choices[0]
    (call,) = valid_calls(first.message.tool_calls)
    history = [*PARIS, first.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    final = oai.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER],
                                        max_tokens=120).choices[0]
    # This 135M model repeats the tool's answer back rather than phrase it; it is text. How
    # long it goes on depends on the call id it read (random), so it may not end by itself.
    assert final.finish_reason in ("stop", "length") and final.message.tool_calls is None
    assert "Sunny, 21 C" in final.message.content


def test_streamed_tool_calls_are_put_back_together_by_the_client(oai):
    with oai.chat.completions.stream(model="smollm2", messages=PARIS, tools=[WEATHER],
                                     tool_choice="required", max_tokens=40) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion().choices[0]
    assert "tool_calls.function.arguments.done" in kinds
    (call,) = valid_calls(final.message.tool_calls)
    assert final.finish_reason == "tool_calls" and call.function.name == "get_weather"

    calls: dict[int, dict] = {}  # what an app accumulating stream=True chunks by hand gets
    first_deltas = []
    for chunk in oai.chat.completions.create(model="smollm2", messages=PARIS, tools=[WEATHER],
                                             tool_choice="required", max_tokens=40,
                                             stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.index not in calls:
                first_deltas.append(delta)
                calls[delta.index] = {"id": delta.id, "name": delta.function.name,
                                      "arguments": ""}
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert [(d.index, d.id[:5], d.function.name) for d in first_deltas] == [
        (0, "call_", "get_weather")]  # index, id and name first; then argument fragments
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_json_schema_and_parse_give_objects_of_the_schema(oai):
    reply = oai.chat.completions.create(
        model="smollm2", messages=DESCRIBE_PARIS, max_tokens=40, response_format={
            "type": "json_schema", "json_schema": {"name": "city", "schema": CITY,
                                                   "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), CITY)
    parsed = oai.chat.completions.parse(model="smollm2", messages=DESCRIBE_PARIS,
                                        response_format=City, max_tokens=40)
    assert parsed.choices[0].message.parsed == City(city="Paris", country="France")


def test_logprobs_come_per_token_and_penalties_are_applied(oai):
    reply = oai.chat.completions.create(model="smollm2", messages=PARIS, max_tokens=6,
                                        logprobs=True)
    tokens = reply.choices[0].logprobs.content
    assert len(tokens) == reply.usage.completion_tokens
    assert "".join(t.token for t in tokens) == reply.choices[0].message.content
    assert all(t.logprob <= 0 and t.top_logprobs == [] for t in tokens)
    count = [{"role": "user", "content": "Count from 1 to 20."}]
    plain = oai.chat.completions.create(model="smollm2", messages=count, max_tokens=16)
    penalised = oai.chat.completions.create(model="smollm2", messages=count, max_tokens=16,
                                            frequency_penalty=2.0, presence_penalty=1.0)
    assert plain.choices[0].message.content != penalised.choices[0].message.content


def test_a_model_is_retrieved_by_id(oai):
    assert oai.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-9")


@pytest.mark.parametrize("extra, param, says", [
    ({"logprobs": True, "top_logprobs": 3}, "top_logprobs", "only the chosen token"),
    ({"logit_bias": {"42": 5}}, "logit_bias", "logit_bias is not supported"),
    ({"functions": [{"name": "f"}]}, "functions", "send tools"),
])
def test_what_stays_unsupported_is_a_400_that_says_so_and_is_logged(oai, caplog, extra, param,
                                                                     says):
    with caplog.at_level(logging.INFO, logger="fanout.http.access"):
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(model="smollm2", messages=PARIS, max_tokens=4,
                                        extra_body=extra)
    assert info.value.body["param"] == param and says in info.value.body["message"]
    refused = [r.getMessage() for r in caplog.records if " refused: " in r.getMessage()]
    assert len(refused) == 1 and "status=400" in refused[0] and says in refused[0]


# ---- the Python client ----------------------------------------------------------------------

def test_the_python_client_takes_tools_and_answers_with_typed_calls(cluster):
    client = cluster.client()
    answer = client.generate("smollm2", PARIS, tools=[WEATHER], tool_choice="required",
                             max_tokens=40)
    (call,) = answer.tool_calls
    assert isinstance(call, ToolCall) and answer.finish_reason == "tool_calls"
    assert call.id.startswith("call_") and call.name == "get_weather"
    assert call.args == {"city": "Paris"}

    chunks = list(client.stream("smollm2", PARIS, tools=[WEATHER], tool_choice="get_weather",
                                max_tokens=40))
    streamed = [c for chunk in chunks for c in chunk.tool_calls]
    assert [(c.name, c.args) for c in streamed] == [("get_weather", {"city": "Paris"})]
    assert chunks[-1].finish_reason == "tool_calls"

    many = client.generate_many("smollm2", [PARIS, [{"role": "user", "content": "Add 7 and 8."}]],
                                tools=[WEATHER, ADD], tool_choice="required", max_tokens=40)
    for completion in many:
        for c in completion.tool_calls:
            jsonschema.validate(c.args, SCHEMAS[c.name])
        assert completion.tool_calls and completion.finish_reason == "tool_calls"


def test_the_python_client_parses_a_pydantic_response_format_and_its_async_twin(cluster):
    client = cluster.client()
    answer = client.generate("smollm2", DESCRIBE_PARIS, response_format=City, max_tokens=40)
    assert answer.parsed == City(city="Paris", country="France")
    jsonschema.validate(json.loads(answer.text), City.model_json_schema())

    async def both():
        one = await client.agenerate("smollm2", PARIS, tools=[WEATHER],
                                     tool_choice="required", max_tokens=40)
        chunks = [c async for c in client.astream("smollm2", DESCRIBE_PARIS, max_tokens=40,
                                                  response_format={"type": "json_schema",
                                                                   "json_schema": {
                                                                       "name": "city",
                                                                       "schema": CITY}})]
        return one, chunks

    one, chunks = asyncio.run(both())
    assert [c.name for c in one.tool_calls] == ["get_weather"]
    jsonschema.validate(json.loads("".join(c.text for c in chunks)), CITY)


# ---- devices and failover -------------------------------------------------------------------

def test_a_device_that_cannot_constrain_says_unsupported_and_the_next_one_serves(cluster, oai):
    answer = cluster.client().generate("smollm2-npu", PARIS, tools=[WEATHER],
                                       tool_choice="required", max_tokens=40)
    assert answer.device == "cpu0" and [c.name for c in answer.tool_calls] == ["get_weather"]
    (attempt,) = answer.attempts
    assert (attempt.device, attempt.kind) == ("npu0", "unsupported")
    assert "cannot constrain decoding" in attempt.message

    reply = oai.chat.completions.with_raw_response.create(
        model="smollm2-npu2", messages=DESCRIBE_PARIS, max_tokens=40,
        response_format={"type": "json_object"})
    assert reply.headers["X-Fanout-Failed-Over"] == "true"
    fanout = reply.parse().model_extra["fanout"]
    assert fanout["device"] == "cpu0" and fanout["attempts"][0]["kind"] == "unsupported"


def test_a_constrained_stream_that_fails_midway_is_re_run_with_nothing_sent_twice(cluster):
    # flaky streams 6 tokens of the JSON and fails; cpu0 re-runs the request from the start
    # (the grammar cannot start mid-way), checks its first 6 tokens are those, sends the rest.
    client = cluster.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    chunks = list(client.stream("smollm2-flaky", DESCRIBE_PARIS, max_tokens=40,
                                response_format=fmt))
    reference = client.generate("smollm2", DESCRIBE_PARIS, max_tokens=40, response_format=fmt)
    assert "".join(c.text for c in chunks) == reference.text
    jsonschema.validate(json.loads(reference.text), CITY)
    moved = [c for c in chunks if c.previous_device]
    assert len(moved) == 1 and (moved[0].previous_device, moved[0].device) == ("flaky", "cpu0")
    assert chunks[0].device == "flaky" and chunks[-1].usage == reference.usage
    (attempt,) = chunks[-1].attempts
    assert attempt.device == "flaky" and "device reset mid-stream" in attempt.message

    # a tool call cut by the failure arrives once, whole, from the device that re-ran it
    calls = [c for chunk in client.stream("smollm2-flaky2", PARIS, tools=[WEATHER],
                                          tool_choice="required", max_tokens=40)
             for c in chunk.tool_calls]
    assert [(c.index, c.name, c.args) for c in calls] == [(0, "get_weather", {"city": "Paris"})]
