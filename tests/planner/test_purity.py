"""planner/ is pure: importing it loads none of the side-effect libraries, nor launch/orchestrator."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

from tests.conftest import ROOT

FORBIDDEN = ["ray", "deepspeed", "prometheus_client", "launch", "orchestrator", "torch", "transformers", "yaml"]


def test_planner_imports_nothing_forbidden():
    import planner

    modules = [m.name for m in pkgutil.walk_packages(planner.__path__, "planner.") if not m.name.startswith("planner.trace")]
    assert len(modules) > 25
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(n for n in {FORBIDDEN!r} if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_trace_module_imports_torch_lazily():
    code = "import sys, planner.trace; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
