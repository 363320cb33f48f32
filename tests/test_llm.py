"""LLM chat through the cluster: batching, NPU failover, mid-stream failover, cancel, limits.

Real SmolLM2-135M (Q4_1 GGUF) on openvino-genai, real worker processes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from runtime.bench.common import LLM_PROMPTS
from runtime.errors import InvalidInput

from .conftest import wait_for, worker

CHATS = LLM_PROMPTS  # the benchmark's eight chats


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def llm(module_clusters):
    """One CPU worker batching up to 8 sequences, behind an OpenVINO NPU that cannot load;
    with deterministic numerics, so that a sequence batched equals its run alone."""
    return module_clusters.start("""
        devices:
          - {name: ovnpu, kind: npu, backend: openvino-genai, capacity: 1}
          - {name: cpu0, kind: cpu, backend: openvino-genai, capacity: 8,
             options: {deterministic: true}}
        models:
          - {name: smollm2, source: "packaged:smollm2", devices: [ovnpu, cpu0]}
    """)


def test_eight_chats_at_once_are_each_answered_for_their_own_prompt(llm):
    client = llm.client()
    batched = client.generate_many("smollm2", [chat(c) for c in CHATS], max_tokens=8)
    alone = [client.generate("smollm2", chat(c), max_tokens=8) for c in CHATS]
    assert [c.usage["completion_tokens"] for c in batched] == [8] * 8
    # At temperature 0 the first 8 tokens of each batched sequence equal its run alone:
    # no cross-talk between the sequences decoded together.
    assert [c.text for c in batched] == [c.text for c in alone]
    assert "Paris" in client.generate("smollm2", chat(CHATS[0]), max_tokens=16).text


def test_a_failing_npu_sends_every_request_to_cpu_with_the_failover_recorded(llm):
    status = llm.status()
    npu = worker(status, "ovnpu")["models"]["smollm2"]
    assert npu["state"] == "unavailable" and npu["error"]
    for completion in llm.client().generate_many("smollm2", [chat(c) for c in CHATS[:3]],
                                                 max_tokens=4):
        assert completion.device == "cpu0"
        assert [(a.device, a.kind) for a in completion.attempts] == [
            ("ovnpu", "model_unavailable")]


def test_a_completion_reports_text_finish_reason_and_usage(llm):
    completion = llm.client().generate("smollm2", "The capital of France is", max_tokens=5,
                                       ignore_eos=True)
    assert completion.finish_reason == "length" and completion.text
    assert completion.usage["completion_tokens"] == 5
    assert completion.usage["prompt_tokens"] > 0
    assert completion.usage["total_tokens"] == completion.usage["prompt_tokens"] + 5


def test_streamed_text_equals_the_completion_at_temperature_0(llm):
    client = llm.client()
    chunks = list(client.stream("smollm2", chat(CHATS[2]), max_tokens=24))
    whole = client.generate("smollm2", chat(CHATS[2]), max_tokens=24)
    assert "".join(c.text for c in chunks) == whole.text
    assert len([c for c in chunks if c.text]) > 3  # it did stream, token by token
    assert chunks[-1].finish_reason == whole.finish_reason
    assert chunks[-1].usage == whole.usage
    assert all(c.device == "cpu0" for c in chunks)


def test_asyncio_twins_generate_and_stream(llm):
    import asyncio
    client = llm.client()

    async def main():
        completion = await client.agenerate("smollm2", chat(CHATS[4]), max_tokens=6)
        text = "".join([c.text async for c in client.astream("smollm2", chat(CHATS[4]),
                                                             max_tokens=6)])
        many = await client.agenerate_many("smollm2", [chat(c) for c in CHATS[:2]],
                                           max_tokens=4)
        return completion, text, many

    completion, text, many = asyncio.run(main())
    assert text == completion.text and len(many) == 2


def test_an_over_long_prompt_is_invalid_input_and_the_worker_lives_on(llm):
    pid = worker(llm.status(), "cpu0")["pid"]
    with pytest.raises(InvalidInput, match="context"):
        llm.client().generate("smollm2", "word " * 20000, max_tokens=8)
    assert worker(llm.status(), "cpu0")["pid"] == pid
    assert llm.client().generate("smollm2", chat(CHATS[4]), max_tokens=4).text


@pytest.mark.parametrize("params, match", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": [""]}, "stop"),
    ({"frequency_penalty": 3.0}, "frequency_penalty must be a number in -2..2"),
    ({"top_k": 4}, "unknown generation parameter"),
])
def test_bad_parameters_are_invalid_input_before_anything_is_sent(llm, params, match):
    with pytest.raises(InvalidInput, match=match):
        llm.client().generate("smollm2", chat(CHATS[0]), **params)


def test_bad_messages_and_unknown_models_are_invalid_input(llm):
    client = llm.client()
    with pytest.raises(InvalidInput, match="role"):
        client.generate("smollm2", [{"role": "robot", "content": "hi"}])
    with pytest.raises(InvalidInput, match="unknown model 'nope'"):
        client.generate("nope", chat("hi"))
    with pytest.raises(InvalidInput, match="does not generate text|generates text"):
        client.infer("smollm2", {"input_ids": [[1, 2]]})


@pytest.fixture
def one_slot(clusters):
    return clusters.start("""
        devices:
          - {name: cpu0, kind: cpu, backend: openvino-genai, capacity: 1}
        models:
          - {name: smollm2, source: "packaged:smollm2", devices: [cpu0]}
    """)


LONG = {"max_tokens": 4000, "ignore_eos": True}  # ~40 s here unless stopped


def test_leaving_a_stream_early_cancels_it_and_frees_the_slot(one_slot):
    client = one_slot.client()
    stream = client.stream("smollm2", chat("Tell me a very long story."), **LONG)
    assert next(stream).device == "cpu0"
    stream.close()
    # The slot is released only when the worker confirms the sequence stopped.
    wait_for(lambda: worker(one_slot.status(), "cpu0")["in_flight"] == 0, timeout=15,
             what="the cancelled sequence to free its slot")
    assert one_slot.status()["counters"]["cancelled"] == 1
    assert client.generate("smollm2", chat(CHATS[4]), max_tokens=4).device == "cpu0"


def test_a_client_that_disappears_mid_stream_frees_its_slot(one_slot):
    script = textwrap.dedent(f"""
        import runtime, sys
        client = runtime.connect({one_slot.address!r})
        for chunk in client.stream("smollm2", [{{"role": "user", "content": "Story!"}}],
                                   max_tokens=4000, ignore_eos=True):
            print("chunk", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "chunk"
        wait_for(lambda: worker(one_slot.status(), "cpu0")["in_flight"] == 1,
                 what="the stream to be running")
        os.kill(proc.pid, signal.SIGKILL)  # no goodbye, no cancel
        proc.wait()
        wait_for(lambda: worker(one_slot.status(), "cpu0")["in_flight"] == 0, timeout=20,
                 what="the vanished client's sequence to be cancelled")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert one_slot.client().generate("smollm2", chat(CHATS[4]), max_tokens=4).text


@pytest.mark.parametrize("fault, says", [
    ('fail_after_tokens: 5, message: "device reset mid-stream"', "device reset mid-stream"),
    # A token id no vocabulary has: the scheduler refuses the message and tells the worker,
    # which stops (and is restarted); the id reaches neither the client nor llm1's prefix.
    ("garble_after_tokens: 5", "could not be read (tokens.ids[0]: expected a token id"),
], ids=["device error", "broken message"])
def test_a_device_failing_mid_stream_continues_on_the_next_without_losing_text(
        clusters, fault, says):
    # smollm2 skips the warm-up that measures devices: both are unmeasured alike, and its
    # device order starts the stream on llm0 (a measured llm1 had won it on a loaded machine).
    # Deterministic numerics: the continuation on llm1 from the streamed ids equals the
    # uninterrupted run.
    cluster = clusters.start(f"""
        devices:
          - {{name: llm0, kind: cpu, backend: openvino-genai, capacity: 1,
             options: {{deterministic: true}}, faults: {{{fault}}}}}
          - {{name: llm1, kind: cpu, backend: openvino-genai, capacity: 1,
             options: {{deterministic: true}}}}
        models:
          - {{name: smollm2, source: "packaged:smollm2", devices: [llm0, llm1], options: {{
             llm0: {{warmup: false}}, llm1: {{warmup: false}}}}}}
          - {{name: smollm2-ref, source: "packaged:smollm2", devices: [llm1],
             options: {{llm1: {{warmup: false}}}}}}
    """)
    client = cluster.client()
    request = chat("Explain why the sky is blue in two sentences.")
    chunks = list(client.stream("smollm2", request, max_tokens=32, ignore_eos=True))
    reference = client.generate("smollm2-ref", request, max_tokens=32, ignore_eos=True)
    assert "".join(c.text for c in chunks) == reference.text  # nothing repeated or lost
    moved = [c for c in chunks if c.previous_device]
    assert len(moved) == 1 and moved[0].previous_device == "llm0" and moved[0].device == "llm1"
    assert chunks[0].device == "llm0" and chunks[-1].device == "llm1"
    final = chunks[-1]
    assert final.usage["completion_tokens"] == 32
    (attempt,) = final.attempts
    assert attempt.device == "llm0" and says in attempt.message, attempt
    if fault.startswith("garble"):  # the worker that sent it was told, stopped, came back
        wait_for(lambda: worker(cluster.status(), "llm0")["restarts"] == 1
                 and worker(cluster.status(), "llm0")["state"] == "up",
                 timeout=60, what="llm0 to be restarted")
        assert cluster.status()["cluster"]["internal_errors"] == 0
    assert client.generate("smollm2-ref", request, max_tokens=4).text  # the cluster goes on


def test_a_generation_past_its_deadline_is_stopped_and_its_slot_freed(one_slot):
    from runtime.errors import DeadlineExceeded
    client = one_slot.client()
    with pytest.raises(DeadlineExceeded):
        client.generate("smollm2", chat("Tell me a very long story."), timeout=1.0, **LONG)
    wait_for(lambda: worker(one_slot.status(), "cpu0")["in_flight"] == 0, timeout=15,
             what="the expired sequence to be stopped by the worker")
    assert client.generate("smollm2", chat(CHATS[4]), max_tokens=4).device == "cpu0"


def test_generations_beyond_the_queue_bound_get_overloaded(clusters):
    from runtime.errors import Overloaded
    cluster = clusters.start("""
        scheduler: {max_queue: 1}
        devices:
          - {name: cpu0, kind: cpu, backend: openvino-genai, capacity: 1}
        models:
          - {name: smollm2, source: "packaged:smollm2", devices: [cpu0]}
    """)
    outcomes = cluster.client().generate_many(
        "smollm2", [chat(c) for c in CHATS[:6]], return_exceptions=True, max_tokens=16,
        ignore_eos=True)
    overloaded = [o for o in outcomes if isinstance(o, Overloaded)]
    served = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(overloaded) + len(served) == 6
    assert overloaded and len(served) >= 2  # one running, one queued
    assert all(o.usage["completion_tokens"] == 16 for o in served)
