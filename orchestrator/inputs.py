"""Turn what the user typed (preset names, file paths, flags) into planner specs.

Files are read here, at the edge; the planner only ever sees dicts and specs. Every failure is a
PlanInputError that names the input and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from planner.memory.calibration import Calibration, MeasuredRecord, calibrated_cluster, parse_records
from planner.errors import PlanInputError
from planner.specs.hardware import ClusterSpec, GPUSpec, dgx_cluster, gpu_by_name
from planner.structure.hf_config import spec_from_hf_config
from planner.structure.model import ModelSpec
from planner.structure.presets import PRESETS, preset

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster_configs"


def pydantic_problem(err: ValidationError, where: str) -> PlanInputError:
    """One line naming the first invalid field of a pydantic error."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "value"
    inner = first.get("ctx", {}).get("error")
    if isinstance(inner, PlanInputError):
        return inner
    return PlanInputError(f"{where}: field '{field}' {first['msg'].lower()}", f"correct '{field}' in {where}")


def load_model(name_or_path: str) -> ModelSpec:
    """A preset name, a config.json path, or a directory holding config.json."""
    if name_or_path.lower() in PRESETS:
        return preset(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise PlanInputError(
            f"--model '{name_or_path}' is neither a preset nor an existing file",
            "run 'orch models' for presets, or pass the path of a Hugging Face config.json",
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanInputError(f"{path}: not valid JSON ({exc})", "pass a Hugging Face config.json") from None
    name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    try:
        return spec_from_hf_config(cfg, name=name)
    except ValidationError as exc:
        raise pydantic_problem(exc, str(path)) from None


def cluster_preset_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CLUSTER_DIR.glob("*.yaml")) if _is_cluster_file(p)}


def _is_cluster_file(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "gpus_per_node" in data


def _gpu_from_yaml(value: Any, where: str) -> GPUSpec:
    if isinstance(value, str):
        return gpu_by_name(value)
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        base = gpu_by_name(value["name"])
        try:
            return GPUSpec.model_validate({**base.model_dump(), **value})
        except ValidationError as exc:
            raise pydantic_problem(exc, f"{where}: gpu") from None
    raise PlanInputError(
        f"{where}: 'gpu' must be a catalog name or a mapping with 'name'", "write e.g. 'gpu: h100-80gb'"
    )


def cluster_from_dict(data: Any, where: str) -> ClusterSpec:
    if not isinstance(data, dict):
        raise PlanInputError(f"{where}: a cluster file must hold a mapping", "see cluster_configs/*.yaml")
    fields = {**data, "gpu": _gpu_from_yaml(data.get("gpu"), where)}
    fields.setdefault("name", Path(where).stem)
    try:
        return ClusterSpec.model_validate(fields)
    except ValidationError as exc:
        raise pydantic_problem(exc, where) from None


def load_cluster(name_or_path: str) -> ClusterSpec:
    presets = cluster_preset_paths()
    path = presets.get(name_or_path, Path(name_or_path))
    if not path.exists():
        raise PlanInputError(
            f"--cluster '{name_or_path}' is neither a preset nor an existing file",
            f"use one of {', '.join(presets)} ('orch clusters'), a YAML path, or --gpu/--gpus",
        )
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        detail = str(exc).splitlines()[0]
        raise PlanInputError(f"{path}: not valid YAML ({detail})", "fix the YAML syntax") from None
    return cluster_from_dict(data, str(path))


def resolve_cluster(cluster: str | None, gpu: str | None, gpus: int | None, gpus_per_node: int | None) -> ClusterSpec:
    """--cluster wins; otherwise inline --gpu/--gpus build DGX-class nodes."""
    if cluster and (gpu or gpus):
        raise PlanInputError("both --cluster and --gpu/--gpus given", "pass either a cluster or inline GPU flags")
    if cluster:
        return load_cluster(cluster)
    if not gpu:
        raise PlanInputError("no cluster given", "pass --cluster NAME|FILE or --gpu TYPE --gpus N")
    spec = gpu_by_name(gpu)
    return dgx_cluster(spec, 1 if gpus is None else gpus, 8 if gpus_per_node is None else gpus_per_node)


def load_calibration(path: Path) -> Calibration:
    """A calibration file written by 'orch calibrate'."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanInputError(f"--calibration {path}: cannot read it as JSON ({exc})", "pass a file written by 'orch calibrate --out'") from None
    try:
        return Calibration.model_validate(data)
    except ValidationError as exc:
        raise pydantic_problem(exc, str(path)) from None


def with_calibration(cluster: ClusterSpec, path: Path | None) -> ClusterSpec:
    """The cluster, its overheads replaced by a calibration's fitted constants when one is given."""
    return cluster if path is None else calibrated_cluster(cluster, load_calibration(path))


def load_measurements(paths: list[Path]) -> list[MeasuredRecord]:
    """Every record of the measurement files (orch profile --save, bench/gpu_memory.py)."""
    records: list[MeasuredRecord] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanInputError(f"{path}: cannot read it as JSON ({exc})", "pass files written by orch profile --save or bench/gpu_memory.py") from None
        records += parse_records(data, str(path))
    return records
