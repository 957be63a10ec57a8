"""Tests for planner.trace (fake-tensor activation tracing).

Run: PYTHONPATH=/work/main /work/main/.venv/bin/python -m pytest tests/planner/test_trace.py -q
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from planner import trace as T  # noqa: E402
from tests.planner.realrun import saved_bytes_of_forward  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# Small configs: every dimension distinct where possible so a wrong term cannot cancel out.
LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=160,
    vocab_size=1000,
    num_hidden_layers=2,
)
GPT2 = dict(model_type="gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=32)
MIXTRAL = dict(LLAMA, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
ELT = {"bf16": 2, "fp16": 2, "fp32": 4}

FAMILIES = {
    "llama": LLAMA,
    "mistral": dict(LLAMA, model_type="mistral"),
    "mixtral": MIXTRAL,
    "qwen2": dict(LLAMA, model_type="qwen2"),
    "gpt2": GPT2,
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, num_attention_heads=4, intermediate_size=256,
                     vocab_size=1000, num_hidden_layers=2),
    "opt": dict(model_type="opt", hidden_size=64, num_attention_heads=4, ffn_dim=256, vocab_size=1000,
                num_hidden_layers=2, word_embed_proj_dim=64),
    "phi3": dict(LLAMA, model_type="phi3", pad_token_id=0),
    "gemma": dict(LLAMA, model_type="gemma", head_dim=16),
    "qwen2_moe": dict(LLAMA, model_type="qwen2_moe", moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=4, num_experts_per_tok=2),
}


# --------------------------------------------------------------------------- closed forms (see report)


def llama_bytes(c: dict, s: int, b: int, attention: str, dtype: str) -> tuple[int, int]:
    """(model-level bytes, bytes per layer) for llama-like decoders (qkv bias changes nothing)."""
    e = ELT[dtype]
    h, a, f, V = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"], c["vocab_size"]
    k = c.get("num_key_value_heads", a)
    d = h // a
    t = b * s
    norms = 2 * (4 * h + 4 + e * h)  # 2 RMSNorms: fp32 x, fp32 rsqrt [b,s,1], normalized x in dtype
    if "num_local_experts" in c:  # grouped_mm experts: S = t*topk rows whatever the routing
        E, K = c["num_local_experts"], c["num_experts_per_tok"]
        mlp = t * (e * h + 4 * E + 12 * K + 4) + t * K * (2 * e * h + 4 * e * f + 28) + 4 * E
    else:  # SwiGLU: mlp input, gate out, silu out, up out, down input
        mlp = t * (e * h + 4 * e * f)
    if attention == "flash":  # qkv input, q, k, v (kv heads), o (= o_proj input), lse fp32
        s_lse = s if e == 2 else -(-s // 32) * 32
        att = t * (e * h + 2 * e * a * d + 2 * e * k * d) + 4 * b * a * s_lse
    else:  # qkv input, q, repeated k and v, o_proj input; softmax fp32 (+ probs in dtype)
        att = t * (e * h + 4 * e * a * d) + (6 if e == 2 else 4) * b * a * s * s
    per_layer = t * norms + att + mlp
    # input_ids, cos+sin, final norm, lm_head input, log_softmax fp32, nll target, total_weight
    model = t * (4 * V + (4 + 2 * e) * h + 20) + 2 * e * s * d + 4 + (8 if b == 1 else 0)
    return model, per_layer


def gpt2_bytes(c: dict, s: int, b: int, attention: str, dtype: str) -> tuple[int, int]:
    """GPT-2 with its default dropouts (0.1) and gelu_new, CUDA semantics."""
    e = ELT[dtype]
    h, a, V = c["n_embd"], c["n_head"], c["vocab_size"]
    f = 4 * h
    t = b * s
    per_layer = t * (8 * e * h + 2 * h + 5 * e * f + 16)
    if attention == "flash":
        per_layer += 4 * b * a * (s if e == 2 else -(-s // 32) * 32)
    else:
        per_layer += (2 * e + 1) * b * a * s * s
    model = t * (24 + h + 2 * e * h + 4 * V) + 8 * s + 4 + (8 if b == 1 else 0)
    return model, per_layer


# --------------------------------------------------------------------------- real CPU reference


def real_cpu_saved_bytes(hf_config: dict, *, seq_len: int, micro_batch: int, attention: str, dtype: str) -> int:
    """Bytes a real CPU training forward keeps for backward: unique storages keyed by data_ptr(),
    parameters excluded, counted while only the loss is alive."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tdtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype])
    old = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)
    try:
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(**hf_config)
        cfg.use_cache = False
        impl = "sdpa" if attention == "flash" else "eager"
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=tdtype)
        model.train()
        return saved_bytes_of_forward(model, vocab_size=hf_config["vocab_size"], seq_len=seq_len, micro_batch=micro_batch)
    finally:
        torch.set_default_dtype(old)


# --------------------------------------------------------------------------- tests


def test_import_is_cheap():
    code = "import sys, planner.trace; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


def test_count_parameters_llama_by_hand():
    c = dict(LLAMA, tie_word_embeddings=False)
    h, a, k, f, V, L = 64, 4, 2, 160, 1000, 2
    d = h // a
    per_layer = h * a * d + 2 * h * k * d + a * d * h + 3 * h * f + 2 * h  # q, k, v, o, gate/up/down, 2 norms
    assert T.count_parameters(c) == V * h + L * per_layer + h + V * h  # embed, layers, final norm, lm_head


