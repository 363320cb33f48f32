"""The Prometheus text exposition of a cluster's status (``GET /metrics``)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..wire.status import Histogram, Status


def _label(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: Any) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in kv.items()) + "}"


def prometheus_text(status: Status, requests: Counter, models: Sequence[str] = ()) -> str:
    """The cluster's status and this server's request counts in Prometheus text format."""
    families: list[tuple[str, str, str, list[str]]] = []

    def family(name: str, kind: str, help_: str) -> list[str]:
        samples: list[str] = []
        families.append((name, kind, help_, samples))
        return samples

    queue = family("fanout_queue_depth", "gauge", "Tasks waiting for a slot, per model.")
    up = family("fanout_worker_up", "gauge", "1 if the device's worker is up.")
    in_flight = family("fanout_in_flight", "gauge", "Tasks running on the device now.")
    capacity = family("fanout_capacity", "gauge", "Tasks the device runs at once.")
    done = family("fanout_tasks_completed_total", "counter",
                  "Tasks completed, per device and model.")
    failed = family("fanout_tasks_failed_total", "counter",
                    "Tries that failed, per device and model.")
    failed_over = family("fanout_tasks_failed_over_total", "counter",
                         "Tasks completed after failing on another device, per device and model.")
    histograms = {  # family -> (what it measures, how to read it off a model's status)
        "fanout_task_seconds": ("Service time of a run on the device.",
                                lambda m: m.latency),
        "fanout_request_seconds": ("End to end: from submit to the answer, for tasks "
                                   "answered by the device.", lambda m: m.request),
        "fanout_time_to_first_token_seconds": ("From submit to a generation's first token, "
                                               "for tokens from the device.", lambda m: m.ttft),
        "fanout_inter_token_seconds": ("Between two tokens the device streamed for one "
                                       "generation.", lambda m: m.itl),
        "fanout_queue_wait_seconds": ("Time in the queue before a dispatch to the device.",
                                      lambda m: m.queue_wait),
    }
    hist_samples = {name: family(name, "histogram", text)
                    for name, (text, _) in histograms.items()}
    prompt = family("fanout_prompt_tokens_total", "counter",
                    "Prompt tokens of the generations the device answered.")
    completion = family("fanout_completion_tokens_total", "counter",
                        "Tokens the device generated (rate() gives tokens per second).")
    http = family("fanout_http_requests_total", "counter",
                  "HTTP requests answered, per endpoint and status.")

    queued = dict.fromkeys(models, 0) | status.queued_by_model
    for model, n in sorted(queued.items()):
        queue.append(f"fanout_queue_depth{_labels(model=model)} {n}")
    for w in status.workers:
        dev = w.device
        up.append(f"fanout_worker_up{_labels(device=dev)} {int(w.state == 'up')}")
        in_flight.append(f"fanout_in_flight{_labels(device=dev)} {w.in_flight}")
        capacity.append(f"fanout_capacity{_labels(device=dev)} {w.capacity}")
        for model, m in w.models.items():
            lab = _labels(device=dev, model=model)
            done.append(f"fanout_tasks_completed_total{lab} {m.done}")
            failed.append(f"fanout_tasks_failed_total{lab} {m.failed}")
            failed_over.append(f"fanout_tasks_failed_over_total{lab} {m.failed_over}")
            for name, (_, of) in histograms.items():
                _histogram(hist_samples[name], name, dev, model, of(m))
            prompt.append(f"fanout_prompt_tokens_total{lab} {m.prompt_tokens}")
            completion.append(f"fanout_completion_tokens_total{lab} {m.completion_tokens}")
    for (endpoint, code), n in sorted(requests.items()):
        http.append(f"fanout_http_requests_total{_labels(endpoint=endpoint, status=code)} {n}")

    lines = []
    for name, kind, help_, samples in families:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n"


def _histogram(samples: list[str], name: str, device: str, model: str, h: Histogram) -> None:
    for le, count in h.buckets():
        le_text = le if isinstance(le, str) else repr(float(le))
        samples.append(f"{name}_bucket{_labels(device=device, model=model, le=le_text)} {count}")
    lab = _labels(device=device, model=model)
    samples.append(f"{name}_sum{lab} {float(h.total)}")
    samples.append(f"{name}_count{lab} {h.count}")
