"""The `orch` command line: parse, call the planner, render. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from orchestrator import flags as F
from orchestrator.inputs import (
    cluster_preset_paths, load_cluster, load_measurements, load_model, pydantic_problem, resolve_cluster, with_calibration,
)
from orchestrator.render import (
    cost_json, gib, print_cost, print_explain, print_header, print_memory, print_rejections, print_speed, print_top,
    rejections, report_json,
)
from planner.errors import PlanInputError
from planner.finetune.methods import FinetuneSpec
from planner.structure.params import total_params
from planner.search.pinned import Pinned
from planner.structure.presets import preset, preset_names
from planner.specs.training import TrainingSpec

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
                global_batch: Optional[int], precision: F.PrecisionChoice, calibration: Optional[Path] = None,
                **training_fields: object):  # type: ignore[no-untyped-def]
    """Model, cluster (calibrated when a calibration is given) and training spec of a command that
    runs a job on a named cluster."""
    if model is None or cluster is None:
        raise PlanInputError(f"orch {command} needs --model and --cluster", "pass e.g. --model debug --cluster cpu-2")
    _check_zero(zero)
    training = _build(TrainingSpec, "training flags", seq_len=seq_len, global_batch=global_batch or 0,
                      precision=precision.value, **training_fields)
    return load_model(model), with_calibration(resolve_cluster(cluster, None, None, None), calibration), training


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
    upcast_fp32: F.UpcastOpt = True,
    paged_optimizer: F.PagedOpt = False,
    adapter_dtype: F.AdapterDtypeOpt = "fp32",
    adapter_size: F.AdapterSizeOpt = 64,
    prefix_length: F.PrefixOpt = 30,
    num_virtual_tokens: F.VirtualTokensOpt = 20,
    ia3_targets: F.Ia3TargetsOpt = None,
    calibration: F.CalibrationOpt = None,
    trace: bool = typer.Option(False, "--trace", help="Cross-check: trace the best plan's whole pipeline stage at its own shape (slower; the default profile is measured too)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plans as JSON (the stable contract)."),
) -> None:
    """Find the fastest plan that fits a model on a cluster (a dry run: nothing is started)."""
    from orchestrator.planning import run_plan
    from orchestrator.recipe import run_recipe

    cluster_spec = with_calibration(resolve_cluster(cluster, gpu, gpus, gpus_per_node), calibration)
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
        quant=quant, double_quant=double_quant, quant_block_size=quant_block_size, upcast_fp32=upcast_fp32,
        paged_optimizer=paged_optimizer,
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
        # Nothing fits: the closest plans, each with "fits": false and its full memory.
        plans = result.top or result.search.near_misses[:top]
        print(json.dumps(report_json(model_spec, cluster_spec, plans, finetune=finetune, **extra)))
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
    from planner.memory.evaluate import buffers_for

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
    recompute: F.RecomputeOpt = None,
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
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue job NAME from its last checkpoint (same plan, same step count; other plan flags are ignored)."),
    detach: bool = typer.Option(False, "--detach", help="Submit through the Ray Jobs API and return (no --address: a local 'ray start --head' is started or reused)."),
    entrypoint: Optional[str] = typer.Option(None, "--entrypoint", help="Run package.module:function(plan, ds_config, ctx) in every worker instead of the built-in trainer."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Local .txt or .jsonl ('text' field) to train on, instead of synthetic tokens."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Local Hugging Face tokenizer directory for --dataset (default: the model directory's, else bytes)."),
    preflight: bool = typer.Option(False, "--preflight", help="Profile the plan on this machine first; while its measured peak exceeds the device, move to the next ranked plan."),
    calibration: F.CalibrationOpt = None,
    metrics_host: str = typer.Option("127.0.0.1", "--metrics-host", help="Address each node's Prometheus metrics endpoint binds to (0.0.0.0: reachable from other hosts)."),
    metrics_port: int = typer.Option(0, "--metrics-port", min=0, max=65535, help="Port of each node's metrics endpoint (default 0: ephemeral, announced to 'orch monitor')."),
) -> None:
    """Plan a model on a cluster and train it with DeepSpeed on Ray."""
    from orchestrator.launch_plan import LaunchOptions
    from orchestrator.launching import launch as run_launch, resume as run_resume

    if resume is not None:
        result = run_resume(resume, checkpoint_dir, address)
    else:
        model_spec, cluster_spec, training = _job_inputs("launch", model, cluster, zero, seq_len, global_batch, precision,
                                                         calibration=calibration)
        pinned = _build(Pinned, "plan flags", dp=dp, tp=tp, pp=pp, zero_stage=zero, micro_batch=micro_batch,
                        offload=offload.value if offload else None, recompute=recompute.value if recompute else None)
        opts = LaunchOptions(steps=steps, lr=lr, name=name, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                             max_failures=max_failures, address=address, log_jsonl=log_jsonl,
                             fail_at_step=fail_at_step, entrypoint=entrypoint, detach=detach,
                             dataset=dataset, tokenizer=tokenizer, model_source=model, preflight=preflight,
                             metrics_host=metrics_host, metrics_port=metrics_port)
        result = run_launch(model_spec, cluster_spec, training, pinned, opts)
    if as_json:
        print(json.dumps(result), flush=True)
    elif result["status"] == "submitted":
        console.print(f"{result['name']}: submitted to {result['dashboard']}")
    else:
        console.print(f"{result['name']}: {result['status']} after {result['steps']} steps, "
                      f"loss {result['initial_loss']} -> {result['final_loss']}, restarts {result['restarts']}")
    raise typer.Exit({"succeeded": 0, "submitted": 0, "failed": 1, "stopped": 130}[result["status"]])


StorageOpt = typer.Option(None, "--checkpoint-dir", help="Storage path the jobs were launched with (default ~/.orch/runs).")


@app.command()
def status(
    name: Optional[str] = typer.Argument(None, help="Job name (default: the newest job)."),
    checkpoint_dir: Optional[Path] = StorageOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the status as one JSON object."),
) -> None:
    """State, plan and progress of a launched job."""
    from orchestrator.control import find, status as job_status

    st = job_status(find(name, checkpoint_dir))
    if as_json:
        print(json.dumps(st))
        return
    table = Table(title=f"job {st['name']}", show_header=False)
    for key in ("state", "mode", "model", "cluster", "plan", "steps", "total_steps", "initial_loss", "final_loss",
                "tokens_per_s", "restarts", "run_dir", "address", "error"):
        value = st[key]
        table.add_row(key, f"{value:,.1f}" if key == "tokens_per_s" and value else str(value))
    console.print(table)


@app.command(name="list")
def list_(checkpoint_dir: Optional[Path] = StorageOpt,
          as_json: bool = typer.Option(False, "--json", help="Print one JSON object per job.")) -> None:
    """Every launched job under the storage path, oldest first."""
    from orchestrator.control import list_jobs

    rows = list_jobs(checkpoint_dir)
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = Table(title="orch jobs")
    for col in ("name", "state", "mode", "model", "plan", "steps", "loss", "restarts"):
        table.add_column(col)
    for r in rows:
        loss = f"{r['final_loss']:.4f}" if isinstance(r["final_loss"], float) else "-"
        table.add_row(r["name"], r["state"], r["mode"], r["model"], r["plan"], f"{r['steps']}/{r['total_steps']}",
                      loss, str(r["restarts"]))
    console.print(table)


@app.command()
def logs(name: str = typer.Argument(..., help="Job name."), checkpoint_dir: Optional[Path] = StorageOpt,
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends.")) -> None:
    """The job's driver log (a detached job's from the Ray Jobs API)."""
    from orchestrator.control import logs as job_logs

    for chunk in job_logs(name, checkpoint_dir, follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()


@app.command()
def stop(name: str = typer.Argument(..., help="Job name."), checkpoint_dir: Optional[Path] = StorageOpt) -> None:
    """Stop a job: every worker and actor it started ends; its checkpoints stay (resume with --resume)."""
    from orchestrator.control import stop as stop_job

    state = stop_job(name, checkpoint_dir)
    console.print(f"{name}: {state.value}")


@app.command()
def monitor(
    checkpoint_dir: Optional[List[Path]] = typer.Option(None, "--checkpoint-dir", "--storage", help="Storage path of the jobs to scrape, as given to 'orch launch' (repeatable; default ~/.orch/runs)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for prometheus.yml, the alert rules and Prometheus' data (default ~/.orch/monitoring)."),
    listen: str = typer.Option("127.0.0.1:9090", "--listen", help="HOST:PORT Prometheus serves its UI and API on."),
    scrape_interval: str = typer.Option("15s", "--scrape-interval", help="How often Prometheus scrapes the jobs and evaluates the alert rules."),
    no_start: bool = typer.Option(False, "--no-start", help="Only write the files; do not start Prometheus."),
) -> None:
    """Write a Prometheus config for launched jobs (targets, alert rules) and run Prometheus."""
    from orchestrator import monitoring
    from orchestrator.launch_plan import DEFAULT_STORAGE

    setup = monitoring.write_setup(out or monitoring.DEFAULT_OUT, checkpoint_dir or [DEFAULT_STORAGE], listen, scrape_interval)
    targets = monitoring.current_targets(setup)
    console.print(f"wrote {setup.config} and {setup.rules}; {len(targets)} job endpoint(s) now, "
                  f"more as jobs start ({', '.join(setup.target_files)})")
    console.print(f"Grafana dashboard: {monitoring.DASHBOARD_FILE}")
    if no_start:
        return
    binary = monitoring.find_prometheus()
    if binary is None:
        console.print("prometheus is not on PATH (Debian: apt-get install prometheus); start it with:\n  "
                      + " ".join(monitoring.prometheus_command(setup)))
        return
    console.print(f"Prometheus: {setup.url} (Ctrl-C stops it)")
    raise typer.Exit(monitoring.run_prometheus(setup, binary))


@app.command()
def profile(
    model: F.ModelOpt = None,
    cluster: F.ClusterOpt = None,
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
    calibration: F.CalibrationOpt = None,
    steps: int = typer.Option(2, "--steps", min=1, help="Optimizer steps measured."),
    as_json: bool = typer.Option(False, "--json", help="Print predicted against measured bytes as JSON."),
    save: Optional[Path] = typer.Option(None, "--save", help="Append the measurement to this file, for 'orch calibrate'."),
) -> None:
    """Run a plan's ranks for a few steps on this machine and set measured memory against the plan."""
    from orchestrator.profiling import cpu_hardware, print_profile, profile_plan, save_record
    from planner.memory.evaluate import buffers_for

    model_spec, cluster_spec, training = _job_inputs("profile", model, cluster, zero, seq_len, global_batch, precision,
                                                     calibration=calibration, optimizer=optimizer.value, attention=attention.value)
    pinned = _build(Pinned, "plan flags", dp=dp, tp=tp, pp=pp, zero_stage=zero, micro_batch=micro_batch,
                    offload=offload.value if offload else None, recompute=recompute.value if recompute else None)
    result = profile_plan(model_spec, cluster_spec, training, pinned, steps=steps)
    if save is not None:
        hardware = cpu_hardware() if result.device == "cpu" else {"device": result.device}
        count = save_record(save, result.record(model_spec, training, buffers_for(model_spec, result.plan.plan)), hardware)
        print(f"orch: measurement appended to {save} ({count} record(s))", file=sys.stderr)
    if as_json:
        print(json.dumps(result.as_json()))
    else:
        print_profile(console, result)


