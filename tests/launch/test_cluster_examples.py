"""The Ray cluster-launcher and KubeRay examples in cluster_configs/ run `orch launch` lines that
this CLI really accepts (every option exists, the cluster file they name is valid), so they cannot
drift from the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer
import yaml

from orchestrator.cli import app
from orchestrator.inputs import load_cluster

REPO = Path(__file__).resolve().parents[2]


def launch_options() -> set[str]:
    command = typer.main.get_command(app)
    launch = command.commands["launch"]  # type: ignore[attr-defined]
    return {opt for p in launch.params for opt in p.opts}


def orch_lines(text: str) -> list[list[str]]:
    """Every `orch launch ...` command in a text (continuation lines joined)."""
    flat = re.sub(r"\\\n\s*#?\s*", " ", text)
    return [shlex.split(m.group(0).split("'")[0]) for m in re.finditer(r"orch launch --[^\n']*", flat)]


def check(argv: list[str]) -> None:
    known = launch_options()
    options = [a for a in argv[2:] if a.startswith("--")]
    assert options and set(options) <= known, set(options) - known
    cluster = argv[argv.index("--cluster") + 1].replace("/app/", "")
    assert load_cluster(str(REPO / cluster)).gpu.name == "h100-80gb"
    assert argv[argv.index("--address") + 1] == "auto"


def test_ray_cluster_launcher_example() -> None:
    path = REPO / "cluster_configs" / "ray" / "aws-h100-2x8.yaml"
    config = yaml.safe_load(path.read_text())
    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= set(config)
    assert config["head_node_type"] in config["available_node_types"]
    lines = orch_lines(path.read_text())
    assert lines
    for argv in lines:
        check(argv)


def test_kuberay_rayjob_example() -> None:
    path = REPO / "cluster_configs" / "kuberay" / "rayjob.yaml"
    job = yaml.safe_load(path.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    check(shlex.split(spec["entrypoint"]))
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = workers["replicas"] * int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    argv = shlex.split(spec["entrypoint"])
    assert gpus == int(argv[argv.index("--dp") + 1])  # the plan's world size is the GPUs the RayJob asks for
