"""Which devices this machine can serve, as device dicts in the config's form.

Each engine is probed in its own short-lived subprocess (in parallel): loading the QNN
backends or OpenVINO's plugins into the caller would pin their libraries in a process that
never runs a model, and a crashing driver must not take the caller down. A probe that fails,
crashes or times out means the device is absent. The QNN probe builds a one-node model and
creates a real session on each backend with CPU fallback disabled, so "present" means a graph
actually compiled there (the GPU backend, for one, registers fine and then cannot initialize).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ..config.schema import LLM_BATCH_CAPACITY
from .onnx_proto import one_node_model

PROBE_TIMEOUT_S = 15.0  # a healthy probe takes well under 1 s; this only bounds a hung driver

_QNN_PROBE = r'''
import json, sys
model = bytes.fromhex(sys.argv[1])  # y = Add(x, x), float32 [1, 4]
result = {}
try:
    import numpy as np, onnxruntime as ort, onnxruntime_qnn as q
    ort.register_execution_provider_library(q.EP_NAME, q.get_library_path())
    devs = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    for kind, path, want in (("npu", q.get_qnn_htp_path(), "NPU"),
                             ("gpu", q.get_qnn_gpu_path(), "GPU")):
        dev = ([d for d in devs if d.device.type.name == want]
               or [d for d in devs if d.device.type.name not in ("NPU", "GPU")])
        if not dev:
            result[kind] = "no QNN ep device"
            continue
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 4
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            so.add_provider_for_devices(dev[:1], {"backend_path": path})
            y = ort.InferenceSession(model, so).run(None, {"x": np.ones((1, 4), np.float32)})[0]
            result[kind] = "ok" if float(y.sum()) == 8.0 else "wrong result"
        except Exception as e:
            result[kind] = str(e)
except Exception as e:
    result["error"] = repr(e)
print(json.dumps(result))
'''

_OPENVINO_PROBE = r'''
import json
try:
    import openvino as ov
    found = {"devices": list(ov.Core().available_devices)}
    try:
        import openvino_genai  # noqa: F401  LLM workers need it
        found["genai"] = True
    except Exception:
        found["genai"] = False
    print(json.dumps(found))
except Exception as e:
    print(json.dumps({"error": repr(e)}))
'''


def discover(timeout_s: float = PROBE_TIMEOUT_S) -> list[dict]:
    """Device dicts for this machine; ``cpu0`` (onnxruntime CPU EP) is always there."""
    probe_model = one_node_model("Add", ["x", "x"], (1, 4), "probe").hex()
    qnn, ov = _run_probes({"qnn": (_QNN_PROBE, probe_model), "openvino": (_OPENVINO_PROBE,)},
                          timeout_s)
    devices: list[dict] = []
    if qnn.get("npu") == "ok":
        devices.append({"name": "npu0", "kind": "npu", "backend": "qnn", "capacity": 1})
    if qnn.get("gpu") == "ok":
        devices.append({"name": "gpu0", "kind": "gpu", "backend": "qnn", "capacity": 1})
    llm = []
    for dev in ov.get("devices") or ():
        # OpenVINO's CPU is left out: it would share the cores cpu0 already uses.
        kind = str(dev).split(".")[0].lower()
        suffix = str(dev).lower().replace(".", "")
        if kind in ("npu", "gpu"):
            devices.append({"name": "ov" + suffix, "kind": kind, "backend": "openvino",
                            "capacity": 1, "options": {"device": dev}})
            if ov.get("genai"):  # the NPU's LLM pipeline takes one request at a time
                llm.append({"name": "llm" + suffix, "kind": kind, "backend": "openvino-genai",
                            "capacity": 1 if kind == "npu" else 4, "options": {"device": dev}})
    devices.append({"name": "cpu0", "kind": "cpu", "backend": "onnxruntime",
                    "capacity": max(1, os.cpu_count() or 1)})
    if ov.get("genai"):  # an LLM worker decodes sequences together on the CPU
        llm.append({"name": "llmcpu", "kind": "cpu", "backend": "openvino-genai",
                    "capacity": LLM_BATCH_CAPACITY})
    return devices + llm


def _run_probes(scripts: dict[str, tuple[str, ...]], timeout_s: float) -> list[dict]:
    """Each script, as ``python -c CODE ARGS...``, in parallel; each one's last JSON line."""
    procs: dict[str, subprocess.Popen[str] | None] = {}
    for name, (code, *args) in scripts.items():
        try:
            procs[name] = subprocess.Popen([sys.executable, "-c", code, *args],
                                           stdout=subprocess.PIPE,
                                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                           text=True)
        except OSError:
            procs[name] = None
    deadline = time.monotonic() + timeout_s
    results: list[dict] = []
    for proc in procs.values():
        if proc is None:
            results.append({})
            continue
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            lines = out.strip().splitlines()
            results.append(json.loads(lines[-1]) if lines else {})
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            results.append({})
        except ValueError:
            results.append({})
    return results


if __name__ == "__main__":
    t = time.perf_counter()
    for d in discover():
        print(json.dumps(d))
    print(f"probed in {time.perf_counter() - t:.2f} s", file=sys.stderr)
