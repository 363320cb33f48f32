"""Loading, validating and shipping the typed config (runtime/config/schema.py)."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from runtime.config.loader import config_from_dict, load_config
from runtime.config.schema import (
    LLM_BATCH_CAPACITY,
    Config,
    DeviceConfig,
    FaultConfig,
    ModelConfig,
    SchedulerConfig,
    config_to_dict,
)
from runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

ISSUE_EXAMPLE = """\
devices:
  - {name: npu0, kind: npu, backend: qnn, capacity: 1}          # onnxruntime + QNN HTP
  - {name: ovnpu, kind: npu, backend: openvino, capacity: 1}    # OpenVINO device "NPU"
  - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}
models:
  - name: minilm
    source: packaged:minilm        # or a path to an .onnx / OpenVINO .xml file
    devices: [npu0, cpu0]          # preference order = fallback order
    options:
      npu0: {shapes: {input_ids: [1, 32], attention_mask: [1, 32]}, soc_model: "69"}
"""

TWO_DEVICES = """\
devices:
  - {name: npu0, kind: npu, backend: qnn}
  - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}
"""

MINILM = """\
models:
  - {name: minilm, source: packaged:minilm}
"""


def discovered_npu_and_cpu() -> list[dict]:
    return [{"name": "npu0", "kind": "npu", "backend": "qnn", "capacity": 1},
            {"name": "cpu0", "kind": "cpu", "backend": "onnxruntime", "capacity": 2}]


def discovered_cpu_only() -> list[dict]:
    return [{"name": "cpu0", "kind": "cpu", "backend": "onnxruntime", "capacity": 2}]


@pytest.fixture
def write(tmp_path):
    """Write YAML text to a file in tmp_path and return its path as a string."""
    def _write(text: str, name: str = "my.yaml") -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return str(path)
    return _write


def load(path: str, **kw) -> Config:
    kw.setdefault("env", {})
    return load_config(path, **kw)


def load_error(path: str, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, **kw)
    return str(info.value)


# -- accepted forms --------------------------------------------------------------------------

def test_the_issue_example_is_accepted_as_written(write):
    cfg = load(write(ISSUE_EXAMPLE))

    assert cfg.devices == [
        DeviceConfig(name="npu0", kind="npu", backend="qnn", capacity=1),
        DeviceConfig(name="ovnpu", kind="npu", backend="openvino", capacity=1),
        DeviceConfig(name="cpu0", kind="cpu", backend="onnxruntime", capacity=2),
    ]
    assert cfg.models == [ModelConfig(
        name="minilm", source="packaged:minilm", devices=["npu0", "cpu0"],
        options={"npu0": {"shapes": {"input_ids": [1, 32], "attention_mask": [1, 32]},
                          "soc_model": "69"}})]
    assert cfg.device_order("minilm") == ["npu0", "cpu0"]
    assert cfg.scheduler == SchedulerConfig()


def test_a_batching_llm_device_defaults_to_the_measured_capacity_and_others_to_one(write):
    cfg = load(write("""\
        devices:
          - {name: llm, kind: cpu, backend: openvino-genai}
          - {name: serial, kind: cpu, backend: openvino-genai,
             options: {continuous_batching: false}}
          - {name: llmnpu, kind: npu, backend: openvino-genai}
          - {name: set, kind: gpu, backend: openvino-genai, capacity: 3}
          - {name: cpu0, kind: cpu, backend: onnxruntime}
        models:
          - {name: smollm2, source: packaged:smollm2}
        """))
    assert [d.capacity for d in cfg.devices] == [LLM_BATCH_CAPACITY, 1, 1, 3, 1]
    assert LLM_BATCH_CAPACITY > 1


def test_config_source_is_the_file_path(write):
    path = write(ISSUE_EXAMPLE)
    assert load(path).source == path


def test_faults_on_a_device_are_parsed_with_defaults_for_the_rest(write):
    cfg = load(write("""\
        devices:
          - {name: npu0, kind: npu, backend: qnn, faults: {fail_after: 2, message: boom}}
          - {name: cpu0, kind: cpu, backend: onnxruntime}
        models:
          - {name: minilm, source: packaged:minilm}
        """))
    assert cfg.device("npu0").faults == FaultConfig(fail_after=2, message="boom")
    assert cfg.device("cpu0").faults is None


def test_device_fallback_is_appended_to_the_model_order_and_cycles_are_fine(write):
    cfg = load(write("""\
        devices:
          - {name: npu0, kind: npu, backend: qnn, fallback: [ovnpu]}
          - {name: ovnpu, kind: npu, backend: openvino, fallback: [cpu0, npu0]}
          - {name: cpu0, kind: cpu, backend: onnxruntime, fallback: [npu0]}
        models:
          - {name: minilm, source: packaged:minilm, devices: [npu0]}
        """))
    assert cfg.device_order("minilm") == ["npu0", "ovnpu", "cpu0"]


def test_a_model_without_devices_runs_everywhere_npu_first(write):
    cfg = load(write("""\
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime}
          - {name: ovgpu, kind: gpu, backend: openvino}
          - {name: npu0, kind: npu, backend: qnn}
        models:
          - {name: minilm, source: packaged:minilm}
        """))
    assert cfg.device_order("minilm") == ["npu0", "ovgpu", "cpu0"]


def test_relative_sources_resolve_against_the_config_folder(write, tmp_path):
    cfg = load(write(TWO_DEVICES + """\
