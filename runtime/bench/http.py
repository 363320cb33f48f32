"""``fanout bench http``: the OpenAI-compatible front door against the Python client, on one
``fanout up``."""
from __future__ import annotations

import statistics
import threading
import time

import runtime

from .. import env
from ..launchers.models import fetch
from .common import LLM_PROMPTS, cluster_config, hardware


def bench_http(tokens: int = 64, n: int = 16, rounds: int = 3) -> int:
    """The HTTP API's cost: the same n streaming chats through it and through the Python
    client, against one ``fanout up`` (the server in the scheduler's process, as deployed),
    alternating, so both see the same machine state."""
    import asyncio
    import json
    import signal
    import socket
    import subprocess
    import sys

    import aiohttp

    path = str(fetch("smollm2", env.home(), print))
    chats = [[{"role": "user", "content": LLM_PROMPTS[i % len(LLM_PROMPTS)]}] for i in range(n)]
    print(f"fanout bench http: {n} concurrent streaming chats x {tokens} new tokens (end of "
          f"sequence ignored), SmolLM2-135M Q4_1 on one CPU worker batching {n}, greedy; "
          f"{rounds} rounds each, alternating; `fanout up` serves both paths\n"
          f"hardware: {hardware()}\n")
    config_path = cluster_config(f"""
        devices:
          - {{name: cpu0, kind: cpu, backend: openvino-genai, capacity: {n}}}
        models:
          - {{name: smollm2, source: "{path}", devices: [cpu0]}}
    """)

    async def via_client(client, chat) -> tuple[float, int]:
        t0, ttft = time.perf_counter(), float("nan")
        async for chunk in client.astream("smollm2", chat, max_tokens=tokens, ignore_eos=True):
            if chunk.text and ttft != ttft:
                ttft = time.perf_counter() - t0
            if chunk.usage:
                return ttft, chunk.usage["completion_tokens"]
        return ttft, 0

    async def via_http(session, url, chat) -> tuple[float, int]:
        t0, ttft = time.perf_counter(), float("nan")
        body = {"model": "smollm2", "messages": chat, "max_tokens": tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(f"{url}/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    return ttft, event["usage"]["completion_tokens"]
                if ttft != ttft and event["choices"] and event["choices"][0]["delta"].get(
                        "content"):
                    ttft = time.perf_counter() - t0
        return ttft, 0

    async def fan_out(one, chats) -> tuple[float, list[float]]:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(c) for c in chats))
        total = time.perf_counter() - started
        counted = sum(count for _, count in results)
        assert counted == len(chats) * tokens, f"expected {len(chats) * tokens} tokens, " \
                                               f"got {counted}"
        return total, [ttft for ttft, _ in results]

    async def run(address: str, url: str) -> tuple[dict, dict]:
        client = await runtime.AsyncClient(address).connect()
        figures: dict[str, list] = {"client": [], "http": []}
        alone: dict[str, list] = {"client": [], "http": [], "status": []}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as session:
            paths = {"client": lambda c: via_client(client, c),
                     "http": lambda c: via_http(session, url, c)}
            for one in paths.values():  # warm up: connections, the engine's first batch
                await fan_out(one, chats)
            for _ in range(rounds):
                for name, one in paths.items():
                    figures[name].append(await fan_out(one, chats))
            for chat in chats:  # one request at a time: the per-request cost alone
                for name, one in paths.items():
                    alone[name] += (await fan_out(one, [chat]))[1]
            for _ in range(50):  # the front door alone: a status round trip with and without
                t0 = time.perf_counter()
                await client.astatus()
                t1 = time.perf_counter()
                async with session.get(url.removesuffix("/v1") + "/health/ready") as r:
                    await r.read()
                alone["status"].append((t1 - t0, time.perf_counter() - t1))
        await client.close()
        return figures, alone

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    address, http = f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    up = subprocess.Popen([sys.executable, "-m", "runtime.cli", "up", "--config",
                           str(config_path), "--address", address, "--http", http],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = up.stdout
    assert out is not None  # started with stdout=PIPE
    try:
        for line in out:
            if "ready:" in line:
                break
        else:
            raise RuntimeError(f"fanout up exited with code {up.wait()} before it was ready")
        later: list[str] = []  # keep the pipe drained; worker restarts are worth showing
        threading.Thread(target=lambda: later.extend(out), daemon=True).start()
        figures, alone = asyncio.run(run(address, f"http://{http}/v1"))
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
    for line in later:
        if "killing" in line or "exited" in line:
            print(f"note, from fanout up: {line.strip()}")

    def summary(name: str) -> tuple[float, float]:
        totals = [total for total, _ in figures[name]]
        ttfts = [statistics.median(t) for _, t in figures[name]]
        return statistics.median(totals), statistics.median(ttfts)

    rows = {"client": "Python client (AsyncClient.astream)",
            "http": "HTTP API (aiohttp SSE client)"}
    print(f"{'':<38} {'total s':>8} {'tokens/s':>9} {'TTFT ms':>8} {'alone':>7}   "
          f"rounds: total s / TTFT ms")
    for name, label in rows.items():
        total, ttft = summary(name)
        per_round = ", ".join(f"{t:.2f}/{statistics.median(f) * 1000:.0f}"
                              for t, f in figures[name])
        print(f"{label:<38} {total:8.2f} {n * tokens / total:9.1f} {ttft * 1000:8.1f} "
              f"{statistics.median(alone[name]) * 1000:7.1f}   {per_round}")
    (direct, direct_ttft), (http_total, http_ttft) = summary("client"), summary("http")
    print(f"\nHTTP / Python client total time: {http_total / direct:.3f}x (target <= 1.10x)")
    print(f"HTTP - Python client median TTFT: {(http_ttft - direct_ttft) * 1000:+.1f} ms "
          f"with {n} at once, "
          f"{(statistics.median(alone['http']) - statistics.median(alone['client'])) * 1000:+.1f}"
          f" ms one at a time (target <= 5 ms)")
    direct_s = statistics.median(a for a, _ in alone["status"]) * 1000
    http_s = statistics.median(b for _, b in alone["status"]) * 1000
    print(f"a status round trip: {direct_s:.2f} ms from the Python client, {http_s:.2f} ms "
          f"through GET /health/ready: the HTTP front door adds {http_s - direct_s:.2f} ms")
    return 0
