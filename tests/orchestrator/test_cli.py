"""The CLI contract: JSON shape, exit codes, one-line errors with exit 2 and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def orch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, capture_output=True, text=True)


def test_plan_json_contract():
    out = orch("plan", "--model", "llama3.1-70b", "--gpu", "h100-80gb", "--gpus", "8", "--zero", "3", "--json")
    assert out.returncode in (0, 1), out.stderr
    report = json.loads(out.stdout)
    assert report["model"]["name"] == "llama3.1-70b" and report["model"]["num_params"] == 70_553_706_496
    assert report["cluster"] == {"name": "8xh100-80gb", "num_gpus": 8, "gpu_memory_bytes": 85_520_809_984}
    plan = report["plans"][0]
    for key in ("dp", "tp", "pp", "zero_stage", "micro_batch", "grad_accum", "recompute", "offload", "memory", "fits"):
        assert key in plan
    mem = plan["memory"]
    parts = ("parameters", "gradients", "optimizer", "activations", "overhead")
    # The peak is the largest of what is alive together in one phase of the step (planner/memory/phases.py:
    # the components, less what is already freed, plus transients such as the loss's fp32 gradient).
    assert mem["total"] == mem["peak_allocated"] + mem["overhead"]
    assert mem["peak_allocated"] >= mem["parameters"] + mem["optimizer"]
    assert all(isinstance(mem[k], int) and mem[k] >= 0 for k in parts)
    assert plan["fits"] == (mem["total"] <= 85_520_809_984)
    assert out.returncode == (0 if plan["fits"] else 1)


def test_nothing_fits_exits_1_and_says_what_would():
    out = orch("plan", "--model", "llama3.1-405b", "--gpu", "a100-80gb", "--gpus", "8", "--zero", "0")
    assert out.returncode == 1
    assert "DOES NOT FIT" in out.stdout and "would fit" in out.stdout


def _hint_flags(hint: str) -> tuple[list[str], int | None]:
    """The flags a would_fit hint names, and its GPU count if it names one."""
    head = hint.split(":")[0].split(" (instead of")[0]
    words = head.split()
    gpus = int(words[0]) if words[0].isdigit() else None
    flags = words[words.index("with") + 1:] if "with" in words else [w for w in words if w != "on"]
    return [w for w in flags if w not in ("this", "cluster")], gpus


def _replace(args: list[str], flags: list[str]) -> list[str]:
    """``args`` with every flag of ``flags`` set to its value there (added when absent)."""
    out = list(args)
    i = 0
    while i < len(flags):
        name, value = flags[i], flags[i + 1]
        if name in out:
            out[out.index(name) + 1] = value
        else:
            out += [name, value]
        i += 2
    return out


@pytest.mark.parametrize("args", [
    ["--model", "llama3.1-405b", "--gpu", "a100-80gb", "--gpus", "8", "--zero", "0"],
    ["--model", "llama3.1-70b", "--gpu", "a100-80gb", "--gpus", "8", "--seq-len", "8192", "--recompute", "none",
     "--micro-batch", "2"],
])
def test_nothing_fits_json_keeps_the_closest_plans_and_every_hint_fits(args):
    out = orch("plan", *args, "--json")
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    plans = report["plans"]
    assert plans and all(not p["fits"] for p in plans)
    assert all(p["memory"]["total"] > report["cluster"]["gpu_memory_bytes"] for p in plans)
    assert [p["memory"]["total"] for p in plans] == sorted(p["memory"]["total"] for p in plans)
    assert report["would_fit"]
    for hint in report["would_fit"]:
        flags, gpus = _hint_flags(hint)
        rerun = _replace(args, flags + (["--gpus", str(gpus)] if gpus else []))
        again = orch("plan", *rerun, "--json")
        assert again.returncode == 0, (hint, rerun, again.stderr[-500:])


def test_a_blocked_plan_names_the_flag_that_blocks_it():
    out = orch("plan", "--model", "llama3.1-70b", "--gpu", "h100-80gb", "--gpus", "16", "--recompute", "full",
               "--tp", "8", "--pp", "2", "--json")
    assert out.returncode == 1
    hints = json.loads(out.stdout)["would_fit"]
    assert hints and "--backend megatron" in hints[0] and not any("on this cluster" in h for h in hints)
    megatron = orch("plan", "--model", "llama3.1-70b", "--gpu", "h100-80gb", "--gpus", "16", "--recompute", "full",
                    "--tp", "8", "--pp", "2", "--backend", "megatron", "--json")
    assert megatron.returncode == 0, megatron.stderr


def test_plan_fits_exits_0():
    out = orch("plan", "--model", "debug", "--cluster", "cpu-2", "--seq-len", "128")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FITS" in out.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "nosuchmodel", "--gpu", "h100-80gb"], "neither a preset nor an existing file"),
        (["--model", "/no/such/config.json", "--gpu", "h100-80gb"], "neither a preset nor an existing file"),
        (["--model", "llama2-7b", "--gpu", "b900"], "unknown GPU 'b900'"),
        (["--model", "llama2-7b", "--cluster", "nosuch"], "--cluster 'nosuch'"),
        (["--model", "llama2-7b", "--gpu", "h100-80gb", "--gpus", "3", "--gpus-per-node", "3", "--tp", "3"], "tp=3 does not divide num_heads"),
        (["--model", "llama2-7b", "--gpu", "h100-80gb", "--gpus", "8", "--dp", "3"], "dp*tp*pp*cp"),
        (["--model", "llama2-7b", "--gpu", "h100-80gb", "--micro-batch", "0"], "micro_batch"),
        (["--model", "llama2-7b", "--gpu", "h100-80gb", "--seq-len", "abc"], "seq-len"),
        (["--model", "llama2-7b", "--gpu", "h100-80gb", "--seq-len", "-5"], "seq_len"),
        (["--model", "llama2-7b", "--gpu", "h100-80gb", "--zero", "4"], "--zero 4"),
        (["--model", "llama2-7b", "--gpu", "h100-80gb", "--gpus", "0"], "--gpus=0"),
        (["--model", "llama2-7b", "--gpu", "v100-32gb", "--precision", "bf16"], "does not support bf16"),
        (["--model", "llama2-7b", "--gpu", "h100-80gb", "--gpus", "8", "--pp", "2", "--zero", "3"], "pipeline"),
        (["--model", "llama2-7b", "--gpu", "h100-80gb", "--paged-optimizer"], "--paged-optimizer"),
        (["--model", "debug", "--gpu", "h100-80gb", "--tp", "2", "--zero", "2", "--offload", "optimizer+params"],
         "needs ZeRO stage 3"),
    ],
)
def test_bad_input_one_line_exit_2(args, needle):
    out = orch("plan", *args)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0] and "Traceback" not in out.stderr
    assert "To fix" in lines[0]


def test_bad_files(tmp_path):
    bad_json = tmp_path / "config.json"
    bad_json.write_text("{not json")
    out = orch("plan", "--model", str(bad_json), "--gpu", "h100-80gb")
    assert out.returncode == 2 and "not valid JSON" in out.stderr

    heads = tmp_path / "heads" / "config.json"
    heads.parent.mkdir()
    heads.write_text(json.dumps({"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3,
                                 "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 10}))
    out = orch("plan", "--model", str(heads), "--gpu", "h100-80gb")
    assert out.returncode == 2 and "not a multiple of the number of attention heads" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    bad_yaml = tmp_path / "c.yaml"
    bad_yaml.write_text("gpu: [unclosed")
    out = orch("plan", "--model", "debug", "--cluster", str(bad_yaml))
    assert out.returncode == 2 and "not valid YAML" in out.stderr

    neg = tmp_path / "neg.yaml"
    neg.write_text("gpu: h100-80gb\nnum_nodes: -1\ngpus_per_node: 8\nintra_node_GB_per_s: 1\n"
                   "inter_node_GB_per_s: 1\nintra_node_latency_us: 1\ninter_node_latency_us: 1\nhost_memory_bytes: 1\n")
    out = orch("plan", "--model", "debug", "--cluster", str(neg))
    assert out.returncode == 2 and "num_nodes" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_user_config_json(tmp_path):
    cfg = {"model_type": "mistral", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4,
           "num_hidden_layers": 4, "intermediate_size": 2816, "vocab_size": 32000}
    path = tmp_path / "my-model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    out = orch("plan", "--model", str(path.parent), "--gpu", "a100-40gb", "--gpus", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model"]["name"] == "my-model"


def test_listings():
    out = orch("models")
    assert out.returncode == 0 and "llama3.1-405b" in out.stdout and "405.853B" in out.stdout
    out = orch("clusters")
    assert out.returncode == 0 and "h100-8x8-ib" in out.stdout and "cpu-2" in out.stdout


def test_method_all_compares_every_method():
    out = orch("plan", "--model", "llama3.1-70b", "--gpu", "a100-80gb", "--gpus", "4", "--method", "all", "--json")
    assert out.returncode == 0, out.stderr
    methods = json.loads(out.stdout)["methods"]
    assert set(methods) == {"full", "lora", "qlora", "adapter", "prefix", "prompt", "ia3", "bitfit", "mezo"}
    assert not methods["full"]["fits"] and methods["qlora"]["fits"] and methods["lora"]["fits"]
    assert "no bias terms" in methods["bitfit"]["not_applicable"]
    plan = methods["lora"]["plans"][0]
    assert plan["method"] == "lora" and plan["trainable_params"] == methods["lora"]["trainable_params"] == 16_384_000


def test_method_flags_and_errors():
    out = orch("plan", "--model", "llama3.1-8b", "--gpu", "a100-80gb", "--method", "lora", "--lora-targets", "nope_proj")
    assert out.returncode == 2 and "nope_proj" in out.stderr and "To fix" in out.stderr
    out = orch("plan", "--model", "llama3.1-8b", "--gpu", "a100-80gb", "--method", "lora", "--lora-rank", "0")
    assert out.returncode == 2 and "lora_rank" in out.stderr
    out = orch("plan", "--model", "llama-65b", "--gpu", "a6000-48gb", "--method", "qlora", "--lora-rank", "64",
               "--lora-targets", "all-linear", "--paged-optimizer", "--adapter-dtype", "bf16", "--recompute", "full",
               "--micro-batch", "4", "--seq-len", "528", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["plans"][0]["fits"]


def test_any_transformers_architecture(tmp_path):
    """Any family transformers builds (OPT here) plans from its own modules: transformers' exact
    parameter count, and --trace (the full unsplit trace) agrees with the default activations."""
    cfg = {"model_type": "opt", "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "ffn_dim": 1024,
           "vocab_size": 1000, "max_position_embeddings": 512, "word_embed_proj_dim": 256}
    path = tmp_path / "opt" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    out = orch("plan", "--model", str(path), "--gpu", "a100-80gb", "--gpus", "1", "--seq-len", "256", "--tp", "1",
               "--recompute", "none", "--trace", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    from planner.trace import count_parameters

    assert report["model"]["num_params"] == count_parameters(cfg)
    assert report["model"]["model_class"] == "OPTForCausalLM"
    assert "exact FakeTensor trace" in " ".join(report["notes"])
    default = orch("plan", "--model", str(path), "--gpu", "a100-80gb", "--gpus", "1", "--seq-len", "256", "--tp", "1",
                   "--recompute", "none", "--json")
    traced = report["plans"][0]["memory"]["activations"]
    assert json.loads(default.stdout)["plans"][0]["memory"]["activations"] == traced
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"model_type": "nosucharch", "hidden_size": 8, "num_attention_heads": 2,
                                 "num_hidden_layers": 1, "vocab_size": 10}))
    out = orch("plan", "--model", str(bogus), "--gpu", "a100-80gb")
    assert out.returncode == 2 and "transformers cannot build" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_top_explain_tokens_and_rejections():
    out = orch("plan", "--model", "llama3.1-70b", "--gpu", "h100-80gb", "--gpus", "64", "--global-batch", "512",
               "--seq-len", "4096", "--top", "3", "--explain", "--tokens", "1e12")
    assert out.returncode == 0, out.stderr
    for needle in ("top 3 plans", "not chosen:", "does not fit", "why '", "step time", "GPU-hours", "MWh", "MFU"):
        assert needle in out.stdout, needle
    out = orch("plan", "--model", "llama3.1-70b", "--gpu", "h100-80gb", "--gpus", "64", "--global-batch", "512",
               "--top", "3", "--tokens", "1e12", "--json")
    report = json.loads(out.stdout)
    assert len(report["plans"]) == 3 and report["rejected"]
    best = report["plans"][0]
    assert best["tokens_per_s"] >= report["plans"][1]["tokens_per_s"]
    assert 0 < best["mfu"] < 1 and best["tflops_per_gpu"] > 0
    assert report["cost"]["seconds"] == pytest.approx(1e12 / best["tokens_per_s"])


def test_budget_recipe():
    out = orch("plan", "--budget-flops", "5.76e23", "--gpu", "a100-80gb", "--gpus", "1024", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["compute_optimal"]["params"] == pytest.approx(70e9, rel=0.10)
    assert report["plans"] and report["cost"]["gpu_hours"] > 0
    out = orch("plan", "--budget-gpu-hours", "-1", "--gpu", "a100-80gb", "--gpus", "8")
    assert out.returncode == 2 and "positive" in out.stderr


def test_qlora_fp32_upcast_is_the_default_and_can_be_turned_off():
    args = ("plan", "--model", "llama3.1-8b", "--gpu", "a100-80gb", "--gpus", "1", "--method", "qlora",
            "--micro-batch", "1", "--recompute", "full", "--json")
    upcast, kept16 = (json.loads(orch(*args, *extra).stdout)["plans"][0]["memory"] for extra in ((), ("--no-upcast-fp32",)))
    # prepare_model_for_kbit_training's fp32 copies of embeddings, lm_head and norms: 2 x 525M x 2 bytes more.
    assert upcast["parameters"] - kept16["parameters"] > 2e9
    assert upcast["activations"] >= kept16["activations"]


def test_a_model_class_without_flash_attention_is_named(tmp_path):
    """transformers' MPT runs eager attention only: the plan says so rather than claim flash."""
    cfg = {"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 320, "max_seq_len": 512,
           "attn_config": {"attn_pdrop": 0}, "resid_pdrop": 0, "emb_pdrop": 0}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = orch("plan", "--model", str(path), "--gpu", "a100-80gb", "--gpus", "1", "--seq-len", "256", "--json")
    assert out.returncode == 0, out.stderr
    notes = " ".join(json.loads(out.stdout)["notes"])
    assert "MptForCausalLM (CUDA eager attention)" in notes and "has no flash or SDPA attention" in notes
    llama = orch("plan", "--model", "debug", "--gpu", "a100-80gb", "--gpus", "1", "--json")
    assert "flash attention" in " ".join(json.loads(llama.stdout)["notes"])
