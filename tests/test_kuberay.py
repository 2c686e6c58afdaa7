"""The KubeRay manifests: valid against the KubeRay v1.7.0 CRDs (../shared/kuberay/validate.py), one image and Ray
version everywhere, and each asks for what its config's plan is checked against."""

import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from cluster import plan
from cluster.config import load_config
from tests.conftest import ROOT, SHARED, needs_shared

KUBERAY = ROOT / "cluster/kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
RAYJOBS = [m for m in MANIFESTS if m.name.startswith("rayjob-")]


def _load(path):
    return yaml.safe_load(path.read_text())


def _cluster_spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@needs_shared(SHARED / "kuberay/validate.py")
def test_manifests_validate_against_the_kuberay_crds():
    assert [m.name for m in MANIFESTS] == ["raycluster.yaml", "rayjob-qwen2.5-1.5b.yaml", "rayjob-qwen2.5-14b.yaml",
                                           "rayjob-qwen2.5-7b.yaml"]
    done = subprocess.run([sys.executable, str(SHARED / "kuberay/validate.py"), *map(str, MANIFESTS)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_image_and_the_pinned_ray_version_everywhere():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_version = next(re.fullmatch(r"ray\[default\]==(\S+)", d)[1] for d in pins if d.startswith("ray["))
    images = set()
    for m in MANIFESTS:
        doc = _load(m)
        notes, spec = doc["metadata"]["annotations"], _cluster_spec(doc)
        assert notes["forecast-grpo/ray-version"] == spec["rayVersion"] == ray_version, m.name
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == \
            {notes["forecast-grpo/image"]}, m.name
        images.add(notes["forecast-grpo/image"])
    assert len(images) == 1
    assert f"FROM rayproject/ray:{ray_version}-" in (KUBERAY / "Dockerfile").read_text()


def _config_of(job: dict):
    """The config a RayJob's entrypoint runs, with the entrypoint's --set overrides."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "cluster.train"] and "--resume" in argv
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return argv[argv.index("--config") + 1], load_config(ROOT / argv[argv.index("--config") + 1], sets)


def _sized_configs(path):
    doc = _load(path)
    if doc["kind"] == "RayJob":
        return doc, [_config_of(doc)]
    return doc, [(c, load_config(ROOT / c)) for c in doc["metadata"]["annotations"]["forecast-grpo/sized-for"].split()]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pods_ask_for_what_the_config_is_planned_on(path):
    doc, configs = _sized_configs(path)
    spec = _cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in head["template"]["spec"]["containers"])
    (workers,) = spec["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits == requests
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])
    assert pod["nodeSelector"] and pod["tolerations"]
    for name, cfg in configs:
        hw = cfg.ray.cluster
        assert workers["replicas"] == hw.nodes and int(limits["nvidia.com/gpu"]) == hw.gpus_per_node, name
        assert float(limits["cpu"]) == hw.cpus_per_node and limits["memory"] == f"{hw.cpu_memory_gib:g}Gi", name
        p = plan.make_plan(cfg)
        assert p.problems == [], name
        gpus_per_node = {n: sum(1 for node, _ in p.gpu_bytes if node == n) for n in range(hw.nodes)}
        assert gpus_per_node == {n: int(limits["nvidia.com/gpu"]) for n in range(workers["replicas"])}, name


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjobs_run_their_size_config_and_resume_from_shared_storage(path):
    job = _load(path)
    name, cfg = _config_of(job)
    assert name == f"cluster/configs/{path.name.removeprefix('rayjob-')}"
    assert cfg.run.out_dir.startswith("s3://")  # outlives the cluster: a retry resumes from there
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