models:
  - {name: rel, source: models/m.onnx}
  - {name: abs, source: /opt/m.xml}
  - {name: pkg, source: packaged:minilm}
""", name="deploy/my.yaml"))
    assert cfg.model("rel").source == str(tmp_path / "deploy" / "models" / "m.onnx")
    assert cfg.model("abs").source == "/opt/m.xml"
    assert cfg.model("pkg").source == "packaged:minilm"


def test_a_relative_config_path_still_resolves_sources_to_absolute_paths(write, tmp_path,
                                                                        monkeypatch):
    write(TWO_DEVICES + "models:\n  - {name: m, source: m.onnx}\n", name="conf/c.yaml")
    monkeypatch.chdir(tmp_path)
    cfg = load(os.path.join("conf", "c.yaml"))
    assert cfg.model("m").source == str(tmp_path / "conf" / "m.onnx")
    assert cfg.source == os.path.join("conf", "c.yaml")


def test_scheduler_fields_are_read_and_ints_accepted_for_seconds(write):
    cfg = load(write(TWO_DEVICES + MINILM + """\
scheduler: {max_queue: 5, heartbeat_interval_s: 1, heartbeat_timeout_s: 2.5,
            address: "ipc:///tmp/fanout.sock"}
"""))
    assert cfg.scheduler.max_queue == 5
    assert cfg.scheduler.heartbeat_interval_s == 1.0
    assert cfg.scheduler.address == "ipc:///tmp/fanout.sock"


def test_non_loopback_address_is_accepted_with_a_token_which_stays_out_of_repr(write):
    cfg = load(write(TWO_DEVICES + MINILM + """\
scheduler: {address: "tcp://0.0.0.0:8471", token: s3cret-token}
"""))
    assert cfg.scheduler.token == "s3cret-token"
    assert "s3cret-token" not in repr(cfg)


def test_ipv6_loopback_and_localhost_need_no_token(write):
    cfg = load(write(TWO_DEVICES + MINILM + """\
