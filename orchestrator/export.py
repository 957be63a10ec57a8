"""Carry out `orch export NAME --out DIR [--merge]`: what a fine-tuning job trained, from its
newest checkpoint, in the form a user loads: peft's adapter directory (``PeftModel.from_pretrained``)
or, with ``--merge``, the base with the trained weights folded in (``AutoModelForCausalLM.from_pretrained``).
The tokenizer of the job's --model directory goes with it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from launch.data import TOKENIZER_ARTIFACTS
from launch.models import ADAPTER_DIR, PEFT_METHODS
from orchestrator import jobs
from orchestrator.launch_plan import DEFAULT_STORAGE
from planner.errors import PlanInputError

MERGEABLE = ("lora", "qlora", "ia3", "bitfit")  # peft merges LoRA and (IA)^3; BitFit's biases load into the base


def newest_checkpoint(run_dir: Path) -> tuple[Path, int]:
    """(directory, step) of the run's newest checkpoint (Ray Train's ``checkpoint_*`` directories;
    DeepSpeed's tag ``stepN`` inside), or a PlanInputError when there is none."""
    found = []
    for ckpt in (p for p in run_dir.glob("checkpoint_*") if p.is_dir()):
        tags = [p.name for p in ckpt.iterdir() if p.is_dir() and p.name.startswith("step") and p.name[4:].isdigit()]
        if tags:
            found.append((max(int(t[4:]) for t in tags), ckpt))
    if not found:
        raise PlanInputError(f"job '{run_dir.name}' has no checkpoint in {run_dir}",
                             "launch it with --checkpoint-every N (a checkpoint is also written at the last step)")
    step, ckpt = max(found)
    return ckpt, step


def export(name: str, storage: Path | None, out: Path, merge: bool) -> dict[str, Any]:
    """Write job ``name``'s trained weights to ``out``; what was written."""
    record = jobs.load(name, (storage or DEFAULT_STORAGE).expanduser().resolve())
    ft = record.job.finetune or {"method": "full"}
    method = ft["method"]
    if method == "full":
        raise PlanInputError(f"job '{name}' trained every parameter (--method full); its checkpoints are DeepSpeed's",
                             "export fine-tuning jobs; for a full one use DeepSpeed's zero_to_fp32.py on a checkpoint")
    if method == "adapter":
        raise PlanInputError(f"job '{name}' trained Houlsby bottleneck adapters, which neither peft nor transformers loads",
                             "its checkpoints hold them (trainable.safetensors); fine-tune with --method lora to export")
    if merge and method not in MERGEABLE:
        raise PlanInputError(f"--merge: {method} trains virtual tokens, which do not fold into the base's weights",
                             "export without --merge (PeftModel.from_pretrained loads the adapter)")
    if not merge and method not in PEFT_METHODS:
        raise PlanInputError(f"job '{name}' trained with --method {method}, which has no peft adapter format",
                             "export it with --merge (the base with its trained biases)")
    if merge and record.job.pretrained_dir is None:
        raise PlanInputError(f"--merge: job '{name}' started from random weights (--model was not a saved model directory)",
                             "export the adapter without --merge, or fine-tune a saved model (--model DIR)")
    if out.exists() and any(out.iterdir()):
        raise PlanInputError(f"--out {out} exists and is not empty", "pass a new or empty directory")
    ckpt, step = newest_checkpoint(record.run_dir)
    from launch import models

    out.mkdir(parents=True, exist_ok=True)
    if merge:
        models.export_merged(record.job.hf_config, record.job.pretrained_dir, ckpt, method, ft["dtype"], out)
    else:
        models.export_adapter(ckpt / ADAPTER_DIR, out)
    if record.job.pretrained_dir is not None:
        for f in TOKENIZER_ARTIFACTS:
            if (Path(record.job.pretrained_dir) / f).exists():
                shutil.copy2(Path(record.job.pretrained_dir) / f, out / f)
    return {"name": name, "method": method, "step": step, "checkpoint": str(ckpt), "out": str(out), "merged": merge}
