"""Typed records on the wire: every message, the status and the error tree survive a round trip,
and anything malformed is a ``ProtocolError`` that says where, not a ``KeyError`` later."""
from __future__ import annotations

import json
from dataclasses import fields

import msgpack
import numpy as np
import pytest

from runtime import errors
from runtime.bench.fuzz import Fuzzer
from runtime.errors import ERROR_KINDS, Attempt, DeviceError, ProtocolError, error_from_wire
from runtime.wire import protocol as p
from runtime.wire import typed
from runtime.wire.status import (
    ClusterInfo,
    Histogram,
    ModelLoad,
    ModelStatus,
    Status,
    WorkerStatus,
)

SAMPLES = [
    p.Hello(version=p.PROTOCOL_VERSION, role="client", token="t", keepalive_s=1.0),
    p.Hello(version=p.PROTOCOL_VERSION, role="client", previous=b"C" + bytes(range(16))),
    p.KeepAlive(),
    p.Bye(),
    p.Welcome(version=p.PROTOCOL_VERSION, cluster=ClusterInfo("tcp://h:1", models=("m",))),
    p.Submit(task_id="t1", model="m", inputs={"x": np.arange(4, dtype=np.int64)}),
    p.Generate(task_id="t2", model="m", request={"prompt": "hi"}, stream=True),
    p.Chunk(task_id="t2", text="Hel", device="cpu0", previous_device="npu0"),
    p.Completion(task_id="t2", text="Hello", finish_reason="stop", device="cpu0",
                 usage={"prompt_tokens": 1}, attempts=[Attempt("npu0", "device", "boom")]),
    p.Cancel(task_id="t1"),
    p.StatusRequest(req_id="r1"),
    p.Shutdown(req_id="r2"),
    p.Result(task_id="t1", device="cpu0", outputs={"y": np.ones((1, 2), np.float32)},
             attempts=[Attempt("npu0", "unsupported", "static shape")], service_s=0.5),
    p.Failure(task_id="t1", error=DeviceError("boom", [Attempt("npu0", "device", "x")])),
    p.Reply(req_id="r1", body={"stopping": True}),
    p.Register(version=p.PROTOCOL_VERSION, device="cpu0", epoch=1, pid=2, node="n",
               models={"m": ModelLoad("ready", load_s=0.5)}),
    p.ModelState(model="m", load=ModelLoad("unavailable", error="QNN: no memory")),
    p.Heartbeat(in_flight=1, peak_running=2),
    p.Run(attempt=1, model="m", inputs={"x": np.zeros(3, np.uint8)}, timeout_s=2.0),
    p.RunGenerate(attempt=2, model="m", request={"prompt": "hi"}, prefix_ids=[1, 2],
                  prefix_text="a"),
    p.Tokens(attempt=2, ids=[3], text="b"),
    p.Generated(attempt=2, finish_reason="length", prompt_tokens=3, completion_tokens=4),
    p.CancelRun(attempt=1),
    p.Done(attempt=1, outputs={"y": np.ones(2, np.float64)}, service_s=0.1),
    p.Failed(attempt=1, kind="model_unavailable", message="gone"),
    p.Ping(),
    p.Stop(),
]
EVERY_TYPE = (p.CLIENT_TO_SCHEDULER | p.SCHEDULER_TO_CLIENT | p.WORKER_TO_SCHEDULER
              | p.SCHEDULER_TO_WORKER)


def round_trip(msg: p.Message) -> p.Message:
    frames = [bytes(f) for f in p.encode(msg)]
    return p.Decoder(EVERY_TYPE, 1 << 20).decode(frames)


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b) and a.dtype == b.dtype
    if isinstance(a, errors.FanoutError):
        return type(a) is type(b) and a.to_wire() == b.to_wire()
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def test_every_message_type_has_a_sample_here():
    assert {type(m) for m in SAMPLES} == set(EVERY_TYPE)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_every_message_survives_encode_and_decode_with_its_types(msg):
    back = round_trip(msg)
    assert type(back) is type(msg)
    for name in vars(msg):
        assert same(getattr(msg, name), getattr(back, name)), name


def raw(**fields) -> list[bytes]:
    return [msgpack.packb({"v": p.PROTOCOL_VERSION, **fields})]


