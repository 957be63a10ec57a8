"""`orch monitor`: a ready Prometheus for orch's jobs.

It writes into one directory:

- ``prometheus.yml``: one scrape job, ``orch``, whose targets are the file-based service-discovery
  files the jobs' workers write under each storage path (``<storage>/orch_metrics_targets/*.json``,
  launch/metrics.py). Prometheus watches those files, so a job launched later is scraped without
  running ``orch monitor`` again, and one that ends is dropped. ``honor_labels`` keeps the metrics'
  own ``job`` label (the orch job name).
- ``orch-alerts.yml``: the alert rules of ``cluster_configs/monitoring/alerts.yml``.

Then it runs ``prometheus`` on ``--listen`` (loopback unless told otherwise) in the foreground
until Ctrl-C, if the binary is on PATH. The Grafana dashboard is
``cluster_configs/monitoring/grafana-dashboard.json`` (see the README there).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launch.metrics import TARGETS_DIR
from orchestrator.inputs import CLUSTER_DIR
from planner.errors import PlanInputError

MONITORING_DIR = CLUSTER_DIR / "monitoring"
ALERTS_FILE = MONITORING_DIR / "alerts.yml"
DASHBOARD_FILE = MONITORING_DIR / "grafana-dashboard.json"
DEFAULT_OUT = Path.home() / ".orch" / "monitoring"
SCRAPE_JOB = "orch"
_DURATION = re.compile(r"^[1-9][0-9]*(ms|s|m|h)$")


@dataclass(frozen=True)
class MonitorSetup:
    """What `orch monitor` wrote and where Prometheus will listen."""

    config: Path  # prometheus.yml
    rules: Path  # the alert rules, next to it
    data_dir: Path  # Prometheus' TSDB
    target_files: tuple[str, ...]  # the file_sd patterns scraped
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9090`` for IPv6) as (host, port)."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PlanInputError(f"--listen {listen!r} is not HOST:PORT", "pass e.g. --listen 127.0.0.1:9090")
    return host, int(port)


def _check_duration(value: str, flag: str) -> str:
    if not _DURATION.match(value):
        raise PlanInputError(f"{flag} {value!r} is not a Prometheus duration", f"pass e.g. {flag} 15s")
    return value


def target_pattern(storage: Path) -> Path:
    """The file_sd files the workers of jobs under ``storage`` write (launch/metrics.py)."""
    return storage / TARGETS_DIR / "*.json"


def prometheus_config(target_files: list[str], rules: Path, scrape_interval: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(rules)],
        "scrape_configs": [{
            "job_name": SCRAPE_JOB,
            "honor_labels": True,  # the metrics' `job` label is the orch job name
            "file_sd_configs": [{"files": target_files, "refresh_interval": "30s"}],
        }],
    }


def write_setup(out: Path, storages: list[Path], listen: str, scrape_interval: str = "15s") -> MonitorSetup:
    """Write prometheus.yml and the rules into ``out``; create each storage's targets directory
    (Prometheus watches a directory only if it exists when it starts)."""
    host, port = parse_listen(listen)
    _check_duration(scrape_interval, "--scrape-interval")
    if not ALERTS_FILE.is_file():
        raise PlanInputError(f"the alert rules {ALERTS_FILE} are missing", "run orch from a checkout of the repository (cluster_configs/ ships with it)")
    out = out.expanduser().resolve()
    patterns = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for storage in storages:
            pattern = target_pattern(storage.expanduser().resolve())
            pattern.parent.mkdir(parents=True, exist_ok=True)
            patterns.append(str(pattern))
        rules = out / "orch-alerts.yml"
        shutil.copyfile(ALERTS_FILE, rules)
        config = out / "prometheus.yml"
        config.write_text("# Written by `orch monitor`; run it again to regenerate.\n"
                          + yaml.safe_dump(prometheus_config(patterns, rules, scrape_interval), sort_keys=False))
    except OSError as exc:
        raise PlanInputError(f"cannot write the monitoring files into {out} ({exc.strerror}: {exc.filename})",
                             "pass a writable --out directory and --checkpoint-dir") from None
    return MonitorSetup(config=config, rules=rules, data_dir=out / "data", target_files=tuple(patterns), host=host, port=port)


def current_targets(setup: MonitorSetup, prune: bool = True) -> list[dict[str, Any]]:
    """The target groups the jobs' workers announced; with ``prune``, announcements whose endpoint
    refuses connections (workers killed before they could withdraw them) are deleted."""
    groups = []
    for pattern in setup.target_files:
        for path in sorted(Path(pattern).parent.glob("*.json")):
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if prune and not any(_answers(t) for g in found for t in g.get("targets", [])):
                path.unlink(missing_ok=True)
                continue
            groups.extend(found)
    return groups


def _answers(target: str) -> bool:
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except ConnectionRefusedError:
        return False
    except (OSError, ValueError):
        return True  # unreachable from here is not proof it is gone (another node, a firewall)


def prometheus_command(setup: MonitorSetup, binary: str = "prometheus") -> list[str]:
    listen = f"[{setup.host}]:{setup.port}" if ":" in setup.host else f"{setup.host}:{setup.port}"
    return [binary, f"--config.file={setup.config}", f"--storage.tsdb.path={setup.data_dir}",
            f"--web.listen-address={listen}"]


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


def run_prometheus(setup: MonitorSetup, binary: str) -> int:
    """Run Prometheus in the foreground until it exits or Ctrl-C/SIGTERM; its exit code."""
    _check_port_free(setup.host, setup.port)
    proc = subprocess.Popen(prometheus_command(setup, binary))
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise PlanInputError(f"--listen {host}:{port}: cannot listen there ({exc.strerror})",
                                 "stop what uses that port (another Prometheus?) or pass another --listen") from None


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
