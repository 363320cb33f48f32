"""The worker's core on a real onnxruntime session: what it decides about a run, before any
socket sees it (outputs too large for a message are the task's fault; a tensor model asked
to generate is a wrong task), and the load states it reports."""
from __future__ import annotations

import queue

import numpy as np
import pytest

from runtime.backends.base import ModelSpec
from runtime.backends.onnx import OnnxCpuBackend
from runtime.backends.onnx_proto import one_node_model
from runtime.core.worker import LoadChanged, Outcome, WorkerCore
from runtime.wire import protocol as p
from runtime.wire.generation import GenRequest

SHAPE = (1, 256)  # float32: 1 KiB of outputs


class Events(queue.SimpleQueue):
    """What the core emits, in order."""

    def next(self, kind: type, timeout: float = 10.0):
        while not isinstance(event := self.get(timeout=timeout), kind):
            pass
        return event

    def until_loaded(self) -> list[str]:
        states = [self.next(LoadChanged).load.state]
        while states[-1] == "loading":
            states.append(self.next(LoadChanged).load.state)
        return states


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def core(tmp_path, events):
    """A worker core for an Identity model, whose result messages may hold 4 KiB."""
    path = tmp_path / "identity.onnx"
    path.write_bytes(one_node_model("Identity", ["x"], SHAPE, "identity"))
    worker = WorkerCore("cpu0", 2, OnnxCpuBackend(), [ModelSpec("id", str(path))], events.put,
                        max_output_bytes=4096)
    worker.start_loading()
    yield worker
    worker.close()


def test_a_model_is_reported_loading_then_ready(core, events):
    states = events.until_loaded()
    assert states[0] == "loading" and states[-1] == "ready" == core.states["id"].state
    assert core.states["id"].load_s > 0


def test_outputs_that_fit_a_message_are_the_runs_outcome(core, events):
    events.until_loaded()
    x = np.arange(256, dtype=np.float32).reshape(SHAPE)
    core.run(1, "id", {"x": x})
    outcome = events.next(Outcome)
    assert outcome.kind is None and np.array_equal(outcome.outputs["y"], x)
    assert len(b"".join(bytes(f) for f in p.encode(p.Done(attempt=1, outputs=outcome.outputs)))) \
        <= p.result_bytes(outcome.outputs) <= 4096


def test_outputs_over_the_message_limit_fail_the_task_as_invalid_input(core, events):
    events.until_loaded()
    core.max_output_bytes = 1000  # under the 1 KiB the model returns
    core.run(2, "id", {"x": np.zeros(SHAPE, np.float32)})
    outcome = events.next(Outcome)
    assert outcome.kind == "invalid_input" and outcome.outputs is None
    assert "exceed the limit of 1000 bytes" in outcome.message
    assert "scheduler.max_message_bytes" in outcome.message


def test_a_tensor_model_asked_to_generate_is_a_wrong_task(core, events):
    events.until_loaded()
    core.generate(3, "id", GenRequest(prompt="hi"))
    outcome = events.next(Outcome)
    assert outcome.kind == "invalid_input" and "does not generate text" in outcome.message