@pytest.mark.parametrize("fields, where", [
    ({"t": "result", "task_id": "t9", "device": "cpu0",
      "attempts": [{"kind": "device", "message": "m"}]}, "result.attempts[0]"),
    ({"t": "failure", "task_id": "t9", "error": {"kind": "melted", "message": "m"}},
     "unknown error kind 'melted'"),
    ({"t": "failure", "task_id": "t9", "error": "device"}, "failure.error"),
    ({"t": "completion", "task_id": "t9", "text": "a", "finish_reason": "stop",
      "device": 3}, "completion.device: expected str, got int"),
    ({"t": "model_state", "task_id": "t9", "model": "m", "load": {"state": "cooking"}},
     "model_state.load.state"),
    ({"t": "failed", "task_id": "t9", "attempt": 1, "kind": "??", "message": "m"},
     "failed.kind"),
])
def test_a_malformed_nested_field_is_a_protocol_error_naming_it_and_its_task(fields, where):
    with pytest.raises(ProtocolError) as info:
        p.Decoder(EVERY_TYPE, 1 << 20).decode(raw(**fields))
    assert where in str(info.value)
    assert info.value.ref == "t9" and info.value.msg_type == fields["t"]


@pytest.mark.parametrize("fields, where", [
    ({"ids": ["7"]}, "tokens.ids[0]: expected int"),
    ({"ids": [5, 1 << 40]}, "tokens.ids[1]: expected a token id"),
    ({"ids": [-1]}, "tokens.ids[0]: expected a token id"),
    ({"ids": [True]}, "tokens.ids[0]: expected int"),
    ({"tool_calls": ["get_weather"]}, "tokens.tool_calls[0]: expected a map"),
    ({"tool_calls": [{"name": 3, "arguments": "{}"}]}, "tokens.tool_calls[0]: expected a tool"),
    ({"tool_calls": [{"name": "f", "arguments": {}}]}, "tokens.tool_calls[0]: expected a tool"),
    ({"tool_calls": [{"name": "f", "arguments": "{}", "index": -1}]}, "tokens.tool_calls[0]"),
    ({"logprobs": [["a"]]}, "tokens.logprobs[0]: expected tuple[str, float]"),
    ({"logprobs": [["a", float("nan")]]}, "tokens.logprobs[0][1]: expected a finite float"),
    ({"logprobs": [[1, -0.5]]}, "tokens.logprobs[0][0]: expected str"),
], ids=["id not an int", "id past int32", "negative id", "id a bool", "call not a map",
        "name not a string", "arguments not a string", "negative index",
        "logprob without its value", "nan logprob", "token not a string"])
def test_tokens_a_worker_streams_are_checked_where_they_arrive(fields, where):
    """What a worker streams is passed on as it came (to the client, and as the prefix of a
    re-run on another device): a broken one is refused on arrival, naming the field, and the
    scheduler can still tell which run it was about."""
    frames = p.encode(p.Tokens(attempt=41, **fields))
    with pytest.raises(ProtocolError) as info:
        p.Decoder(p.WORKER_TO_SCHEDULER, 1 << 20).decode(frames)
    assert where in str(info.value)
    assert p.peek_attempt(frames[0]) == 41


def test_well_formed_tokens_and_finish_reasons_pass_and_others_do_not():
    decode = p.Decoder(p.WORKER_TO_SCHEDULER, 1 << 20).decode
    good = p.Tokens(attempt=2, ids=[0, (1 << 31) - 1], text="Hi", logprobs=[["Hi", -0.25]],
                    tool_calls=[{"index": 1, "name": "get_weather", "arguments": '{"c": 1}'}])
    assert decode(p.encode(good)) == p.Tokens(
        attempt=2, ids=good.ids, text="Hi", logprobs=[("Hi", -0.25)], tool_calls=good.tool_calls)
    for reason in ("stop", "length", "tool_calls"):
        assert decode(p.encode(p.Generated(attempt=2, finish_reason=reason))).finish_reason \
            == reason
    with pytest.raises(ProtocolError, match="generated.finish_reason: expected 'stop'"):
        decode(p.encode(p.Generated(attempt=2, finish_reason="content_filter")))
    assert p.peek_attempt(msgpack.packb({"t": "done", "attempt": "7"})) is None
    assert p.peek_attempt(b"\xc1garbage") is None


