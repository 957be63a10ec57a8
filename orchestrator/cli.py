"""The `orch` command line: parse, call the planner, render. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec
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


def _cluster(job: F.JobFlags):  # type: ignore[no-untyped-def]
    """--cluster, or the inline --gpu/--gpus/--gpus-per-node cluster; calibrated with --calibration."""
    return with_calibration(resolve_cluster(job.cluster, job.gpu, job.gpus, job.gpus_per_node), job.calibration)


def _training(job: F.JobFlags) -> TrainingSpec:
    return _build(TrainingSpec, "training flags", seq_len=job.seq_len, global_batch=job.global_batch or 0,
                  precision=job.precision.value, optimizer=job.optimizer.value, attention=job.attention.value)


def _pinned(job: F.JobFlags) -> Pinned:
    _check_zero(job.zero)
    return _build(
        Pinned, "plan flags",
        dp=job.dp, tp=job.tp, pp=job.pp, cp=job.cp, ep=job.ep, sp=job.sp, interleave=job.interleave, zero_stage=job.zero,
        offload=job.offload.value if job.offload else None, micro_batch=job.micro_batch,
        recompute=job.recompute.value if job.recompute else None,
    )


def _ft_fields(job: F.JobFlags) -> dict[str, object]:
    return dict(
        lora_rank=job.lora_rank, lora_alpha=job.lora_alpha, lora_targets=job.lora_targets or (), lora_dropout=job.lora_dropout,
        quant=job.quant, double_quant=job.double_quant, quant_block_size=job.quant_block_size, upcast_fp32=job.upcast_fp32,
        paged_optimizer=job.paged_optimizer, adapter_dtype=job.adapter_dtype, adapter_size=job.adapter_size,
        prefix_length=job.prefix_length, num_virtual_tokens=job.num_virtual_tokens, ia3_targets=job.ia3_targets or (),
    )


def _finetune(job: F.JobFlags) -> FinetuneSpec:
    return _build(FinetuneSpec, "fine-tuning flags", method=job.method.value, **_ft_fields(job))


def _runs_what_it_plans(job: F.JobFlags, command: str) -> None:
    """Refuse, in one line, the flag values a command that runs the job cannot honour (plan takes all)."""
    if job.backend is F.BackendChoice.megatron:
        raise PlanInputError(f"--backend megatron: orch {command} runs transformers models under DeepSpeed",
                             "drop --backend (megatron plans are for comparison with 'orch plan')")
    if job.method is F.MethodChoice.all:
        raise PlanInputError(f"--method all compares methods in 'orch plan'; orch {command} runs one",
                             "pass one method, e.g. --method lora")
    if job.method is F.MethodChoice.mezo:
        raise PlanInputError(f"--method mezo: orch {command} trains with DeepSpeed's gradient step, and MeZO's "
                             "zeroth-order step is planned only", "use --method lora (or plan MeZO with 'orch plan')")


def _require_libraries(job: F.JobFlags) -> None:
    """The fine-tuning libraries a method runs with are installed (checked before any worker starts)."""
    from launch.models import PEFT_METHODS

    need = ("peft",) if job.method.value in PEFT_METHODS else ()
    if job.method is F.MethodChoice.qlora:
        need = (*need, "bitsandbytes")
    if job.optimizer is F.OptimizerChoice.adamw_8bit or job.paged_optimizer:
        need = (*need, "bitsandbytes")
    for lib in need:
        if find_spec(lib) is None:
            raise PlanInputError(f"--method {job.method.value}: {lib} is not installed",
                                 f"pip install {lib} (it is one of orch's dependencies: reinstall orch)")


def _job_inputs(job: F.JobFlags, command: str):  # type: ignore[no-untyped-def]
    """Model, cluster, training, pinned plan and fine-tuning method of a command that runs the job."""
    _runs_what_it_plans(job, command)
    _require_libraries(job)
    if job.model is None:
        raise PlanInputError(f"orch {command} needs --model", "pass e.g. --model debug --cluster cpu-2")
    training, pinned, finetune = _training(job), _pinned(job), _finetune(job)
    return load_model(job.model), _cluster(job), training, pinned, finetune


@app.command()
@F.job_flags
def plan(
    job: F.JobFlags,
    top: int = typer.Option(5, "--top", min=1, help="Show the K best plans."),
    explain: bool = typer.Option(False, "--explain", help="Say why the winner beats the runner-up."),
    tokens: Optional[float] = typer.Option(None, "--tokens", help="Training tokens: adds time, GPU-hours, cost and energy."),
    budget_gpu_hours: Optional[float] = typer.Option(None, "--budget-gpu-hours", help="Compute-optimal recipe for this many GPU-hours."),
    budget_flops: Optional[float] = typer.Option(None, "--budget-flops", help="Compute-optimal recipe for this many training FLOPs."),
    deepspeed_config: Optional[Path] = typer.Option(None, "--deepspeed-config", help="Write the best plan's DeepSpeed config here."),
    trace: bool = typer.Option(False, "--trace", help="Cross-check: trace the best plan's whole pipeline stage at its own shape (slower; the default profile is measured too)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plans as JSON (the stable contract)."),
) -> None:
    """Find the fastest plan that fits a model on a cluster (a dry run: nothing is started)."""
    from orchestrator.planning import run_plan
    from orchestrator.recipe import run_recipe

    cluster_spec = _cluster(job)
    training = _training(job)
    pinned = _pinned(job)
    backend = job.backend
    if budget_gpu_hours is not None or budget_flops is not None:
        code = run_recipe(console, cluster_spec, training, pinned, budget_gpu_hours, budget_flops, backend.value, as_json)
        raise typer.Exit(code)
    if job.model is None:
        raise PlanInputError("no --model given", "pass --model PRESET|CONFIG.json, or --budget-gpu-hours/--budget-flops")
    model_spec = load_model(job.model)
    if job.method == F.MethodChoice.all:
        from orchestrator.compare import compare_methods

        raise typer.Exit(compare_methods(console, model_spec, cluster_spec, training, pinned, _ft_fields(job), backend.value, as_json))
    finetune = _finetune(job)
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
@F.job_flags
def launch(
    job: F.JobFlags,
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
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Local .txt, or .jsonl of {'text'}, {'prompt','completion'} or chat {'messages'} records (default: synthetic tokens)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Local Hugging Face tokenizer directory for --dataset (default: the model directory's, else bytes)."),
    pack: bool = typer.Option(False, "--pack/--pad", help="Prompt/completion and chat records: pack several into each --seq-len sequence, or pad each to it (default)."),
    preflight: bool = typer.Option(False, "--preflight", help="Profile the plan on this machine first; while its measured peak exceeds the device, move to the next ranked plan."),
    metrics_host: str = typer.Option("127.0.0.1", "--metrics-host", help="Address each node's Prometheus metrics endpoint binds to (0.0.0.0: reachable from other hosts)."),
    metrics_port: int = typer.Option(0, "--metrics-port", min=0, max=65535, help="Port of each node's metrics endpoint (default 0: ephemeral, announced to 'orch monitor')."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's, DeepSpeed's and the workers' own output live (default: only in the run's log file)."),
) -> None:
    """Plan a model on a cluster and train it with DeepSpeed on Ray: pre-training, full or
    parameter-efficient fine-tuning (--method), from random or saved weights (--model DIR)."""
    from orchestrator.launch_plan import LaunchOptions
    from orchestrator.launching import launch as run_launch, resume as run_resume

    if resume is not None:
        result = run_resume(resume, checkpoint_dir, address, verbose=verbose)
    else:
        model_spec, cluster_spec, training, pinned, finetune = _job_inputs(job, "launch")
        opts = LaunchOptions(steps=steps, lr=lr, name=name, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                             max_failures=max_failures, address=address, log_jsonl=log_jsonl,
                             fail_at_step=fail_at_step, entrypoint=entrypoint, detach=detach,
                             dataset=dataset, tokenizer=tokenizer, pack=pack, model_source=job.model, preflight=preflight,
                             metrics_host=metrics_host, metrics_port=metrics_port, verbose=verbose)
        result = run_launch(model_spec, cluster_spec, training, pinned, opts, finetune)
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
def export(
    name: str = typer.Argument(..., help="Job name."),
    out: Path = typer.Option(..., "--out", help="New directory to write into."),
    merge: bool = typer.Option(False, "--merge", help="Write the base with the trained weights merged in (AutoModelForCausalLM loads it), not the adapter."),
    checkpoint_dir: Optional[Path] = StorageOpt,
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Write a fine-tuning job's trained adapter (PeftModel.from_pretrained loads it), or with
    --merge the merged model, from its newest checkpoint."""
    from orchestrator.export import export as run_export

    result = run_export(name, checkpoint_dir, out, merge)
    if as_json:
        print(json.dumps(result))
    else:
        what = "merged model" if merge else f"{result['method']} adapter"
        console.print(f"{name}: {what} of step {result['step']} written to {out}")


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
@F.job_flags
def profile(
    job: F.JobFlags,
    steps: int = typer.Option(2, "--steps", min=1, help="Optimizer steps measured."),
    as_json: bool = typer.Option(False, "--json", help="Print predicted against measured bytes as JSON."),
    save: Optional[Path] = typer.Option(None, "--save", help="Append the measurement to this file, for 'orch calibrate'."),
) -> None:
    """Run a plan's ranks for a few steps on this machine and set measured memory against the plan."""
    from orchestrator.profiling import cpu_hardware, print_profile, profile_plan, save_record
    from planner.memory.evaluate import buffers_for

    model_spec, cluster_spec, training, pinned, finetune = _job_inputs(job, "profile")
    result = profile_plan(model_spec, cluster_spec, training, pinned, steps=steps, finetune=finetune,
                          model_source=job.model)
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