@app.command()
def calibrate(
    measured: list[Path] = typer.Argument(..., help="Measurement files (orch profile --save, bench/gpu_memory.py)."),
    out: Path = typer.Option(..., "--out", help="Write the fitted constants here (JSON, for --calibration)."),
    cluster: F.ClusterOpt = None,
    as_json: bool = typer.Option(False, "--json", help="Print the calibration as JSON."),
) -> None:
    """Fit the planner's overhead constants (context, NCCL, fragmentation) to measured peaks."""
    from planner.memory.calibration import fit
    from planner.memory.overheads import Overheads

    base = load_cluster(cluster).overheads if cluster else Overheads()
    cal = fit(load_measurements(measured), base, sources=[str(p) for p in measured])
    try:
        out.write_text(cal.model_dump_json(indent=1) + "\n")
    except OSError as exc:
        raise PlanInputError(f"--out {out}: cannot write ({exc.strerror})", "pass a writable path") from None
    if as_json:
        print(cal.model_dump_json())
        return
    table = Table(title=f"calibration: {cal.device}, {cal.records} record(s)")
    for col in ("constant", "before", "fitted"):
        table.add_column(col, justify="left" if col == "constant" else "right")
    for key in ("cuda_context_bytes", "nccl_bytes_per_group", "fragmentation_ratio"):
        fitted = getattr(cal, key)
        table.add_row(key, f"{getattr(base, key):,}", "not fitted" if fitted is None else f"{fitted:,}")
    console.print(table)
    console.print(f"mean peak error: {cal.peak_error_pct_before:.1f}% before, {cal.peak_error_pct_after:.1f}% after; written to {out}")


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
    from orchestrator.store import DiskStore
    from planner.cache import install_store

    install_store(DiskStore())
    try:
        code = app(args=argv, standalone_mode=False)
    except PlanInputError as exc:
        print(f"orch: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except ValidationError as exc:  # a spec built past the flag checks: its own validator names the problem
        print(f"orch: error: {pydantic_problem(exc, _command(argv) + ' flags')}", file=sys.stderr)
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
        command = _command(argv) if _command(argv) in {c.name or c.callback.__name__.rstrip("_") for c in app.registered_commands} else ""
        print(f"orch: error: {where}{message.rstrip('.')}. To fix: see 'orch {command + ' ' if command else ''}--help'",
              file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else 0)