def test_a_hello_naming_its_previous_connection_in_anything_but_bytes_is_refused():
    for bad, got in (("C0123", "str"), (12, "int"), ([1], "list")):
        with pytest.raises(ProtocolError, match=f"hello.previous: expected bytes, got {got}"):
            p.Decoder(EVERY_TYPE, 1 << 20).decode(raw(t="hello", version=p.PROTOCOL_VERSION,
                                                      role="client", previous=bad))


def a_status() -> Status:
    latency = Histogram()
    for seconds in (0.002, 0.02, 0.02, 120.0):
        latency.observe(seconds)
    model = ModelStatus("ready", detail="ready", load_s=1.5, done=4, expected_s=0.01,
                        breaker="half-open", latency=latency, prompt_tokens=3,
                        completion_tokens=7)
    return Status(
        workers=(WorkerStatus("npu0", "npu", "up", 41, "host", 1, models={"m": model}),
                 WorkerStatus("cpu0", "cpu", "gone", last_exit="node left",
                              models={"m": ModelStatus("gone", detail="node left")})),
        queued=2, unanswered=3, max_queue=10, queued_by_model={"m": 2},
        cluster=ClusterInfo("tcp://h:1", ready=True, models=("m",)))


def test_a_status_survives_msgpack_and_json_and_reads_by_attribute():
    status = a_status()
    for codec in (lambda d: msgpack.unpackb(msgpack.packb(d)),
                  lambda d: json.loads(json.dumps(d))):
        back = Status.from_wire(codec(status.to_wire()))
        assert back == status
    assert back.worker("npu0").models["m"].latency.count == 4
    assert back.worker("npu0").models["m"].latency.buckets()[-1] == ("+Inf", 4)


def test_the_status_keeps_its_plain_form_for_json_users():
    wire = a_status().to_wire()
    model = wire["workers"][0]["models"]["m"]
    assert model["latency"]["buckets"][:3] == [[0.005, 1], [0.01, 1], [0.025, 3]]
    assert model["latency"]["count"] == 4 and model["state"] == "ready"
    assert wire["cluster"]["ready"] is True and wire["counters"]["completed"] == 0


@pytest.mark.parametrize("change, where", [
    (lambda w: w["workers"][0].pop("device"), "status.workers[0]: missing field 'device'"),
    (lambda w: w["workers"][1].update(state="sleeping"), "status.workers[1].state"),
    (lambda w: w["workers"][0]["models"]["m"].update(done="4"), "models.m.done"),
    (lambda w: w["workers"][0]["models"]["m"]["latency"]["buckets"].pop(),
     "models.m.latency: buckets"),
    (lambda w: w.update(counters=[]), "status.counters"),
    (lambda w: w.update(workers={}), "status.workers"),
])
def test_a_malformed_status_is_a_protocol_error_saying_where(change, where):
    wire = a_status().to_wire()
    change(wire)
    with pytest.raises(ProtocolError, match=where.replace("[", r"\[").replace("]", r"\]")):
        Status.from_wire(wire)


def test_error_kinds_are_the_kinds_of_the_error_classes():
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.FanoutError)]
    assert {c.kind for c in classes} == ERROR_KINDS
    assert len(classes) == len(ERROR_KINDS)  # one class per kind


@pytest.mark.parametrize("bad", [
    None, [], {"message": "m"}, {"kind": "device"}, {"kind": "nope", "message": "m"},
    {"kind": "device", "message": "m", "attempts": [{"device": "x"}]},
    {"kind": "device", "message": "m", "attempts": "x"},
])
def test_an_error_from_the_wire_that_is_not_one_is_a_protocol_error(bad):
    with pytest.raises(ProtocolError):
        error_from_wire(bad)


def test_an_error_survives_the_wire_with_its_class_and_attempts():
    error = errors.NoDeviceAvailable("none", [Attempt("npu0", "worker_gone", "left")])
    back = error_from_wire(error.to_wire())
    assert type(back) is errors.NoDeviceAvailable and back.attempts == error.attempts


