"""Agent frameworks against a real cluster: the Responses API with the official client, the
OpenAI Agents SDK on its default Responses model, and the Microsoft Agent Framework's
concurrent fan-out with a tool-using agent (Foundry Local issue 506's workflow).

One module cluster: SmolLM2 on a CPU worker batching 8 sequences, behind the HTTP server.
"""
from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from runtime.config.schema import HttpConfig
from runtime.frontdoors.http_server import HttpServer
from runtime.launchers.local import prepare

CONFIG = """
    devices:
      - {name: cpu0, kind: cpu, backend: openvino-genai, capacity: 8}
    models:
      - {name: smollm2, source: "packaged:smollm2", devices: [cpu0]}
"""
WEATHER = {"type": "function", "name": "get_weather",
           "description": "Get the current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
CITY = {"type": "object", "properties": {"city": {"type": "string"},
                                         "country": {"type": "string"}},
        "required": ["city", "country"]}


@pytest.fixture(scope="module")
def server(module_clusters):
    cluster = module_clusters.start(CONFIG)
    config = prepare(module_clusters.write(CONFIG, "agents.yaml"))
    handle = HttpServer.from_config(config, cluster.address, cluster.token,
                                    http=HttpConfig(address="127.0.0.1:0")).serve_in_thread()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


# ---- the Responses API with the official client -------------------------------------------

def test_a_response_to_text_input_is_an_output_message(oai):
    response = oai.responses.create(model="smollm2", input="What is the capital of France?",
                                    instructions="Answer in one sentence.",
                                    max_output_tokens=16)
    assert response.status in ("completed", "incomplete") and response.output_text
    assert "Paris" in response.output_text
    assert response.output[0].type == "message" and response.usage.output_tokens <= 16


def test_a_function_call_and_its_output_go_round_as_input_items(oai):
    first = oai.responses.create(model="smollm2", input="What's the weather in Paris?",
                                 tools=[WEATHER], tool_choice="required", max_output_tokens=40)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    second = oai.responses.create(
        model="smollm2", tools=[WEATHER], max_output_tokens=120,
        input=[{"role": "user", "content": "What's the weather in Paris?"},
               *[item.model_dump(exclude_none=True) for item in first.output],
               {"type": "function_call_output", "call_id": call.call_id,
                "output": "Sunny, 21 C"}])
    assert second.status == "completed" and "Sunny, 21 C" in second.output_text


def test_text_format_json_schema_is_structured_output(oai):
    response = oai.responses.create(model="smollm2", input="Describe Paris as JSON.",
                                    max_output_tokens=40,
                                    text={"format": {"type": "json_schema", "name": "city",
                                                     "schema": CITY, "strict": True}})
    jsonschema.validate(json.loads(response.output_text), CITY)


def test_a_streamed_response_is_the_responses_event_sequence(oai):
    events = list(oai.responses.create(model="smollm2", input="What's the weather in Paris?",
                                       tools=[WEATHER], tool_choice="required",
                                       max_output_tokens=40, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    (call,) = [i for i in events[-1].response.output if i.type == "function_call"]
    assert json.loads(call.arguments) == {"city": "Paris"}

    text = list(oai.responses.create(model="smollm2", input="Say hello.", max_output_tokens=8,
                                     stream=True))
    deltas = "".join(e.delta for e in text if e.type == "response.output_text.delta")
    assert deltas and text[-1].response.output_text == deltas


def test_a_stored_response_is_refused_plainly(oai):
    with pytest.raises(openai.BadRequestError, match="stores no responses"):
        oai.responses.create(model="smollm2", input="Hi", previous_response_id="resp_1")


# ---- the OpenAI Agents SDK ----------------------------------------------------------------

def test_the_agents_sdk_runs_an_agent_with_a_function_tool(server):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)  # no trace export: there is no network here
    client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)
    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        asked.append(city)
        return f"Sunny, 21 C in {city}"

    agent = agents.Agent(
        name="weather", instructions="You answer weather questions.", tools=[get_weather],
        model=agents.OpenAIResponsesModel("smollm2", client),  # the default Responses model
        model_settings=agents.ModelSettings(tool_choice="required", max_tokens=200))

    async def run():
        done = await agents.Runner.run(agent, "What's the weather in Paris?", max_turns=4)
        streamed = agents.Runner.run_streamed(agent, "What's the weather in Rome?",
                                              max_turns=4)
        async for _ in streamed.stream_events():
            pass
        return done, streamed

    done, streamed = asyncio.run(run())
    assert asked == ["Paris", "Rome"]  # the tool ran once per run, then the model answered
    assert "Sunny, 21 C in Paris" in done.final_output
    assert "Sunny, 21 C in Rome" in streamed.final_output


# ---- the Microsoft Agent Framework --------------------------------------------------------

def test_the_agent_framework_fan_out_answers_every_agent_one_of_them_with_tools(server):
    af_openai = pytest.importorskip("agent_framework.openai")
    orchestrations = pytest.importorskip("agent_framework_orchestrations")
    called: list = []

    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        called.append(city)
        return f"Sunny, 21 C in {city}"

    def add(a: int, b: int) -> int:
        """Add two integers."""
        called.append((a, b))
        return a + b

    client = af_openai.OpenAIChatCompletionClient(model="smollm2", api_key="unused",
                                                  base_url=server.url)
    retriever = client.as_agent(name="retriever", instructions="You retrieve facts briefly.",
                                default_options={"max_tokens": 48})
    tool_agent = client.as_agent(name="tooler", instructions="You use tools to answer.",
                                 tools=[get_weather, add], default_options={"max_tokens": 96})
    workflow = orchestrations.ConcurrentBuilder(participants=[retriever, tool_agent]).build()

    result = asyncio.run(workflow.run("Reply with the JSON tool call for get_weather in Paris."))
    answers = {m.author_name: m.text for output in result.get_outputs()
               for m in output.messages if m.role == "assistant" and m.text}
    assert set(answers) == {"retriever", "tooler"} and all(answers.values())
    assert "Paris" in called  # the tool agent's call ran and its result went back
    assert "Sunny, 21 C in Paris" in answers["tooler"]
