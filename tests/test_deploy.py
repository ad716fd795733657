"""deploy/: the Dockerfile (parsed: no Docker engine here), the cluster launcher YAML
(validated with the Ray autoscaler's own schema and checks) and the KubeRay RayJob manifest
(the fields KubeRay requires); the shipped run configs fit the clusters they are meant for."""

from __future__ import annotations

import copy
import json
import re
import tomllib

import jsonschema
import pytest
import yaml

from pipeline.cluster.capacity import ClusterCapacity, NodeShape, check_capacity, launcher_capacity
from pipeline.config import ConfigError, config_from_dict, load_config
from tests.conftest import CONFIGS, REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
PINS = ("torch", "torchvision")


# ------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, ``\\`` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((DEPLOY / "Dockerfile").read_text())


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d.split("==")[0]: d for d in deps if d.split("==")[0] in PINS}


def test_dockerfile_base_user_entrypoint(dockerfile: list[tuple[str, str]]) -> None:
    words = [w for w, _ in dockerfile]
    assert words.count("FROM") == 1
    args = dict(a.split("=", 1) for w, a in dockerfile if w == "ARG" and "=" in a)
    base = next(a for w, a in dockerfile if w == "FROM").replace(
        "${PYTHON_VERSION}", args["PYTHON_VERSION"])
    assert base == "python:3.11-slim-bookworm"
    # Last USER wins: the image runs as a non-root user created in the image.
    user = [a for w, a in dockerfile if w == "USER"][-1]
    assert user not in ("root", "0")
    assert any(w == "RUN" and "useradd" in a and user in a for w, a in dockerfile)
    assert json.loads([a for w, a in dockerfile if w == "ENTRYPOINT"][-1]) == ["bsgal"]
    env = " ".join(a for w, a in dockerfile if w == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES=all" in env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")


def test_dockerfile_installs_pyproject_pins_then_the_project(
        dockerfile: list[tuple[str, str]]) -> None:
    runs = [a for w, a in dockerfile if w == "RUN"]
    pins = _pyproject_pins()
    assert set(pins) == set(PINS)
    torch_run = next(i for i, a in enumerate(runs) if "pip install" in a and "torch==" in a)
    installed = set(re.findall(r'"((?:torch|torchvision)==[^"]+)"', runs[torch_run]))
    assert installed == set(pins.values())
    project_run = next(i for i, a in enumerate(runs) if re.search(r"pip install (-e )?\.", a))
    assert project_run > torch_run
    copied = {a.split()[0] for w, a in dockerfile if w == "COPY"}
    for package in ("pipeline", "generators", "annotators", "selector", "trainer", "configs",
                    "pyproject.toml"):
        assert package in copied
        assert (REPO_ROOT / package).exists()


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for heavy in (".venv", ".git", "data", "runs"):
        assert heavy in ignored


# ------------------------------------------------------------------------- cluster launcher