scheduler: {address: "tcp://[::1]:8471", worker_address: "tcp://localhost:0"}
"""))
    assert cfg.scheduler.address == "tcp://[::1]:8471"


# -- environment -----------------------------------------------------------------------------

def test_env_overrides_address_token_and_model_cache(write, tmp_path):
    cfg = load(write(ISSUE_EXAMPLE + "scheduler: {token: from-file}\nmodel_cache: cache\n"),
               env={"FANOUT_ADDRESS": "tcp://10.0.0.5:9000", "FANOUT_TOKEN": "from-env",
                    "FANOUT_HOME": str(tmp_path / "home")})
    assert cfg.scheduler.address == "tcp://10.0.0.5:9000"
    assert cfg.scheduler.token == "from-env"
    assert cfg.model_cache == str(tmp_path / "home")


def test_model_cache_from_the_file_is_relative_to_it_without_env(write, tmp_path):
    cfg = load(write(ISSUE_EXAMPLE + "model_cache: cache\n"))
    assert cfg.model_cache == str(tmp_path / "cache")


def test_an_explicit_env_mapping_replaces_os_environ(write, monkeypatch):
    monkeypatch.setenv("FANOUT_ADDRESS", "tcp://127.0.0.1:9999")
    path = write(ISSUE_EXAMPLE)
    assert load(path, env={}).scheduler.address == "tcp://127.0.0.1:8471"
    assert load_config(path).scheduler.address == "tcp://127.0.0.1:9999"


def test_env_address_on_a_public_host_still_needs_a_token(write):
    message = load_error(write(ISSUE_EXAMPLE), env={"FANOUT_ADDRESS": "tcp://0.0.0.0:8471"})
    assert "my.yaml: scheduler.address (from env FANOUT_ADDRESS)" in message
    assert "FANOUT_TOKEN" in message and "'tcp://0.0.0.0:8471'" in message


@pytest.mark.parametrize("var, field, bad", [
    ("FANOUT_TOKEN", "scheduler.token", "  "),
    ("FANOUT_ADDRESS", "scheduler.address", "udp://x"),
    ("FANOUT_API_KEY", "http.api_key", " "),
    ("FANOUT_KEYS", "cluster.keys", "/nowhere/cluster.keys"),
])
def test_every_env_override_is_named_with_its_field_when_its_value_is_bad(write, var, field,
                                                                          bad):
    message = load_error(write(ISSUE_EXAMPLE), env={var: bad})
    assert f"my.yaml: {field} (from env {var})" in message


# -- errors: each names the file, the field and the bad value --------------------------------

@pytest.mark.parametrize("text, field, shown", [
    (TWO_DEVICES.replace("capacity: 2", "capacity: 0") + MINILM,
     "devices[1].capacity: must be an integer 1..256", "got 0"),
    (TWO_DEVICES.replace("capacity: 2", "capacity: true") + MINILM,
     "devices[1].capacity: must be an integer 1..256", "got True"),
    (TWO_DEVICES.replace("name: npu0", "name: NPU 0") + MINILM,
     "devices[0].name: must match [a-z0-9_-]{1,32}", "got 'NPU 0'"),
    (TWO_DEVICES.replace("name: cpu0", "name: npu0") + MINILM,
     "devices[1].name: duplicate device name (also devices[0])", "got 'npu0'"),
    (TWO_DEVICES.replace("kind: npu", "kind: tpu") + MINILM,
     "devices[0].kind: must be one of npu, gpu, cpu", "got 'tpu'"),
    (TWO_DEVICES.replace("backend: qnn", "backend: cuda") + MINILM,
     "devices[0].backend: must be one of qnn, onnxruntime, openvino, openvino-genai", "got 'cuda'"),
    (TWO_DEVICES.replace("kind: cpu", "kind: npu") + MINILM,
     "devices[1].kind: backend onnxruntime drives only cpu devices", "got 'npu'"),
    (TWO_DEVICES.replace("capacity: 2", "capcity: 2") + MINILM,
     "devices[1]: unknown key 'capcity' (did you mean 'capacity'? allowed: name, kind, backend,",
     "capacity, fallback, options, faults, resources, per_node, prefetch)"),
    (TWO_DEVICES + MINILM + "schedular: {}\n",
     "(top level): unknown key 'schedular'", "allowed: cluster, scheduler, http, devices, models, model_cache"),
    (MINILM, "(top level): missing required key 'devices'", ""),
    (TWO_DEVICES + "models:\n  - {name: minilm}\n", "models[0]: missing required key 'source'", ""),
    (TWO_DEVICES + "models:\n  - {name: m, source: packaged:minilm, devices: [npu0, gpu9]}\n",
     "models[0].devices[1]: names no declared device (declared: npu0, cpu0)", "got 'gpu9'"),
    (TWO_DEVICES + "models:\n  - {name: m, source: packaged:minilm, devices: [npu0, npu0]}\n",
     "models[0].devices[1]: device listed twice", "got 'npu0'"),
    (TWO_DEVICES + "models:\n  - {name: m, source: packaged:minilm, options: {ovnpu: {}}}\n",
     "models[0].options.ovnpu: names no declared device", "got 'ovnpu'"),
    (TWO_DEVICES + "models:\n  - {name: m, source: 'packaged:'}\n",
     "models[0].source: must be packaged:NAME", "got 'packaged:'"),
    (TWO_DEVICES + "models:\n  - {name: m, source: 7}\n",
     "models[0].source: must be packaged:NAME or a path", "got 7"),
    (TWO_DEVICES + "models:\n  - {name: m, source: a.onnx}\n  - {name: m, source: b.onnx}\n",
     "models[1].name: duplicate model name (also models[0])", "got 'm'"),
    (TWO_DEVICES + "models:\n  - {name: m, source: a.onnx, options: {npu0: {shapes: "
     "{input_ids: [1, 0]}}}}\n",
     "models[0].options.npu0.shapes.input_ids: must be a non-empty list of positive integers",
     "got [1, 0]"),
    (TWO_DEVICES + "models:\n  - {name: m, source: a.onnx, options: {npu0: {pad: 'no'}}}\n",
     "models[0].options.npu0.pad: must be true or false", "got 'no'"),
    (TWO_DEVICES.replace("backend: qnn}", "backend: qnn, fallback: [npu0]}") + MINILM,
     "devices[0].fallback[0]: a device cannot fall back to itself", "got 'npu0'"),
    (TWO_DEVICES.replace("backend: qnn}", "backend: qnn, fallback: [gpu0]}") + MINILM,
     "devices[0].fallback[0]: names no declared device", "got 'gpu0'"),
    (TWO_DEVICES.replace("backend: qnn}", "backend: qnn, faults: {fail_after: -1}}") + MINILM,
     "devices[0].faults.fail_after: must be an integer 0..", "got -1"),
    (TWO_DEVICES.replace("backend: qnn}", "backend: qnn, faults: {models: [bert]}}") + MINILM,
     "devices[0].faults.models[0]: names no declared model (declared: minilm)", "got 'bert'"),
    (TWO_DEVICES.replace("backend: qnn}", "backend: qnn, faults: {hang_s: 4000}}") + MINILM,
     "devices[0].faults.hang_s: must be a number 0..3600", "got 4000"),
    (TWO_DEVICES.replace("backend: qnn}", "backend: qnn, options: {when: 2024-01-01}}") + MINILM,
     "devices[0].options.when: must be plain data", "got datetime.date(2024, 1, 1)"),
    (TWO_DEVICES + MINILM + "scheduler: {max_queue: 0}\n",
     "scheduler.max_queue: must be an integer 1..1000000", "got 0"),
    (TWO_DEVICES + MINILM + "scheduler: {task_timeout_s: .inf}\n",
     "scheduler.task_timeout_s: must be a number 0.1..86400", "got inf"),
    (TWO_DEVICES + MINILM + "scheduler: {heartbeat_interval_s: 1, heartbeat_timeout_s: 2}\n",
     "scheduler.heartbeat_timeout_s: must be greater than 2 * heartbeat_interval_s = 2", "got 2.0"),
    (TWO_DEVICES + MINILM + "scheduler: {address: 'http://127.0.0.1:8471'}\n",
     "scheduler.address: must be tcp://HOST:PORT", "got 'http://127.0.0.1:8471'"),
    (TWO_DEVICES + MINILM + "scheduler: {address: 'tcp://127.0.0.1:70000'}\n",
     "scheduler.address: must be tcp://HOST:PORT (port 0..65535)", "got 'tcp://127.0.0.1:70000'"),
    (TWO_DEVICES + MINILM + "scheduler: {address: 'tcp://192.168.1.4:8471'}\n",
     "scheduler.address: binds non-loopback host 192.168.1.4 and so needs a token",
     "got 'tcp://192.168.1.4:8471'"),
    (TWO_DEVICES + MINILM + "scheduler: {worker_address: 'tcp://*:0'}\n",
     "scheduler.worker_address: binds non-loopback host * and so needs a token", "got 'tcp://*:0'"),
])
def test_each_invalid_field_is_reported_with_file_field_and_value(write, text, field, shown):
    path = write(text)
    message = load_error(path)
    assert f"{path}: " in message
    assert field in message
    assert shown in message


def test_the_message_has_the_documented_shape(write):
    path = write(TWO_DEVICES.replace("capacity: 2", "capacity: 0") + MINILM, name="deploy/my.yaml")
    assert load_error(path) == f"{path}: devices[1].capacity: must be an integer 1..256, got 0"


def test_several_errors_are_reported_together(write):
    path = write(TWO_DEVICES.replace("capacity: 2", "capacity: 0").replace("kind: npu", "kind: x")
                 + MINILM + "scheduler: {max_attempts: 99}\n")
    lines = load_error(path).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_a_bad_token_is_reported_without_echoing_it(write):
    message = load_error(write(ISSUE_EXAMPLE + "scheduler: {token: ['hunter2']}\n"))
    assert "scheduler.token: must be a non-empty string, got a list" in message
    assert "hunter2" not in message


def test_yaml_syntax_errors_name_the_file_and_line(write):
    path = write("devices:\n  - {name: npu0, kind: npu\nmodels: []\n")
    message = load_error(path)
    assert message.startswith(f"{path}: line 3, column")
    assert "invalid YAML" in message


def test_a_key_given_twice_is_an_error_not_last_one_wins(write):
    path = write(TWO_DEVICES + MINILM + "devices: []\n")
    message = load_error(path)
    assert message.startswith(f"{path}: line 6, column 1: invalid YAML")
    assert "duplicate key 'devices'" in message


def test_a_file_that_is_not_a_mapping_is_rejected(write):
    path = write("- just\n- a list\n")
    assert load_error(path).startswith(f"{path}: the config must be a mapping")


def test_an_empty_file_is_rejected(write):
    path = write("# nothing yet\n")
    assert load_error(path) == f"{path}: the config is empty; it needs at least 'devices'"


def test_a_missing_file_is_a_config_error_naming_it(tmp_path):
    path = str(tmp_path / "nope.yaml")
    assert load_error(path).startswith(f"{path}: cannot read config file")


# -- devices: auto ---------------------------------------------------------------------------

AUTO = """\
devices: auto
models:
  - name: minilm
    source: packaged:minilm
    devices: [npu0, ovnpu, ovgpu, cpu0]
    options:
      npu0: {soc_model: "69"}
      ovnpu: {shapes: {input_ids: [1, 32]}}
