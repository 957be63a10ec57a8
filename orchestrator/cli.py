"""The `orch` command line: parse, call the planner, render. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from orchestrator import flags as F
from orchestrator.inputs import cluster_preset_paths, load_cluster, load_model, pydantic_problem, resolve_cluster
from orchestrator.render import (
    cost_json, gib, print_cost, print_explain, print_header, print_memory, print_rejections, print_speed, print_top,
    rejections, report_json,
)
from planner.errors import PlanInputError
from planner.finetune import FinetuneSpec
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


def _check_zero(zero: Optional[int]) -> None:
    if zero is not None and zero not in (0, 1, 2, 3):
        raise PlanInputError(f"--zero {zero} is not a ZeRO stage", "use --zero 0, 1, 2 or 3")


def _job_inputs(command: str, model: Optional[str], cluster: Optional[str], zero: Optional[int], seq_len: int,
                global_batch: Optional[int], precision: F.PrecisionChoice):  # type: ignore[no-untyped-def]
    """Model, cluster and training spec of a command that runs a job on a named cluster."""
    if model is None or cluster is None:
        raise PlanInputError(f"orch {command} needs --model and --cluster", "pass e.g. --model debug --cluster cpu-2")
    _check_zero(zero)
    training = _build(TrainingSpec, "training flags", seq_len=seq_len, global_batch=global_batch or 0, precision=precision.value)
    return load_model(model), resolve_cluster(cluster, None, None, None), training


class BackendChoice(str, Enum):
    deepspeed = "deepspeed"
    megatron = "megatron"


@app.command()
def plan(
    model: F.ModelOpt = None,
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
    top: int = typer.Option(5, "--top", min=1, help="Show the K best plans."),
    explain: bool = typer.Option(False, "--explain", help="Say why the winner beats the runner-up."),
    backend: BackendChoice = typer.Option(BackendChoice.deepspeed, "--backend", help="deepspeed: what orch launches; megatron: also SP, interleaving, CP (for comparison)."),
    tokens: Optional[float] = typer.Option(None, "--tokens", help="Training tokens: adds time, GPU-hours, cost and energy."),
    budget_gpu_hours: Optional[float] = typer.Option(None, "--budget-gpu-hours", help="Compute-optimal recipe for this many GPU-hours."),
    budget_flops: Optional[float] = typer.Option(None, "--budget-flops", help="Compute-optimal recipe for this many training FLOPs."),
    deepspeed_config: Optional[Path] = typer.Option(None, "--deepspeed-config", help="Write the best plan's DeepSpeed config here."),
    method: F.MethodOpt = F.MethodChoice.full,
    lora_rank: F.LoraRankOpt = 8,
    lora_alpha: F.LoraAlphaOpt = 16.0,
    lora_targets: F.LoraTargetsOpt = None,
    lora_dropout: F.LoraDropoutOpt = 0.0,
    quant: F.QuantOpt = "nf4",
    double_quant: F.DoubleQuantOpt = True,
    quant_block_size: F.QuantBlockOpt = 64,
    paged_optimizer: F.PagedOpt = False,
    adapter_dtype: F.AdapterDtypeOpt = "fp32",
    adapter_size: F.AdapterSizeOpt = 64,
    prefix_length: F.PrefixOpt = 30,
    num_virtual_tokens: F.VirtualTokensOpt = 20,
    ia3_targets: F.Ia3TargetsOpt = None,
    trace: bool = typer.Option(False, "--trace", help="Measure the best plan's activations with the exact FakeTensor trace."),
    as_json: bool = typer.Option(False, "--json", help="Print the plans as JSON (the stable contract)."),
) -> None:
    """Find the fastest plan that fits a model on a cluster (a dry run: nothing is started)."""
    from orchestrator.planning import run_plan
    from orchestrator.recipe import run_recipe

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
    _check_zero(zero)
    pinned = _build(
        Pinned,
        "plan flags",
        dp=dp, tp=tp, pp=pp, cp=cp, ep=ep, sp=sp, interleave=interleave, zero_stage=zero,
        offload=offload.value if offload else None, micro_batch=micro_batch,
        recompute=recompute.value if recompute else None,
    )
    if budget_gpu_hours is not None or budget_flops is not None:
        code = run_recipe(console, cluster_spec, training, pinned, budget_gpu_hours, budget_flops, backend.value, as_json)
        raise typer.Exit(code)
    if model is None:
        raise PlanInputError("no --model given", "pass --model PRESET|CONFIG.json, or --budget-gpu-hours/--budget-flops")
    model_spec = load_model(model)
    ft_fields = dict(
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets or (), lora_dropout=lora_dropout,
        quant=quant, double_quant=double_quant, quant_block_size=quant_block_size, paged_optimizer=paged_optimizer,
        adapter_dtype=adapter_dtype, adapter_size=adapter_size, prefix_length=prefix_length,
        num_virtual_tokens=num_virtual_tokens, ia3_targets=ia3_targets or (),
    )
    if method == F.MethodChoice.all:
        from orchestrator.compare import compare_methods

        raise typer.Exit(compare_methods(console, model_spec, cluster_spec, training, pinned, ft_fields, backend.value, as_json))
    finetune = _build(FinetuneSpec, "fine-tuning flags", method=method.value, **ft_fields)
    result = run_plan(model_spec, cluster_spec, training, pinned, top=top, trace=trace, backend=backend.value,
                      tokens=tokens, finetune=finetune)
    if deepspeed_config is not None and result.best is not None:
        _write_deepspeed_config(deepspeed_config, model_spec, result.best.plan, training)
    if as_json:
        extra = {"notes": result.notes, "rejected": rejections(result.search)}
        if result.cost:
            extra["cost"] = cost_json(result.cost)
        if not result.top:
            extra["would_fit"] = result.suggestions
        print(json.dumps(report_json(model_spec, cluster_spec, result.top, finetune=finetune, **extra)))
    else:
        _print_result(model_spec, cluster_spec, result, explain)
    raise typer.Exit(EXIT_FITS if result.best is not None else EXIT_NOTHING_FITS)


def _print_result(model_spec, cluster_spec, result, explain: bool) -> None:  # type: ignore[no-untyped-def]
    print_header(console, model_spec, cluster_spec)
    if result.best is None:
        console.print("[bold red]NOTHING FITS[/]: no plan of this model fits this cluster.")
        if result.search.closest is not None:
            print_memory(console, model_spec, cluster_spec, result.search.closest)
        print_rejections(console, result.search)
        for line in result.suggestions:
            console.print(f"[bold]would fit:[/] {line}")
        return
    print_memory(console, model_spec, cluster_spec, result.best.memory)
    print_speed(console, result.best)
    if result.cost:
        print_cost(console, result.cost)
    print_top(console, result.top)
    print_rejections(console, result.search)
    if explain:
        print_explain(console, result.top)
    for note in result.notes:
        console.print(f"[dim]note:[/] {note}")


def _write_deepspeed_config(path: Path, model_spec, plan_obj, training: TrainingSpec) -> None:  # type: ignore[no-untyped-def]
    from launch.deepspeed_config import deepspeed_config
    from planner.evaluate import buffers_for

    try:
        buffers = buffers_for(model_spec, plan_obj)  # the buckets the memory model counted
        path.write_text(json.dumps(deepspeed_config(plan_obj, training, buffers=buffers), indent=2) + "\n")
    except OSError as exc:
        raise PlanInputError(f"--deepspeed-config {path}: cannot write ({exc.strerror})", "pass a writable path") from None


@app.command()
def launch(
    model: F.ModelOpt = None,
    cluster: F.ClusterOpt = None,
    seq_len: F.SeqLenOpt = 2048,
    micro_batch: F.MicroBatchOpt = None,
    global_batch: F.GlobalBatchOpt = None,
    precision: F.PrecisionOpt = F.PrecisionChoice.bf16,
    dp: F.DpOpt = None,
    tp: F.TpOpt = None,
    pp: F.PpOpt = None,
    zero: F.ZeroOpt = None,
    offload: F.OffloadOpt = None,
    steps: int = typer.Option(100, "--steps", min=1, help="Optimizer steps in total (a resumed run ends at the same count)."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate (linear warm-up over 10% of steps, then cosine)."),
    name: Optional[str] = typer.Option(None, "--name", help="Job name (default: orch-MODEL-TIME)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Storage path of checkpoints and step records (default ~/.orch/runs)."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", min=0, help="Save a DeepSpeed checkpoint every N steps (0: none)."),
    max_failures: int = typer.Option(0, "--max-failures", min=-1, help="Worker-group restarts from the last checkpoint (-1: unlimited)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start an embedded local cluster)."),
    log_jsonl: Optional[Path] = typer.Option(None, "--log-jsonl", help="Append one JSON object per step from rank 0 to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print a one-line JSON summary as the last stdout line."),
    fail_at_step: int = typer.Option(0, "--fail-at-step", min=0, hidden=True, help="Testing: rank 0 dies once after this step."),
) -> None:
    """Plan a model on a cluster and train it with DeepSpeed on Ray (data parallelism, ZeRO 0-3)."""
    from orchestrator.launching import LaunchOptions, launch as run_launch

    model_spec, cluster_spec, training = _job_inputs("launch", model, cluster, zero, seq_len, global_batch, precision)
    pinned = _build(Pinned, "plan flags", dp=dp, tp=tp, pp=pp, zero_stage=zero, micro_batch=micro_batch,
                    offload=offload.value if offload else None)
    opts = LaunchOptions(steps=steps, lr=lr, name=name, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         max_failures=max_failures, address=address, log_jsonl=log_jsonl,
                         fail_at_step=fail_at_step)
    result = run_launch(model_spec, cluster_spec, training, pinned, opts)
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        console.print(f"{result['name']}: {result['status']} after {result['steps']} steps, "
                      f"loss {result['initial_loss']} -> {result['final_loss']}, restarts {result['restarts']}")
    raise typer.Exit({"succeeded": 0, "failed": 1, "stopped": 130}[result["status"]])


@app.command()
def profile(
    model: F.ModelOpt = None,
    cluster: F.ClusterOpt = None,
    seq_len: F.SeqLenOpt = 2048,
    micro_batch: F.MicroBatchOpt = None,
    global_batch: F.GlobalBatchOpt = None,
    precision: F.PrecisionOpt = F.PrecisionChoice.bf16,
    dp: F.DpOpt = None,
    zero: F.ZeroOpt = None,
    steps: int = typer.Option(2, "--steps", min=1, help="Optimizer steps measured."),
    as_json: bool = typer.Option(False, "--json", help="Print predicted against measured bytes as JSON."),
) -> None:
    """Run a plan's ranks for a few steps on this machine and set measured memory against the plan."""
    from orchestrator.profiling import print_profile, profile_plan

    model_spec, cluster_spec, training = _job_inputs("profile", model, cluster, zero, seq_len, global_batch, precision)
    pinned = _build(Pinned, "plan flags", dp=dp, zero_stage=zero, micro_batch=micro_batch)
    result = profile_plan(model_spec, cluster_spec, training, pinned, steps=steps)
    if as_json:
        print(json.dumps(result.as_json()))
    else:
        print_profile(console, result)


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
