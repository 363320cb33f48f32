"""``fanout bench overhead``: what the runtime costs per message, against the wire's floor.

One no-op model (an ONNX Identity over 4 floats) on one capacity-2 onnxruntime CPU worker.
Each round measures, one after another, so the figures share the machine's state:
- the floor: a raw pyzmq + msgpack echo between two processes (the same frames a task sends:
  a msgpack header and the array), the median round trip;
- ``infer()``'s median round trip (client -> scheduler -> worker and back), target <= 2x the
  echo;
- ``map()`` of ``FANOUT_TASKS`` no-op tasks, target >= 10,000 tasks/s;
then the memory of the scheduler and the worker after fan-outs of growing width (flat: the
runtime holds one session per model and device, and a window of tasks, whatever the width).
The machine is shared: the rounds are repeated and medians reported, with the load average.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

import runtime

from ..backends.onnx_proto import one_node_model
from .common import hardware

NOOP_SHAPE = (1, 4)
ROUND_TRIPS = 2000
FANOUT_TASKS = 10_000
WIDTHS = (1_000, 10_000, 50_000)
TARGET_ROUND_TRIP_X, TARGET_RATE = 2.0, 10_000.0

ECHO_SERVER = textwrap.dedent("""
    import sys, zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2:
            break
        sock.send_multipart(frames, copy=False)
""")


def echo_round_trip(n: int) -> float:
    """Median seconds of a raw DEALER -> ROUTER echo of a msgpack header and one array."""
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE,
                              text=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        assert server.stdout is not None
        sock.connect(f"tcp://127.0.0.1:{int(server.stdout.readline())}")
        arr = np.ones(NOOP_SHAPE, np.float32)
        times = []
        for i in range(n + 100):
            started = time.perf_counter()
            header = msgpack.packb({"v": 2, "t": "submit", "task_id": f"t-{i}", "model": "noop",
                                    "inputs": [["x", "float32", list(arr.shape)]]})
            sock.send_multipart([header, arr.data], copy=False)
            frames = sock.recv_multipart(copy=False)
            msgpack.unpackb(frames[0].bytes)
            np.frombuffer(frames[1].buffer, np.float32)
            if i >= 100:  # after the connection has warmed up
                times.append(time.perf_counter() - started)
        sock.send(b"stop")
        return statistics.median(times)
    finally:
        sock.close(linger=0)
        ctx.term()
        server.wait(timeout=10)


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux), in MB; nan elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def bench_overhead(rounds: int = 3) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="fanout-bench-overhead-"))
    noop = tmp / "noop.onnx"
    noop.write_bytes(one_node_model("Identity", ["x"], NOOP_SHAPE, "noop"))
    config = tmp / "bench.yaml"
    config.write_text(textwrap.dedent(f"""
        scheduler: {{address: "tcp://127.0.0.1:0"}}
        devices:
          - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2,
              options: {{intra_op_num_threads: 1}}}}
        models:
          - {{name: noop, source: "{noop}"}}
    """))
    print(f"fanout bench overhead: a no-op model (Identity, float32 {list(NOOP_SHAPE)}) on one "
          f"capacity-2 onnxruntime CPU worker; {rounds} rounds, medians\n"
          f"hardware: {hardware()}; {load()} at the start\n", flush=True)
    x = {"x": np.ones(NOOP_SHAPE, np.float32)}
    echo, trips, rates = [], [], []
    with runtime.start(config) as cluster:
        client = cluster.client()
        client.map("noop", [x] * 2000)  # warm up the connection, the session and the caches
        for r in range(rounds):
            echo.append(echo_round_trip(ROUND_TRIPS))
            times = []
            for _ in range(ROUND_TRIPS):
                started = time.perf_counter()
                client.infer("noop", x)
                times.append(time.perf_counter() - started)
            trips.append(statistics.median(times))
            batch = [x] * FANOUT_TASKS
            started = time.perf_counter()
            client.map("noop", batch)
            rates.append(FANOUT_TASKS / (time.perf_counter() - started))
            print(f"  round {r + 1}: echo {echo[-1] * 1e6:.0f} us, infer() {trips[-1] * 1e6:.0f} "
                  f"us, map() {rates[-1]:,.0f} tasks/s ({load()})", flush=True)
        status = client.status()
        pids = {"scheduler": cluster.pid,
                **{w["device"]: w["pid"] for w in status["workers"]}}
        memory = []
        for width in WIDTHS:
            client.map("noop", [x] * width)
            memory.append((width, {name: rss_mb(pid) for name, pid in pids.items()}))
    floor, trip, rate = (statistics.median(v) for v in (echo, trips, rates))
    print(f"\n{'':<46} {'measured':>12} {'floor/target':>14} {'ratio':>7}")
    print(f"{'raw pyzmq+msgpack echo (floor), round trip':<46} {floor * 1e6:9.0f} us")
    ok = trip <= TARGET_ROUND_TRIP_X * floor
    print(f"{'no-op round trip, infer()':<46} {trip * 1e6:9.0f} us "
          f"{f'<= {TARGET_ROUND_TRIP_X:g}x echo':>14} {trip / floor:6.2f}x  "
          f"{'met' if ok else 'NOT met'}")
    ok = rate >= TARGET_RATE
    print(f"{f'no-op fan-out, map() of {FANOUT_TASKS:,}':<46} {rate:9,.0f}/s "
          f"{f'>= {TARGET_RATE:,.0f}/s':>14} {rate / TARGET_RATE:6.2f}x  "
          f"{'met' if ok else 'NOT met'}")
    print("\nmemory after a fan-out of each width (RSS, MB):")
    names = list(memory[0][1])
    print(f"  {'width':>8} " + " ".join(f"{n:>10}" for n in names))
    for width, mb in memory:
        print(f"  {width:>8,} " + " ".join(f"{mb[n]:10.1f}" for n in names))
    growth = max(memory[-1][1][n] - memory[0][1][n] for n in names)
    print(f"  growth from {WIDTHS[0]:,} to {WIDTHS[-1]:,} tasks: at most {growth:+.1f} MB "
          f"per process ({'flat' if growth < 20 else 'NOT flat'}: under 20 MB)")
    print(f"\n{load()} at the end (2 cores: figures move with what else runs)")
    return 0