def test_count_parameters_tied_gpt2():
    h, V, P, L = 64, 128, 32, 2
    per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h)
    assert T.count_parameters(GPT2) == V * h + P * h + L * per_layer + 2 * h  # lm_head tied to wte


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["flash", "eager"])
def test_gpt2_cpu_trace_equals_real_cpu_run(attention, dtype):
    r = T.trace_activations(GPT2, seq_len=16, micro_batch=2, attention=attention, dtype=dtype)
    real = real_cpu_saved_bytes(GPT2, seq_len=16, micro_batch=2, attention=attention, dtype=dtype)
    assert r.cpu_trace_bytes == real


@pytest.mark.parametrize("attention", ["flash", "eager"])
def test_llama_gqa_cpu_trace_equals_real_cpu_run(attention):
    r = T.trace_activations(LLAMA, seq_len=16, micro_batch=2, attention=attention, dtype="bf16")
    assert r.cpu_trace_bytes == real_cpu_saved_bytes(LLAMA, seq_len=16, micro_batch=2, attention=attention,
                                                     dtype="bf16")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_trace_completes_for_each_family(name):
    for attention in ("flash", "eager"):
        r = T.trace_activations(FAMILIES[name], seq_len=16, micro_batch=2, attention=attention)
        assert r.total_bytes > 0 and r.num_layers == 2
        assert r.total_bytes == r.model_bytes + sum(r.layer_bytes)
        assert r.gpu_correction_bytes == r.cpu_trace_bytes - r.total_bytes
        assert sum(n for _, n in r.breakdown) == r.total_bytes


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("attention", ["flash", "eager"])
@pytest.mark.parametrize("s,b", [(16, 1), (40, 3)])
def test_closed_forms(attention, dtype, s, b):
    for cfg, formula in ((LLAMA, llama_bytes), (MIXTRAL, llama_bytes), (GPT2, gpt2_bytes)):
        r = T.trace_activations(cfg, seq_len=s, micro_batch=b, attention=attention, dtype=dtype)
        model, per_layer = formula(cfg, s, b, attention, dtype)
        assert (r.model_bytes, r.layer_bytes) == (model, (per_layer, per_layer)), cfg["model_type"]


def test_gpu_corrections_gpt2():
    # bf16: CPU LayerNorm stats are bf16 (CUDA fp32), CPU dropout noise is bf16 (CUDA bool mask),
    # CPU SDPA with dropout is the fp32 math kernel.
    s, b, h, a = 16, 2, 64, 4
    t = b * s
    r = T.trace_activations(GPT2, seq_len=s, micro_batch=b, attention="eager", dtype="bf16")
    # per layer: 2 LN (-4t each), 2 resid dropouts (+t*h each), attention-probs dropout (+b*a*s*s);
    # model: embedding dropout (+t*h), ln_f (-4t)
    assert r.gpu_correction_bytes == 2 * (-8 * t + 2 * t * h + b * a * s * s) + t * h - 4 * t
    r = T.trace_activations(GPT2, seq_len=s, micro_batch=b, attention="flash", dtype="bf16")
    per_layer_cpu_attention = 12 * t * h + 12 * b * a * s * s + 2 * t * h  # fp32 math saves + o_proj copy
    per_layer_gpu_attention = 6 * t * h + 2 * t * h + 4 * b * a * s  # qkv storage, o, lse
    per_layer = -8 * t + 2 * t * h + per_layer_cpu_attention - per_layer_gpu_attention
    assert r.gpu_correction_bytes == 2 * per_layer + t * h - 4 * t


def test_cpu_sdpa_with_mask_saves_mask_and_repeated_kv(monkeypatch):
    # Raw FakeTensorMode behaviour (transformers assumes packing -> builds a mask) == a CPU run with a mask.
    monkeypatch.setattr(T.passes, "_assume_unpacked", contextlib.nullcontext)  # where trace_activations reads it
    s, b, h, a, k = 24, 2, 64, 4, 2
    d = h // a
    r = T.trace_activations(LLAMA, seq_len=s, micro_batch=b, attention="flash", dtype="bf16")
    assert r.gpu_correction_bytes == 2 * (2 * b * s * s + 2 * 2 * b * s * (a - k) * d)


def test_extrapolation_from_one_and_two_layers():
    c = dict(LLAMA, num_hidden_layers=5)
    full = T.trace_activations(c, seq_len=16, micro_batch=2)
    one = T.trace_activations(c, seq_len=16, micro_batch=2, num_layers_override=1)
    two = T.trace_activations(c, seq_len=16, micro_batch=2, num_layers_override=2)
    assert (one.num_layers, two.num_layers, full.num_layers) == (1, 2, 5)
    assert T.extrapolate_layers(one, two, 5) == full.total_bytes


def test_default_dtype_restored_and_bad_args():
    before = torch.get_default_dtype()
    T.trace_activations(LLAMA, seq_len=8, micro_batch=1, dtype="bf16")
    assert torch.get_default_dtype() == before
    with pytest.raises(ValueError):
        T.trace_activations(LLAMA, seq_len=8, micro_batch=1, attention="xformers")
    with pytest.raises(ValueError):
        T.trace_activations(LLAMA, seq_len=8, micro_batch=1, dtype="int8")
