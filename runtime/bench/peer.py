"""The peer row of ``fanout bench llm``: the same chats against llama.cpp's ``llama-server``
with one slot per chat, if a ``llama-server`` binary is on PATH (the GGUF file is the same)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

from .fanouts import Load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_llama_server(path: str, chats: list[list[dict]], tokens: int, ours: Load) -> None:
    binary = shutil.which("llama-server")
    if binary is None:
        print("\nllama-server: not on PATH, no peer row")
        return
    port = _free_port()
    n = len(chats)
    proc = subprocess.Popen([binary, "-m", path, "--port", str(port), "--parallel", str(n),
                             "-c", str(n * 1024)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    print("\nllama-server: did not come up, no peer row")
                    return
                time.sleep(0.5)

        def one(chat: list[dict]) -> None:
            body = json.dumps({"messages": chat, "max_tokens": tokens, "temperature": 0,
                               "ignore_eos": True}).encode()
            req = urllib.request.Request(f"{url}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                json.load(r)

        one(chats[0])  # warm up
        threads = [threading.Thread(target=one, args=(c,)) for c in chats]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = time.perf_counter() - started
        print(f"\nllama-server, {n} slots, the same {n} chats x {tokens} tokens: {total:.2f} s "
              f"({n * tokens / total:.0f} tokens/s); fanout: {ours.total_s:.2f} s "
              f"({ours.rate:.0f} tokens/s)")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