@pytest.fixture(scope="module")
def launcher_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def _validated(config: dict) -> dict:
    """What `ray up` does with the file before it asks the cloud for anything: merge the
    provider's defaults, then validate with ray-schema.json and the launcher's own checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_the_autoscaler_schema(launcher_yaml: dict) -> None:
    prepared = _validated(launcher_yaml)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    assert prepared["docker"]["image"].endswith(":0.1.0")
    assert "--entrypoint=''" in prepared["docker"]["run_options"]


def test_the_schema_check_is_real(launcher_yaml: dict) -> None:
    broken = copy.deepcopy(launcher_yaml)
    broken["available_node_types"]["gen-gpu"]["resources"]["bsgal_generate"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        _validated(broken)
    broken = copy.deepcopy(launcher_yaml)
    broken["available_node_types"]["gen-gpu"]["max_gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        _validated(broken)
    broken = copy.deepcopy(launcher_yaml)
    broken["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        _validated(broken)


def test_cluster_yaml_node_types_per_stage(launcher_yaml: dict) -> None:
    types = launcher_yaml["available_node_types"]
    pins = {"gen-gpu": "bsgal_generate", "ann-gpu": "bsgal_annotate", "train-gpu": "bsgal_train"}
    for name, resource in pins.items():
        spec = types[name]
        assert spec["resources"][resource] >= 1
        assert spec["resources"]["GPU"] >= 1
        assert spec["min_workers"] <= spec["max_workers"]
        # Each pin resource is advertised by its node type only.
        assert all(resource not in types[t]["resources"] for t in types if t != name)
    assert types["train-gpu"]["resources"]["GPU"] > 1  # multi-GPU training node
    assert types["head"]["resources"] == {"CPU": 0}
    # The comments name the config keys that map to each node type.
    text = (DEPLOY / "cluster.yaml").read_text()
    for key in ("generation.resources", "annotation.resources",
                "training.resources_per_worker", "generation.concurrency",
                "training.num_workers"):
        assert key in text


def _pinned_lvis_config(extra: tuple[str, ...] = ()) -> object:
    return load_config(CONFIGS / "lvis_sd_sam.yaml", [
        "annotation.sam_checkpoint=/models/sam.pth",
        "generation.resources={bsgal_generate: 0.01}",
        "annotation.resources={bsgal_annotate: 0.01}",
        "training.resources_per_worker={bsgal_train: 0.01}", *extra])


def test_lvis_config_fits_the_launcher_cluster_at_its_max() -> None:
    cap = launcher_capacity(DEPLOY / "cluster.yaml")
    assert check_capacity(_pinned_lvis_config(), cap) == []
    with pytest.raises(ConfigError, match="generation: 9 x"):
        check_capacity(_pinned_lvis_config(("generation.concurrency=9",)), cap)


# ---------------------------------------------------------------------------------- RayJob


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def test_rayjob_has_the_fields_kuberay_requires(manifests: dict[str, dict]) -> None:
    job = manifests["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert spec["entrypoint"].startswith("bsgal run --config ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    images = set()
    for group in [head, *groups]:
        # KubeRay's rayStartParams is map[string]string.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        containers = _containers(group["template"])
        assert containers and all(c["name"] and c["image"] for c in containers)
        images |= {c["image"] for c in containers}
    assert len(images) == 1  # the same image for head and workers
    assert {p["containerPort"] for p in _containers(head["template"])[0]["ports"]} >= {6379, 8265}
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names)
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = _containers(group["template"])[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def _group_resources(group: dict) -> dict[str, float]:
    """What the pods of a worker group advertise to Ray (KubeRay derives CPU and GPU from
    the container limits; custom resources come from rayStartParams)."""
    limits = _containers(group["template"])[0]["resources"]["limits"]
    resources = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
    custom = group["rayStartParams"].get("resources")
    if custom:
        resources.update(json.loads(json.loads(custom)))
    return resources


def test_rayjob_config_is_mounted_loads_and_fits_its_cluster(
        manifests: dict[str, dict]) -> None:
    job, config_map = manifests["RayJob"], manifests["ConfigMap"]
    path = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    head_spec = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in _containers({"spec": head_spec})[0]["volumeMounts"]
                 if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in head_spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    key = path[len(mount["mountPath"]) + 1:]
    cfg = config_from_dict(yaml.safe_load(config_map["data"][key]))  # strict: every key known
    assert cfg.ray.address == "auto"
    assert cfg.output.dir.startswith("s3://")
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    nodes = [NodeShape(g["groupName"], _group_resources(g), g["replicas"]) for g in groups]
    head_cpus = float(job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
                      ["num-cpus"])
    cap = ClusterCapacity((NodeShape("head", {"CPU": head_cpus}), *nodes), bound=True,
                          source="rayjob.yaml")
    assert check_capacity(cfg, cap) == []
    # Every stage is pinned to a group that advertises its resource.
    advertised = {r for n in nodes for r in n.resources}
    pinned = {**cfg.generation.resources, **cfg.annotation.resources,
              **cfg.training.resources_per_worker}
    assert pinned and set(pinned) <= advertised
