"""The OpenAI-compatible HTTP API with the official openai client, raw HTTP and a real cluster.

One module cluster: MiniLM (embeddings) on an onnxruntime CPU worker and SmolLM2 on an
openvino-genai CPU worker batching 8 sequences; the server runs in a thread on a free port.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import numpy as np
import openai
import pytest

import runtime
from runtime.config.schema import HttpConfig
from runtime.errors import ConfigError
from runtime.frontdoors.embeddings import HIDDEN, TextEncoder, mean_pool
from runtime.frontdoors.http_server import HttpServer
from runtime.launchers.local import prepare
from runtime.shells.supervisor import process_alive

from .conftest import wait_for, worker

CONFIG = """
    devices:
      - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}
      - {name: llmcpu, kind: cpu, backend: openvino-genai, capacity: 8,
         options: {deterministic: true}}  # a stream batched with 15 others equals its run alone
    models:
      - {name: minilm, source: "packaged:minilm", tokenizer: "packaged:minilm-tokenizer",
         devices: [cpu0]}
      - {name: smollm2, source: "packaged:smollm2", devices: [llmcpu]}
"""
MAX_BODY = 1 << 20
QUESTIONS = [
    "What is the capital of France?", "Name three colours of the rainbow.",
    "Why is the sky blue?", "Write a haiku about the sea.", "What is two plus two?",
    "Give me a tip for learning Python.", "What do bees make?", "Describe a cat.",
    "What is the largest planet?", "How many legs does a spider have?",
    "What is water made of?", "Name a famous painter.", "What is the boiling point of water?",
    "Who wrote Hamlet?", "What colour is grass?", "What is the speed of light?",
]
SENTENCES = ["The cat sat on the mat.", "A fan-out sends many calls at once.",
             "NPUs are efficient but fragile under load."]


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def cluster(module_clusters):
    return module_clusters.start(CONFIG)


@pytest.fixture(scope="module")
def config(module_clusters):
    return prepare(module_clusters.write(CONFIG, "http.yaml"))


@pytest.fixture(scope="module")
def server(cluster, config):
    http = HttpConfig(address="127.0.0.1:0", max_body_bytes=MAX_BODY)
    handle = HttpServer.from_config(config, cluster.address, cluster.token,
                                    http=http).serve_in_thread()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def still_serves(client):
    """After each test, whatever it did, the server and the cluster answer a good request."""
    yield
    answer = client.chat.completions.create(model="smollm2", messages=chat("Hi"), max_tokens=2)
    assert answer.choices[0].message.content


def call(url: str, body: bytes | dict | None = None, headers: dict | None = None,
         method: str | None = None) -> tuple[int, dict, bytes]:
    """A raw HTTP request: (status, headers, body), errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def base(server) -> str:
    return server.url.removesuffix("/v1")


# -- chat with the official client ---------------------------------------------------------------

def test_sync_client_gets_sixteen_concurrent_chats_and_streams_the_same_text(client):
    def complete(q):
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2", messages=chat(q), max_tokens=16, temperature=0)
        return raw.headers, raw.parse()

    def stream(q):
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=chat(q), max_tokens=16, temperature=0, stream=True)
            if c.choices)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(complete, QUESTIONS))
        streamed = list(pool.map(stream, QUESTIONS))
    for headers, answer in answers:
        fanout = answer.model_extra["fanout"]
        assert headers["x-fanout-device"] == fanout["device"] == "llmcpu"
        assert headers["x-fanout-failed-over"] == ("true" if fanout["attempts"] else "false")
        assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0
        assert answer.usage.total_tokens == (answer.usage.prompt_tokens
                                             + answer.usage.completion_tokens)
        assert fanout["failed_over"] == bool(fanout["attempts"])
    assert streamed == [a.choices[0].message.content for _, a in answers]
    assert "Paris" in streamed[0]


def test_async_client_gets_sixteen_concurrent_streams_with_a_usage_chunk(server):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)

        async def stream(q):
            chunks = [c async for c in await aclient.chat.completions.create(
                model="smollm2", messages=chat(q), max_tokens=16, temperature=0, stream=True,
                stream_options={"include_usage": True})]
            return chunks

        async def complete(q):
            return await aclient.chat.completions.create(model="smollm2", messages=chat(q),
                                                         max_tokens=16, temperature=0)
        streams = await asyncio.gather(*(stream(q) for q in QUESTIONS))
        answers = await asyncio.gather(*(complete(q) for q in QUESTIONS))
        await aclient.close()
        return streams, answers

    streams, answers = asyncio.run(run())
    for chunks, answer in zip(streams, answers):
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        *content, finish, usage = chunks
        assert finish.choices[0].finish_reason == answer.choices[0].finish_reason
        assert finish.model_extra["fanout"]["device"] == "llmcpu"
        assert usage.choices == [] and usage.usage.completion_tokens == (
            answer.usage.completion_tokens)
        assert usage.usage.prompt_tokens == answer.usage.prompt_tokens
        text = "".join(c.choices[0].delta.content or "" for c in content)
        assert text == answer.choices[0].message.content