def test_an_array_larger_than_a_frame_travels_in_frames_of_at_most_frame_bytes():
    big = np.arange(3 * p.FRAME_BYTES // 8 + 5, dtype=np.int64)  # 3 frames and a bit
    frames = p.encode(p.Submit(task_id="t", model="m", inputs={"a": big,
                                                              "b": np.ones(3, np.float32)}))
    assert [len(f) for f in frames[1:]] == [p.FRAME_BYTES] * 3 + [40, 12]
    decoder = p.Decoder(EVERY_TYPE, 1 << 30, decode_arrays=False)
    raw = decoder.decode([bytes(f) for f in frames])  # as the scheduler holds it
    forwarded = p.encode(p.Run(attempt=1, model="m", inputs=raw.inputs))
    back = p.Decoder(EVERY_TYPE, 1 << 30).decode([bytes(f) for f in forwarded])
    np.testing.assert_array_equal(back.inputs["a"], big)
    np.testing.assert_array_equal(back.inputs["b"], np.ones(3, np.float32))


def test_array_frames_that_do_not_add_up_are_a_protocol_error():
    head = msgpack.packb({"v": p.PROTOCOL_VERSION, "t": "submit", "task_id": "t", "model": "m",
                          "inputs": [["a", "uint8", [p.FRAME_BYTES + 1]]]})
    for data, say in (([b"\0" * (p.FRAME_BYTES + 1)], "in 2 frame"),  # one oversized frame
                      ([b"\0" * p.FRAME_BYTES], "got 1048576 in 1"),  # one frame short
                      ([b"\0" * p.FRAME_BYTES, b"\0", b"\0"], "1 data frames more")):
        with pytest.raises(ProtocolError, match=say) as info:
            p.Decoder(EVERY_TYPE, 1 << 30).decode([head, *data])
        assert info.value.ref == "t"


def test_a_header_too_large_to_decode_still_names_its_task():
    head = msgpack.packb({"v": p.PROTOCOL_VERSION, "t": "submit", "junk": "x" * 2_000_000,
                          "task_id": "mine", "model": "m"})
    with pytest.raises(ProtocolError, match="header of .* exceeds") as info:
        p.Decoder(EVERY_TYPE, 1 << 30).decode([head])
    assert (info.value.msg_type, info.value.ref) == ("submit", "mine")


@pytest.mark.parametrize("where", ["v", "t", "task_id", "inputs"])
def test_a_field_nested_a_thousand_deep_is_a_protocol_error_not_a_crash(where):
    fields = {"v": p.PROTOCOL_VERSION, "t": "submit", "task_id": "t", "model": "m", "inputs": []}
    packed = msgpack.packb({**fields, where: "PLACEHOLDER"})
    deep = packed.replace(msgpack.packb("PLACEHOLDER"), b"\x91" * 1020 + b"\xc0")
    with pytest.raises(ProtocolError):
        p.Decoder(EVERY_TYPE, 1 << 30).decode([deep])


# -- the typed fast path (wire/typed.py) -------------------------------------------------------

def _full_only(decoder: p.Decoder) -> p.Decoder:
    full = p.Decoder(frozenset(decoder.allowed.values()), decoder.max_bytes,
                     decode_arrays=decoder.decode_arrays)
    full._typed = typed.Reader(set())  # reads nothing: every message takes the full path
    return full


def _outcome(decoder: p.Decoder, frames: list):
    try:
        return decoder.decode(frames)
    except ProtocolError as exc:
        return ("refused", exc.message, exc.ref, exc.msg_type)


def _fuzzed(side: str, seed: int, count: int, extra: tuple[str, ...] = ()):
    """Fuzzed messages of one side; ``extra``: types the fuzzer does not send (from the
    scheduler), built from valid headers and mutated the same way."""
    fuzzer = Fuzzer(side, seed=seed)
    valid = {"run": {"attempt": 3, "model": "noop", "inputs": [["x", "float32", [4]]],
                     "timeout_s": 2.0},
             "result": {"task_id": "fz-1", "device": "cpu0", "outputs": [["x", "float32", [4]]],
                        "service_s": 0.01, "submitted_at": 1.0, "started_at": 1.5,
                        "finished_at": 2.0, "attempts": []}}
    for i in range(count):
        if extra and i % 2:
            header = {"v": p.PROTOCOL_VERSION, "t": extra[i % len(extra)],
                      **valid[extra[i % len(extra)]]}
            for _ in range(fuzzer.rng.choice([0, 0, 1, 2])):
                fuzzer._mutate(header)
            yield [fuzzer._pack(header)] + fuzzer._data_frames(header)
        else:
            yield fuzzer.frames(packs=False)  # single messages: packs are split before this


@pytest.mark.parametrize("side, allowed, extra", [
    ("client", p.CLIENT_TO_SCHEDULER, ()),
    ("worker", p.WORKER_TO_SCHEDULER, ()),
    ("client", p.SCHEDULER_TO_WORKER, ("run",)),
    ("client", p.SCHEDULER_TO_CLIENT, ("result",)),
])
def test_the_typed_fast_path_reads_exactly_what_the_full_decoder_reads(side, allowed, extra):
    # Given a socket's decoder, and the same one made to read everything the full way,
    fast = p.Decoder(allowed, 1 << 20, decode_arrays=False)
    full = _full_only(fast)
    took_fast = 0
    # when thousands of fuzzed messages (valid ones among them) are read by both,
    for frames in _fuzzed(side, seed=7, count=3000, extra=extra):
        took_fast += fast._fast(frames) is not None
        # then each is the same message, or refused with the same error.
        assert _outcome(fast, frames) == _outcome(full, frames), frames[:1]
    assert took_fast >= 50  # the fast path did read a good share of them


def test_the_typed_fast_path_reads_every_field_of_a_task_round_trip():
    inputs = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    for msg, allowed in [
            (p.Submit(task_id="t", model="m", inputs=inputs, timeout_s=1.5),
             p.CLIENT_TO_SCHEDULER),
            (p.Run(attempt=7, model="m", inputs=inputs, timeout_s=None), p.SCHEDULER_TO_WORKER),
            (p.Done(attempt=7, outputs=inputs, service_s=0.25, batch=4), p.WORKER_TO_SCHEDULER),
            (p.Result(task_id="t", device="cpu0", outputs=inputs, service_s=0.25,
                      submitted_at=1.0, started_at=2.0, finished_at=3.0),
             p.SCHEDULER_TO_CLIENT)]:
        decoder = p.Decoder(allowed, 1 << 20)
        frames = p.encode(msg)
        got = decoder._fast(frames)
        assert got is not None, msg
        assert type(got) is type(msg)
        for f in fields(msg):
            if f.name == type(msg).ARRAYS:
                np.testing.assert_array_equal(getattr(got, f.name)["x"], inputs["x"])
            else:
                assert getattr(got, f.name) == getattr(msg, f.name), f.name


ROUND_TRIP = [
    p.Submit(task_id="t", model="m", inputs={"x": np.ones((2, 3), np.float16)}, timeout_s=1.5),
    p.Run(attempt=7, model="m", inputs={"a": np.zeros(3, bool), "b": np.arange(2)}),
    p.Done(attempt=7, outputs={}, service_s=0.25, batch=4),
    p.Result(task_id="t", device="cpu0", outputs={"y": np.ones(4, np.float32)}, service_s=0.5,
             submitted_at=1.0, started_at=2.0, finished_at=3.0),
    p.Result(task_id="t", device="cpu0", attempts=[Attempt("npu0", "device", "reset")])]


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=lambda m: type(m).__name__)
def test_the_typed_writer_writes_the_header_and_frames_the_field_by_field_one_does(msg):
    fast, full = p.encode(msg), p._encode_fields(msg)
    assert msgpack.unpackb(fast[0]) == msgpack.unpackb(full[0])
    assert [bytes(f) for f in fast[1:]] == [bytes(f) for f in full[1:]]


