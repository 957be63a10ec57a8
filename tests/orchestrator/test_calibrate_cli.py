"""`orch calibrate` and `--calibration`: fit from a measurement file, plan with the fitted constants
(through the cluster's overheads), refuse a calibration of the wrong kind of device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import DATA, ROOT

CPU_RECORD = str(DATA / "cpu_profile_debug.json")


def orch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, capture_output=True, text=True)


def test_calibrate_then_plan_with_it(tmp_path: Path) -> None:
    cal = tmp_path / "calib.json"
    out = orch("calibrate", CPU_RECORD, "--out", str(cal), "--json")
    assert out.returncode == 0, out.stderr
    fitted = json.loads(cal.read_text())
    assert json.loads(out.stdout) == fitted
    assert fitted["device"] == "cpu" and fitted["records"] == 1 and 0 < fitted["fragmentation_ratio"] < 0.1
    args = ("plan", "--model", "debug", "--cluster", "cpu-2", "--seq-len", "256", "--zero", "2", "--micro-batch", "2", "--json")
    before, after = orch(*args), orch(*args, "--calibration", str(cal))
    assert before.returncode == after.returncode == 0, after.stderr
    mem_before, mem_after = (json.loads(o.stdout)["plans"][0]["memory"] for o in (before, after))
    allocated = mem_after["total"] - mem_after["overhead"]
    assert mem_after["overhead"] == int(fitted["fragmentation_ratio"] * allocated) != mem_before["overhead"]


def test_calibration_of_another_device_kind_and_bad_files_are_one_line(tmp_path: Path) -> None:
    cal = tmp_path / "calib.json"
    assert orch("calibrate", CPU_RECORD, "--out", str(cal)).returncode == 0
    out = orch("plan", "--model", "debug", "--cluster", "h100-1", "--calibration", str(cal))
    assert out.returncode == 2 and "measured on CPU" in out.stderr and "To fix" in out.stderr and "Traceback" not in out.stderr
    out = orch("calibrate", str(tmp_path / "missing.json"), "--out", str(cal))
    assert out.returncode == 2 and "cannot read it as JSON" in out.stderr
