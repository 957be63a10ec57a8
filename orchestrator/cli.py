"""The `orch` command line: parse, call the planner, render. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from orchestrator import flags as F
from orchestrator.inputs import cluster_preset_paths, load_cluster, load_model, pydantic_problem, resolve_cluster
from orchestrator.render import gib, print_plan, report_json
from planner.errors import PlanInputError
from planner.params import total_params
from planner.pinned import Pinned
from planner.presets import preset, preset_names
from planner.training import TrainingSpec

app = typer.Typer(
    name="orch",
    help="Plan, launch and monitor distributed training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

EXIT_FITS, EXIT_NOTHING_FITS, EXIT_USAGE = 0, 1, 2


def _build(model_cls: type, where: str, **fields: object):  # type: ignore[no-untyped-def]
    try:
        return model_cls(**fields)
    except ValidationError as exc:
        raise pydantic_problem(exc, where) from None


@app.command()
def plan(
    model: F.ModelOpt,
    cluster: F.ClusterOpt = None,
    gpu: F.GpuOpt = None,
    gpus: F.GpusOpt = None,
    gpus_per_node: F.GpusPerNodeOpt = None,
    seq_len: F.SeqLenOpt = 2048,
    micro_batch: F.MicroBatchOpt = None,
    global_batch: F.GlobalBatchOpt = None,
    precision: F.PrecisionOpt = F.PrecisionChoice.bf16,
    optimizer: F.OptimizerOpt = F.OptimizerChoice.adamw,
    attention: F.AttentionOpt = F.AttentionChoice.flash,
    recompute: F.RecomputeOpt = None,
    dp: F.DpOpt = None,
    tp: F.TpOpt = None,
    pp: F.PpOpt = None,
    zero: F.ZeroOpt = None,
    offload: F.OffloadOpt = None,
    sp: F.SpOpt = None,
    cp: F.CpOpt = None,
    ep: F.EpOpt = None,
    interleave: F.InterleaveOpt = None,
    trace: bool = typer.Option(False, "--trace", help="Measure activations with the exact FakeTensor trace."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (the stable contract)."),
) -> None:
    """Estimate what every GPU holds for a model on a cluster (a dry run: nothing is started)."""
    from orchestrator.planning import run_plan

    model_spec = load_model(model)
    cluster_spec = resolve_cluster(cluster, gpu, gpus, gpus_per_node)
    training = _build(
        TrainingSpec,
        "training flags",
        seq_len=seq_len,
        global_batch=global_batch or 0,
        precision=precision.value,
        optimizer=optimizer.value,
        attention=attention.value,
    )
    if zero is not None and zero not in (0, 1, 2, 3):
        raise PlanInputError(f"--zero {zero} is not a ZeRO stage", "use --zero 0, 1, 2 or 3")
    pinned = _build(
        Pinned,
        "plan flags",
        dp=dp,
        tp=tp,
        pp=pp,
        cp=cp,
        ep=ep,
        sp=sp,
        interleave=interleave,
        zero_stage=zero,
        offload=offload.value if offload else None,
        micro_batch=micro_batch,
        recompute=recompute.value if recompute else None,
    )
    result = run_plan(model_spec, cluster_spec, training, pinned, trace=trace)
    if as_json:
        print(json.dumps(report_json(model_spec, cluster_spec, [result.best], notes=result.notes)))
    else:
        print_plan(console, model_spec, cluster_spec, result.best, result.notes)
        for line in result.suggestions:
            console.print(f"[bold]would fit:[/] {line}")
    raise typer.Exit(EXIT_FITS if result.best.fits else EXIT_NOTHING_FITS)


@app.command()
def models() -> None:
    """List the model presets with their exact parameter counts."""
    table = Table(title="model presets")
    for col in ("name", "family", "parameters", "layers", "hidden", "heads (kv)", "vocab"):
        table.add_column(col, justify="right" if col not in ("name", "family") else "left")
    for name in preset_names():
        m = preset(name)
        table.add_row(
            name, m.family, f"{total_params(m) / 1e9:,.3f}B", str(m.num_layers), str(m.hidden_size),
            f"{m.num_heads} ({m.num_kv_heads})", str(m.vocab_size),
        )
    console.print(table)


@app.command()
def clusters() -> None:
    """List the cluster presets (YAML files in cluster_configs/)."""
    table = Table(title="cluster presets")
    for col in ("name", "gpu", "nodes x GPUs", "GPU memory", "intra / inter GB/s", "file"):
        table.add_column(col)
    for name, path in cluster_preset_paths().items():
        c = load_cluster(name)
        table.add_row(
            name, c.gpu.name, f"{c.num_nodes} x {c.gpus_per_node}", gib(c.gpu.memory_bytes),
            f"{c.intra_node_GB_per_s:g} / {c.inter_node_GB_per_s:g}", str(path.name),
        )
    console.print(table)
    console.print("Inline clusters: --gpu TYPE --gpus N [--gpus-per-node 8] (DGX-class nodes).")


def _command(argv: Optional[list[str]]) -> str:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), "")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: bad input of any kind is one line on stderr and exit code 2, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)
    except PlanInputError as exc:
        print(f"orch: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("orch: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:
        # Typer's own usage errors (unknown option, a non-number where a number belongs).
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        hint = getattr(exc, "param_hint", None) or ""
        where = f"{hint}: " if hint and str(hint) not in message else ""
        print(f"orch: error: {where}{message}. To fix: see 'orch {_command(argv)} --help'", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else 0)