def test_an_array_in_big_endian_order_arrives_with_its_values():
    x = np.arange(6, dtype=">f4").reshape(2, 3)
    got = p.Decoder(p.CLIENT_TO_SCHEDULER, 1 << 20).decode(
        p.encode(p.Submit(task_id="t", model="m", inputs={"x": x})))
    np.testing.assert_array_equal(got.inputs["x"], x)
    assert got.inputs["x"].dtype == np.float32


# -- packs: several messages in one multipart message ------------------------------------------

def submit_frames(i: int, n: int = 4) -> list:
    return p.encode(p.Submit(task_id=f"t{i}", model="m", inputs={"x": np.full(n, i, np.float32)}))


def test_packs_carry_messages_in_order_within_their_bounds_and_a_large_one_alone():
    big = submit_frames(-1, n=p.PACK_BYTES // 4 + 1)  # over PACK_BYTES by itself
    messages = [submit_frames(i) for i in range(10)] + [big] + \
        [submit_frames(i) for i in range(10, 10 + 2 * p.PACK_MESSAGES)]
    sent = p.packed(messages)
    assert sent[1] is big  # alone, as itself
    decoder = p.Decoder(p.CLIENT_TO_SCHEDULER, 1 << 24)
    got = [decoder.decode(m) for frames in sent for m in p.unpack(frames)]
    assert [m.task_id for m in got] == [decoder.decode(m).task_id for m in messages]
    np.testing.assert_array_equal(got[-1].inputs["x"], np.full(4, 9 + 2 * p.PACK_MESSAGES))
    for frames in sent:
        parts = p.unpack(frames)
        assert len(parts) <= p.PACK_MESSAGES
        if len(parts) > 1:
            assert p.frames_size(frames[1:]) <= p.PACK_BYTES
    assert p.unpack(messages[0]) == [messages[0]]  # a message alone is itself
    assert p.packed([messages[0]]) == [messages[0]]


def pack_of(counts, frames) -> list:
    return [msgpack.packb({"v": p.PROTOCOL_VERSION, "t": "pack", "n": counts})] + frames


@pytest.mark.parametrize("counts, extra, says", [
    ([2, 2], 1, "add up to 4, but 5 frames"),
    ([2, 3], 0, "add up to 5, but 4 frames"),
    ([4], 0, "2 to 256 positive integers"),
    ([2, 0, 2], 0, "positive integers"),
    ([2, True, 1], 0, "positive integers"),
    ([2, "2"], 0, "positive integers"),
    ("22", 0, "positive integers"),
    ([1] * (p.PACK_MESSAGES + 1), 0, "unreadable frame counts"),
])
def test_a_pack_whose_header_does_not_describe_its_frames_is_a_protocol_error(counts, extra, says):
    frames = submit_frames(1) + submit_frames(2) + [b"x"] * extra
    with pytest.raises(ProtocolError, match="pack: .*" + says.replace("(", r"\(")):
        p.unpack(pack_of(counts, frames))


def test_a_pack_over_its_byte_bound_is_refused_and_a_pack_inside_a_pack_is_no_message():
    half = submit_frames(1, n=p.PACK_BYTES // 8 + 64)
    with pytest.raises(ProtocolError, match="over the limit of"):
        p.unpack(pack_of([2, 2], half + half))
    inner = p.pack([submit_frames(1), submit_frames(2)])
    outer = p.unpack(p.pack([inner, submit_frames(3)]))
    with pytest.raises(ProtocolError, match="unexpected message type 'pack'"):
        p.Decoder(p.CLIENT_TO_SCHEDULER, 1 << 20).decode(outer[0])
    assert p.Decoder(p.CLIENT_TO_SCHEDULER, 1 << 20).decode(outer[1]).task_id == "t3"


def test_frames_go_and_come_whole_through_the_socket_helpers():
    import zmq
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://frames")
        b.connect("inproc://frames")
        with pytest.raises(zmq.Again):
            p.recv_frames(b)  # nothing waits
        big = np.arange(300_000, dtype=np.float32)  # two frames of its own
        sent = [p.pack([submit_frames(1), [b""], submit_frames(2)]),
                p.encode(p.Submit(task_id="big", model="m", inputs={"x": big}))]
        for frames in sent:
            p.send_frames(a, frames)
        p.send_frames(a, [b"alone"], nonblocking=True)
        assert b.poll(2000)
        got = [p.recv_frames(b) for _ in sent]
        for frames, came in zip(sent, got):
            assert [bytes(f.buffer) for f in came] == [bytes(f) for f in frames]
        assert [f.bytes for f in p.recv_frames(b)] == [b"alone"]
        decoder = p.Decoder(p.CLIENT_TO_SCHEDULER, 1 << 24)
        assert decoder.decode(p.unpack(got[0])[2]).task_id == "t2"
        np.testing.assert_array_equal(decoder.decode(got[1]).inputs["x"], big)
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("shape", [[0] * 33, [1] * 33, [-1, 4], [2.0, 2], [True, 4], [2**40]],
                         ids=["33 dims of size 0", "33 dims", "negative", "float", "bool",
                              "too large"])
def test_an_array_of_a_bad_shape_is_a_protocol_error_on_either_path(shape):
    head = msgpack.packb({"v": p.PROTOCOL_VERSION, "t": "submit", "task_id": "t", "model": "m",
                          "inputs": [["x", "float32", shape]]})
    for decode_arrays in (True, False):
        decoder = p.Decoder(p.CLIENT_TO_SCHEDULER, 1 << 20, decode_arrays=decode_arrays)
        with pytest.raises(ProtocolError, match="bad shape") as info:
            decoder.decode([head, b""])
        assert info.value.ref == "t"