"""


def test_auto_devices_come_from_discovery_and_unknown_names_are_dropped(write):
    cfg = load(write(AUTO), discover=discovered_npu_and_cpu)
    assert [d.name for d in cfg.devices] == ["npu0", "cpu0"]
    assert cfg.model("minilm").devices == ["npu0", "cpu0"]
    assert cfg.model("minilm").options == {"npu0": {"soc_model": "69"}}
    assert cfg.device_order("minilm") == ["npu0", "cpu0"]


def test_auto_devices_on_a_cpu_only_machine_keep_only_cpu0(write):
    cfg = load(write(AUTO), discover=discovered_cpu_only)
    assert cfg.device_order("minilm") == ["cpu0"]
    assert cfg.model("minilm").options == {}


def test_auto_devices_drop_a_model_none_of_whose_devices_was_found(write, caplog):
    path = write(AUTO.replace("[npu0, ovnpu, ovgpu, cpu0]", "[npu0, ovnpu]"))
    cfg = load(path, discover=discovered_cpu_only)
    assert cfg.models == []
    assert "model minilm is not served here: none of its devices ['npu0', 'ovnpu']" in caplog.text


def test_an_invalid_discovered_device_is_reported(write):
    path = write(AUTO)
    message = load_error(path, discover=lambda: [{"name": "cpu0", "kind": "cpu",
                                                   "backend": "onnxruntime", "capacity": 0}])
    assert f"{path}: devices (auto)[0].capacity: must be an integer 1..256, got 0" in message


def test_a_failing_discovery_is_a_config_error(write):
    def broken() -> list[dict]:
        raise RuntimeError("no drivers")
    message = load_error(write(AUTO), discover=broken)
    assert "devices: device discovery failed: RuntimeError: no drivers" in message


def test_other_strings_than_auto_are_rejected(write):
    path = write("devices: all\n")
    assert f"{path}: devices: must be a non-empty list of devices or 'auto', got 'all'" \
        in load_error(path)


# -- handing the config to child processes ---------------------------------------------------

def test_dict_round_trip_is_exact_and_json_able(write):
    cfg = load(write("""\
        scheduler: {address: "tcp://0.0.0.0:0", token: t0k, max_attempts: 2}
        devices:
          - {name: npu0, kind: npu, backend: qnn, fallback: [cpu0], options: {soc_model: "69"},
             faults: {fail_after: 2, message: boom, models: [minilm]}}
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}
        models:
          - name: minilm
            source: models/minilm.onnx
            devices: [npu0]
            options: {npu0: {shapes: {input_ids: [1, 32]}, pad: true}}
        model_cache: cache
        """))
    d = config_to_dict(cfg)
    back = config_from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert config_to_dict(back) == d


def test_from_dict_does_not_reread_the_environment(write):
    cfg = load(write(ISSUE_EXAMPLE))
    back = config_from_dict(config_to_dict(cfg))
    assert back.scheduler.address == "tcp://127.0.0.1:8471"
    assert back.source == cfg.source


def test_from_dict_rejects_unknown_keys(write):
    d = config_to_dict(load(write(ISSUE_EXAMPLE)))
    d["devices"][0]["speed"] = 9
    with pytest.raises(ConfigError, match=r"devices\[0\]: unknown key 'speed'"):
        config_from_dict(d)


# -- the embedded default --------------------------------------------------------------------

def test_the_default_config_loads_with_discovered_devices():
    cfg = load_config(env={}, discover=discovered_npu_and_cpu)
    assert cfg.source.endswith(os.path.join("runtime", "configs", "local.yaml"))
    assert cfg.scheduler.address == "tcp://127.0.0.1:8471"
    assert cfg.device_order("minilm") == ["npu0", "cpu0"]
    assert cfg.model("minilm").options["npu0"]["soc_model"] == "69"
    assert cfg.model("minilm").source == "packaged:minilm"


def test_the_default_config_runs_on_a_cpu_only_machine():
    cfg = load_config(env={}, discover=discovered_cpu_only)
    assert cfg.device_order("minilm") == ["cpu0"]


def test_deploy_copy_is_byte_identical_to_the_embedded_default():
    embedded = (REPO / "runtime" / "configs" / "local.yaml").read_bytes()
    assert (REPO / "deploy" / "local.yaml").read_bytes() == embedded


@pytest.mark.parametrize("key", ["fail_after_tokens", "garble_after_tokens"])
def test_token_faults_are_parsed_validated_and_survive_the_dict_round_trip(write, key):
    text = TWO_DEVICES.replace("backend: qnn}", f"backend: qnn, faults: {{{key}: 3}}}}")
    cfg = load(write(text + MINILM))
    assert cfg.device("npu0").faults == FaultConfig(**{key: 3})
    assert getattr(config_from_dict(config_to_dict(cfg)).device("npu0").faults, key) == 3
    assert load(write(TWO_DEVICES + MINILM)).device("cpu0").faults is None
    for bad, shown in (("-1", "got -1"), ("2.5", "got 2.5"), ("'3'", "got '3'"), ("true", "got True")):
        path = write(TWO_DEVICES.replace("backend: qnn}", f"backend: qnn, faults: "
                                         f"{{{key}: {bad}}}}}") + MINILM)
        message = load_error(path)
        assert f"{path}: devices[0].faults.{key}: must be an integer 0.." in message
        assert shown in message


def test_the_http_section_defaults_to_loopback_and_needs_a_key_elsewhere(write):
    base = ("devices:\n  - {name: cpu0, kind: cpu, backend: onnxruntime}\n"
            "models:\n  - {name: minilm, source: packaged:minilm, "
            "tokenizer: packaged:minilm-tokenizer}\n")
    cfg = load(write(base))
    assert cfg.http.address == "127.0.0.1:8470" and cfg.http.api_key is None
    assert cfg.model("minilm").tokenizer == "packaged:minilm-tokenizer"
    path = write(base + "http: {address: '0.0.0.0:8470'}\n")
    message = load_error(path)
    assert f"{path}: http.address: binds non-loopback host 0.0.0.0 and so needs an API key" \
        in message and "got '0.0.0.0:8470'" in message
    cfg = load(path, env={"FANOUT_API_KEY": "k3y"})
    assert cfg.http.api_key == "k3y" and "k3y" not in repr(cfg)
    assert "http.max_body_bytes" in load_error(write(base + "http: {max_body_bytes: 1}\n"))
    assert (cfg.http.max_generations, cfg.http.max_connections, cfg.http.header_timeout_s,
            cfg.http.body_timeout_s) == (128, 256, 10.0, 30.0)
    for bad in ("max_generations: 0", "max_connections: 0", "header_timeout_s: 0",
                "body_timeout_s: .inf"):
        field = bad.split(":")[0]
        assert f"http.{field}: must be" in load_error(write(base + f"http: {{{bad}}}\n"))
    assert load(write(base + "http: {max_generations: 16, header_timeout_s: 2.5}\n")).http \
        .max_generations == 16


def test_a_default_task_timeout_past_the_longest_allowed_is_refused(write):
    path = write(TWO_DEVICES + "scheduler: {task_timeout_s: 7200, max_task_timeout_s: 3600}\n")
    assert "scheduler.task_timeout_s: must be at most max_task_timeout_s = 3600" in \
        load_error(path)


def test_ray_resources_of_a_device_are_parsed_validated_and_survive_the_dict_round_trip(write):
    text = TWO_DEVICES.replace("backend: qnn}", "backend: qnn, resources: {NPU: 1, CPU: 0.5}}")
    cfg = load(write(text + MINILM))
    assert cfg.device("npu0").resources == {"NPU": 1.0, "CPU": 0.5}
    assert cfg.device("cpu0").resources == {}
    assert config_from_dict(config_to_dict(cfg)).device("npu0").resources == {"NPU": 1.0,
                                                                             "CPU": 0.5}
    for bad, shown in (("{NPU: 0}", "got 0"), ("{NPU: 1.5}", "got 1.5"), ("{NPU: '1'}", "got '1'"),
                       ("{NPU: true}", "got True")):
        path = write(TWO_DEVICES.replace("backend: qnn}", f"backend: qnn, resources: {bad}}}")
                     + MINILM)
        message = load_error(path)
        assert f"{path}: devices[0].resources.NPU: must be a number 0 < x <= 1e6" in message
        assert shown in message
    path = write(TWO_DEVICES.replace("backend: qnn}", "backend: qnn, resources: [NPU]}") + MINILM)
    assert "devices[0].resources: must be a mapping" in load_error(path)
