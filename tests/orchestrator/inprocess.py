"""`orch` run in this process (orchestrator.cli.main): exit code, stdout and stderr."""

from __future__ import annotations

import contextlib
import io

from orchestrator.cli import main


def run_orch(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()
