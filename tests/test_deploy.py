"""The deploy/ files: they parse, the Fanout config loads, the Ray manifests have the expected shape."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from runtime.config.loader import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
YAMLS = sorted(DEPLOY.glob("*.yaml")) + sorted(DEPLOY.glob("*.yml"))


def _load(name: str):
    return yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))


def test_deploy_has_the_files():
    names = {p.name for p in YAMLS}
    assert {"cluster.yaml", "ray-cluster.yaml", "kuberay-raycluster.yaml"} <= names
    assert (DEPLOY / "README.md").is_file()


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_parses(path):
    assert isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict)


def test_cluster_config_loads_and_npu_needs_an_npu():
    cfg = load_config(DEPLOY / "cluster.yaml", env={})  # no FANOUT_* from the test's env
    npus = [d for d in cfg.devices if d.kind == "npu"]
    assert npus and all(d.resources == {"NPU": 1} for d in npus)
    assert any(d.kind == "cpu" for d in cfg.devices)
    assert {m.name for m in cfg.models} == {"minilm", "smollm2"}
    assert cfg.scheduler.address.endswith(":8471")
    assert cfg.scheduler.worker_address.endswith(":8472")  # a fixed port the README names
    assert cfg.cluster.launcher == "ray" and cfg.cluster.address == "auto"
    # an NPU worker on every NPU PC and a CPU worker on every PC, as the README says
    assert all(d.per_node for d in npus)
    assert any(d.kind == "cpu" and d.per_node for d in cfg.devices)


def test_kuberay_manifest():
    doc = _load("kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert "rayStartParams" in spec["headGroupSpec"] and "template" in spec["headGroupSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert any("cpu" in name for name in groups) and any("npu" in name for name in groups)
    for g in groups.values():
        assert {"replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(g)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())  # KubeRay wants strings
    npu = next(g for name, g in groups.items() if "npu" in name)
    resources = npu["rayStartParams"]["resources"]
    assert "NPU" in resources
    # KubeRay passes it as `--resources=<value>`: the shell unquotes it to JSON Ray accepts.
    assert json.loads(json.loads(resources)) == {"NPU": 1}


def test_ray_cluster_launcher_config():
    doc = _load("ray-cluster.yaml")
    assert {"cluster_name", "provider", "head_start_ray_commands",
            "worker_start_ray_commands"} <= set(doc)
    assert doc["provider"]["type"] == "local"
    assert doc["provider"]["head_ip"] and doc["provider"]["worker_ips"]
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in doc["worker_start_ray_commands"])
    assert any("fanout-runtime[ray]" in c for c in doc["setup_commands"])


def test_ray_cluster_launcher_config_matches_rays_schema():
    ray = pytest.importorskip("ray")
    jsonschema = pytest.importorskip("jsonschema")
    schema = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"
    if not schema.is_file():
        pytest.skip("this Ray has no cluster launcher schema")
    doc = _load("ray-cluster.yaml")
    doc.pop("min_workers", None)  # the local provider moves it before validating
    jsonschema.validate(doc, json.loads(schema.read_text(encoding="utf-8")))