def test_n_choices_are_fanned_out_with_their_index(client):
    answer = client.chat.completions.create(model="smollm2", messages=chat(QUESTIONS[1]), n=3,
                                            max_tokens=8, temperature=0.8, seed=7)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.message.content for c in answer.choices)
    assert [c["device"] for c in answer.model_extra["fanout"]["choices"]] == ["llmcpu"] * 3


def test_text_parts_and_max_completion_tokens_read_as_a_string_and_max_tokens(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTIONS[0]}]}]
    answer = client.chat.completions.create(model="smollm2", messages=parts, temperature=0,
                                            max_completion_tokens=5,
                                            extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(model="smollm2", messages=chat(QUESTIONS[0]),
                                           temperature=0, max_tokens=5)
    assert answer.usage.completion_tokens == 5
    assert answer.choices[0].message.content == plain.choices[0].message.content


def test_completions_take_a_list_of_prompts_times_n_and_stream(client):
    answer = client.completions.create(model="smollm2", prompt=["Once upon a time", "The sea"],
                                       n=2, max_tokens=4, temperature=0)
    assert answer.object == "text_completion"
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.choices[0].text == answer.choices[1].text  # greedy: the same twice
    streamed = [c for c in client.completions.create(model="smollm2", prompt="Once upon a time",
                                                     max_tokens=4, temperature=0, stream=True)]
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


# -- embeddings --------------------------------------------------------------------------------

def test_embeddings_match_minilm_run_in_this_process(server, client, config, reference):
    encoder = TextEncoder(config.model("minilm").tokenizer)
    expected = []
    for text in SENTENCES:
        x = encoder.inputs(text)
        expected.append(mean_pool(reference(x)[HIDDEN], x["attention_mask"])[0])
    raw = client.embeddings.with_raw_response.create(model="minilm", input=SENTENCES)
    answer = raw.parse()
    assert raw.headers["x-fanout-device"] == "cpu0"
    assert [d.index for d in answer.data] == [0, 1, 2]
    got = np.array([d.embedding for d in answer.data])
    np.testing.assert_allclose(got, np.array(expected), atol=1e-4)
    assert answer.usage.prompt_tokens == sum(int(encoder.inputs(t)["input_ids"].size)
                                             for t in SENTENCES)
    status, _, body = call(f"{server.url}/embeddings", {"model": "minilm", "input": SENTENCES[0],
                                                        "encoding_format": "base64"})
    assert status == 200
    vector = np.frombuffer(base64.b64decode(json.loads(body)["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vector, expected[0], atol=1e-4)


# -- back-pressure and disconnects ------------------------------------------------------------

def test_overload_is_429_with_retry_after_at_once(module_clusters, config):
    small = module_clusters.start("""
        scheduler: {max_queue: 1}
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1}
        models:
          - {name: minilm, source: "packaged:minilm", tokenizer: "packaged:minilm-tokenizer",
             devices: [cpu0]}
    """)
    with HttpServer.from_config(config, small.address, small.token,
                                http=HttpConfig(address="127.0.0.1:0")).serve_in_thread() as s:
        texts = [" ".join(SENTENCES * 8)] * 200
        started = time.monotonic()
        status, headers, body = call(f"{s.url}/embeddings", {"model": "minilm", "input": texts})
        assert status == 429 and time.monotonic() - started < 10
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(body)["error"]["code"] == "overloaded"
        status, _, _ = call(f"{s.url}/embeddings", {"model": "minilm", "input": SENTENCES[0]})
        assert status == 200


def test_a_client_leaving_mid_stream_frees_the_slot(server, cluster):
    before = cluster.status()["counters"].get("cancelled", 0)

    async def read_one_chunk_and_leave():
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.url}/chat/completions", json={
                    "model": "smollm2", "messages": chat("Tell me a very long story."),
                    "max_tokens": 4000, "ignore_eos": True, "stream": True}) as r:
                assert r.status == 200 and r.headers["X-Fanout-Device"] == "llmcpu"
                assert (await r.content.readline()).startswith(b"data: ")
                assert worker(cluster.status(), "llmcpu")["in_flight"] == 1
            # leaving the block unread closes the connection

    asyncio.run(read_one_chunk_and_leave())
    wait_for(lambda: worker(cluster.status(), "llmcpu")["in_flight"] == 0, timeout=10,
             what="the abandoned stream's slot to be freed")
    assert cluster.status()["counters"]["cancelled"] > before


# -- bad requests ------------------------------------------------------------------------------

GOOD = {"model": "smollm2", "messages": chat("Hi"), "max_tokens": 4}


@pytest.mark.parametrize("path, body, status, param, code", [
    ("chat/completions", b"{not json", 400, None, None),
    ("chat/completions", b"[1, 2]", 400, None, None),
    ("chat/completions", GOOD | {"max_tokens": "ten"}, 400, "max_tokens", None),
    ("chat/completions", GOOD | {"messages": "Hi"}, 400, "messages", None),
    ("chat/completions", GOOD | {"temperature": -1}, 400, "temperature", None),
    ("chat/completions", GOOD | {"model": "gpt-9"}, 404, "model", "model_not_found"),
    ("chat/completions", GOOD | {"tools": [{"type": "function", "function": {"name": "a b"}}]},
     400, "tools[0].function.name", None),
    ("chat/completions", GOOD | {"tools": [{"type": "web_search"}]}, 400, "tools[0]", None),
    ("chat/completions", GOOD | {"messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0].tool_call_id", None),
    ("chat/completions", GOOD | {"response_format": {"type": "xml"}}, 400, "response_format",
     None),
    ("chat/completions", GOOD | {"logprobs": True, "top_logprobs": 2}, 400, "top_logprobs",
     "unsupported_parameter"),
    ("chat/completions", GOOD | {"logit_bias": {"42": 5}}, 400, "logit_bias",
     "unsupported_parameter"),
    ("chat/completions", GOOD | {"n": 17}, 400, "n", "unsupported_parameter"),
    ("chat/completions", GOOD | {"model": "minilm"}, 400, "model", "wrong_model_kind"),
    ("embeddings", {"model": "smollm2", "input": "Hi"}, 400, "model", "wrong_model_kind"),
    ("embeddings", {"model": "minilm", "input": [1, 2, 3]}, 400, "input",
     "unsupported_parameter"),
    ("completions", {"model": "smollm2", "prompt": "word " * 20000, "max_tokens": 4}, 400,
     None, None),
])
def test_bad_requests_get_openai_style_errors(server, path, body, status, param, code):
    got, _, raw = call(f"{server.url}/{path}", body, {"Content-Type": "application/json"})
    error = json.loads(raw)["error"]
    assert got == status, error
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    if param:
        assert param in error["message"] or "model" in error["message"]


def test_unknown_fields_are_ignored_and_logged_once_per_name(client, caplog):
    for _ in range(2):
        answer = client.chat.completions.create(model="smollm2", messages=chat("Hi"),
                                                max_tokens=2, extra_body={"mirostat": 2})
        assert answer.choices[0].message.content
    assert len([r for r in caplog.records if "'mirostat'" in r.getMessage()]) == 1


def test_an_over_long_prompt_says_context(server):
    _, _, raw = call(f"{server.url}/completions", {"model": "smollm2", "prompt": "word " * 20000})
    assert "context" in json.loads(raw)["error"]["message"]


def test_a_body_over_the_limit_is_413(server):
    status, _, raw = call(f"{server.url}/chat/completions", b"x" * (MAX_BODY + 1),
                          {"Content-Type": "application/json"})
    assert status == 413 and "max_body_bytes" in json.loads(raw)["error"]["message"]


def test_the_official_client_raises_its_own_error_types(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=chat("Hi"))
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="smollm2", messages=chat("Hi"), max_tokens=0)


# -- auth and binding --------------------------------------------------------------------------

def test_a_non_loopback_address_without_a_key_refuses_to_start(config, cluster):
    with pytest.raises(ConfigError, match="API key"):
        HttpServer.from_config(config, cluster.address, http=HttpConfig(address="0.0.0.0:0"))


def test_with_a_key_every_endpoint_but_liveness_needs_it(config, cluster):
    http = HttpConfig(address="0.0.0.0:0", api_key="s3cret")
    with HttpServer.from_config(config, cluster.address, cluster.token,
                                http=http).serve_in_thread() as s:
        url = f"http://127.0.0.1:{s.port}"
        status, _, raw = call(f"{url}/v1/models")
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
        assert call(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(f"{url}/metrics")[0] == 401
        assert call(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(f"{url}/health/live")[0] == 200
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert keyed.chat.completions.create(model="smollm2", messages=chat("Hi"),
                                             max_tokens=2).choices[0].message.content


# -- listing, health, metrics ------------------------------------------------------------------

def test_models_lists_every_model(client):
    models = client.models.list()
    assert sorted(m.id for m in models.data) == ["minilm", "smollm2"]
    assert all(m.owned_by == "fanout" and m.object == "model" for m in models.data)


def test_health_is_live_and_ready_with_the_devices_per_model(server):
    assert call(f"{base(server)}/health/live")[0] == 200
    status, _, raw = call(f"{base(server)}/health/ready")
    assert status == 200
    assert json.loads(raw)["models"] == {"minilm": ["cpu0"], "smollm2": ["llmcpu"]}


def test_metrics_show_per_device_histograms_and_counters_that_grow(server, client):
    """A real scrape, read with prometheus_client's own text parser: latency histograms per
    device and model (service, request, TTFT, inter-token, queue wait) and token counters
    that grow by what the requests used."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        status, headers, raw = call(f"{base(server)}/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(raw.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def value(samples: dict, name: str, **labels) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    on = dict(device="llmcpu", model="smollm2")
    before = scrape()
    plain = client.chat.completions.create(model="smollm2", messages=chat("Hi"), max_tokens=6,
                                           temperature=0, extra_body={"ignore_eos": True})
    streamed = list(client.chat.completions.create(
        model="smollm2", messages=chat("Hello"), max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    after = scrape()

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    usage = [plain.usage, streamed[-1].usage]
    assert grew("fanout_tasks_completed_total", **on) == 2
    assert grew("fanout_prompt_tokens_total", **on) == sum(u.prompt_tokens for u in usage)
    assert grew("fanout_completion_tokens_total", **on) == sum(u.completion_tokens
                                                               for u in usage) == 12
    for name in ("fanout_task_seconds", "fanout_request_seconds",
                 "fanout_time_to_first_token_seconds", "fanout_queue_wait_seconds"):
        assert grew(f"{name}_count", **on) == 2, name
        assert value(after, f"{name}_bucket", **on, le="+Inf") == value(after, f"{name}_count",
                                                                        **on)
    assert grew("fanout_inter_token_seconds_count", **on) >= 2 * 5 - 4  # tokens after the 1st
    ttft = grew("fanout_time_to_first_token_seconds_sum", **on)
    request = grew("fanout_request_seconds_sum", **on)
    assert 0 < ttft < request
    assert value(after, "fanout_queue_depth", model="smollm2") == 0
    assert grew("fanout_http_requests_total", endpoint="/v1/chat/completions", status="200") >= 2
    assert not any(name == "fanout_tokens_per_second" for name, _ in after)  # a counter + rate()


# -- fanout up ---------------------------------------------------------------------------------

def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fanout_up_serves_the_http_api_and_stops_on_ctrl_c(tmp_path):
    path = tmp_path / "up.yaml"
    path.write_text(textwrap.dedent("""
        devices:
          - {name: llmcpu, kind: cpu, backend: openvino-genai, capacity: 2}
        models:
          - {name: smollm2, source: "packaged:smollm2", devices: [llmcpu]}
    """))
    address, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "up", "--config", str(path),
                             "--address", address, "--http", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        wait_for(lambda: any("ready:" in line for line in lines), timeout=120, what="ready")
        assert any(f"HTTP API on http://127.0.0.1:{port}/v1" in line for line in lines)
        with runtime.connect(address) as fanout:
            pids = [w["pid"] for w in fanout.status()["workers"]]
        up = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0)
        answer = up.chat.completions.create(model="smollm2", messages=chat(QUESTIONS[0]),
                                            max_tokens=8)
        assert answer.model_extra["fanout"]["device"] == "llmcpu"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, "".join(lines)
        wait_for(lambda: not any(process_alive(p) for p in pids), timeout=10,
                 what="the workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_each_request_gets_one_access_log_line_and_a_refused_one_says_why(client, server, caplog):
    caplog.set_level("INFO", logger="fanout.http.access")
    list(client.chat.completions.create(model="smollm2", messages=chat("Hi"), max_tokens=4,
                                        stream=True))
    client.chat.completions.create(model="smollm2", messages=chat("Hi"), max_tokens=2)
    status, _, _ = call(f"{server.url}/chat/completions", {"model": "nosuch",
                                                           "messages": chat("Hi")})
    assert status == 404
    assert call(f"{server.url}/chat/completions", b"{not json")[0] == 400

    lines = [r.getMessage() for r in caplog.records if r.name == "fanout.http.access"]
    assert len(lines) == 4, lines
    streamed, plain, unknown, garbage = lines
    for line in (streamed, plain):
        assert re.search(r"POST /v1/chat/completions model=smollm2 status=200 device=llmcpu "
                         r"ttft=\S+ duration=\d+\.\d{3}s$", line), line
    assert re.search(r"ttft=\d+\.\d{3}s", streamed) and "ttft=-" in plain
    assert "model=nosuch status=404 device=-" in unknown
    assert unknown.endswith("refused: the model 'nosuch' does not exist; this cluster serves "
                            "['minilm', 'smollm2']")
    assert "status=400" in garbage and "refused: the request body is not valid JSON" in garbage
