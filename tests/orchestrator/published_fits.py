"""Published configurations that really ran (tests/data/published_fits.json) as `orch plan`
command lines, pinned to what each source states. What a source leaves out stays unpinned, so the
search chooses it; where orch does not model a run's kernels or recipe, UNMODELLED says why and
the run is reported rather than asserted."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import DATA

RUNS: list[dict] = json.loads((DATA / "published_fits.json").read_text())["runs"]

# Frameworks whose kernels are Megatron-LM's (fused softmax, TP/PP/SP/CP layouts): --backend megatron.
MEGATRON_FRAMEWORKS = ("nemo", "megatron")

# Runs whose memory depends on kernels or recipes orch does not model (it models Hugging Face
# transformers + peft + bitsandbytes under DeepSpeed, and Megatron-LM's kernels).
UNMODELLED = {
    "torchtune-llama3.1-8b-full-1x4090": "torchtune's pure-bf16 full fine-tune with optimizer_in_bwd (no fp32 master, "
    "each gradient freed by its own step) and a paged 8-bit AdamW: not what DeepSpeed runs",
    "torchtune-llama3.1-8b-lora-1x4090": "torchtune's own Llama with chunked cross-entropy under torch.compile: "
    "transformers materialises fp32 logits and their gradient for the loss (2 x 2.1 GB at 2 x 2048 x 128256)",
    "nemo2407-llama3-8b-pretrain-h100x8-cp2": "Transformer Engine fp8: its linears save fp8 copies of their inputs, "
    "orch's Megatron formulas count 16-bit activations for fp8 training (an upper bound)",
}

# Recipe flags a source's own training script sets and the JSON does not carry as a field.
RECIPE_FLAGS = {
    # artidoro/qlora qlora.py get_accelerate_model: after prepare_model_for_kbit_training it casts the
    # LoRA layers to bf16 (with --bf16) and lm_head / embed_tokens back to bf16 ('norm' modules stay fp32).
    "qlora-guanaco-65b-1x48gb": ["--adapter-dtype", "bf16", "--no-upcast-fp32"],
    "qlora-guanaco-33b-1x24gb": ["--adapter-dtype", "bf16", "--no-upcast-fp32"],
}


def _optimizer(name: str) -> list[str]:
    paged = ["--paged-optimizer"] if name.startswith("paged-") else []
    if "8bit" in name:
        return ["--optimizer", "adamw-8bit", *paged]
    return ["--optimizer", "adamw" if name.removeprefix("paged-").startswith("adamw") else "adam", *paged]


def _lora(lora: dict | None) -> list[str]:
    if not lora:
        return []
    args = []
    if lora.get("rank") is not None:
        args += ["--lora-rank", str(lora["rank"])]
    if lora.get("alpha") is not None:
        args += ["--lora-alpha", str(lora["alpha"])]
    targets = lora.get("targets")
    if targets is not None:
        args += ["--lora-targets", targets if isinstance(targets, str) else ",".join(targets)]
    if lora.get("dropout") is not None:
        args += ["--lora-dropout", str(lora["dropout"])]
    return args


def _quant(quant: dict | None) -> list[str]:
    if not quant:
        return []
    return ["--quant", quant["type"], "--double-quant" if quant.get("double_quant") else "--no-double-quant"]


def _pinned(flag: str, value) -> list[str]:
    return [] if value is None else [flag, str(value)]


def plan_argv(run: dict, config_path: Path) -> list[str]:
    hw, par, tr = run["hardware"], run["parallelism"], run["training"]
    megatron = any(f in par["framework"].lower() for f in MEGATRON_FRAMEWORKS)
    argv = [
        "plan", "--model", str(config_path), "--json", "--top", "1",
        "--gpu", hw["gpu"], "--gpus", str(hw["num_gpus"]), "--gpus-per-node", str(min(hw["gpus_per_node"], hw["num_gpus"])),
        "--seq-len", str(tr["seq_len"]), "--precision", tr["precision"], "--method", tr["method"],
        "--attention", tr.get("attention") or "flash", "--backend", "megatron" if megatron else "deepspeed",
        *_optimizer(tr["optimizer"]), *_lora(tr.get("lora")), *_quant(tr.get("quant")),
        "--dp", str(par["dp"]), "--tp", str(par["tp"]), "--pp", str(par["pp"]),
        *_pinned("--zero", par.get("zero_stage")), *_pinned("--recompute", par.get("recompute")),
        *_pinned("--offload", par.get("offload")), *_pinned("--micro-batch", tr.get("micro_batch")),
        *_pinned("--global-batch", tr.get("global_batch")),
    ]
    argv += RECIPE_FLAGS.get(run["id"], [])
    if par.get("cp"):
        argv += ["--cp", str(par["cp"])]
    if par.get("virtual_pipeline"):
        argv += ["--interleave", str(par["virtual_pipeline"])]
    if par.get("sequence_parallel") is not None and megatron:
        argv.append("--sp" if par["sequence_parallel"] else "--no-sp")
    return argv


def hf_config(run: dict) -> dict:
    """The run's config as transformers builds it. llm-foundry's MPT benchmark models (learned
    positions, biases, no ALiBi, GELU MLP of 4 d, tied head) are GPT-2 blocks exactly, and
    transformers' MptForCausalLM cannot build them (it is always ALiBi and bias-free) nor run flash
    or SDPA attention, which llm-foundry's triton kernel does: so they are planned as the GPT-2
    config with the same shapes (test_published_fits checks its parameter count against the
    benchmark table's NumParams column)."""
    cfg = run["model"]["config"]
    if cfg.get("model_type") != "mpt":
        return cfg
    assert cfg["learned_pos_emb"] and not cfg["no_bias"] and not cfg["attn_config"]["alibi"], run["id"]
    return {
        "model_type": "gpt2", "n_layer": cfg["n_layers"], "n_embd": cfg["d_model"], "n_head": cfg["n_heads"],
        "n_inner": cfg["expansion_ratio"] * cfg["d_model"], "n_positions": cfg["max_seq_len"],
        "vocab_size": cfg["vocab_size"], "activation_function": "gelu", "resid_pdrop": cfg["resid_pdrop"],
        "embd_pdrop": cfg["emb_pdrop"], "attn_pdrop": cfg["attn_config"]["attn_pdrop"], "tie_word_embeddings": True,
    }


def published_params(run: dict) -> int | None:
    """The NumParams column of llm-foundry's benchmark table (the last cell of the quoted row)."""
    if run["model"]["config"].get("model_type") != "mpt":
        return None
    return int(run["source"]["quote"].strip(" |").split("|")[-1])


def write_config(run: dict, folder: Path) -> Path:
    path = folder / f"{run['id']}.json"
    path.write_text(json.dumps(hf_config(run)))
    return path
