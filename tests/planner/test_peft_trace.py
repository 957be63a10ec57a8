"""Parameter-efficient fine-tuning in planner.trace: trainable counts, saved bytes, MeZO peak.

Run: PYTHONPATH=/work/main /work/main/.venv/bin/python -m pytest tests/planner/test_peft_trace.py -q
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from planner import trace as T  # noqa: E402
from tests.planner.realrun import saved_bytes_of_forward  # noqa: E402

# Small configs, every dimension distinct where possible so that a wrong term cannot cancel out.
LLAMA = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=160, vocab_size=1000, num_hidden_layers=2)
GPT2 = dict(model_type="gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=128)
FAMILIES = {
    "llama": LLAMA,
    "mistral": dict(LLAMA, model_type="mistral"),
    "qwen2": dict(LLAMA, model_type="qwen2"),
    "gpt2": GPT2,
}
PEFT_METHODS = {
    "lora": {"method": "lora", "r": 8, "lora_alpha": 16},
    "lora_all_linear": {"method": "lora", "r": 4, "target_modules": "all-linear"},
    "prefix": {"method": "prefix", "num_virtual_tokens": 6},
    "prompt": {"method": "prompt", "num_virtual_tokens": 5},
    "ia3": {"method": "ia3"},
}
ALL_METHODS = dict(PEFT_METHODS, full={"method": "full"}, bitfit={"method": "bitfit"}, mezo={"method": "mezo"},
                   lora_dropout={"method": "lora", "r": 8, "lora_dropout": 0.05})
ELT = {"bf16": 2, "fp16": 2, "fp32": 4}


@pytest.fixture(autouse=True)
def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def peft_reference_counts(hf_config: dict, spec: dict) -> tuple[int, int]:
    """peft's own get_nb_trainable_parameters(), model built with plain transformers + peft."""
    from transformers import AutoConfig, AutoModelForCausalLM

    options = {k: v for k, v in spec.items() if k != "method"}
    cls = {"lora": peft.LoraConfig, "prefix": peft.PrefixTuningConfig, "prompt": peft.PromptTuningConfig,
           "ia3": peft.IA3Config}[spec["method"]]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
        model = peft.get_peft_model(model, cls(task_type="CAUSAL_LM", **options))
    return model.get_nb_trainable_parameters()


# --------------------------------------------------------------------------- trainable parameters


@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trainable_counts_equal_peft(family, method):
    spec = PEFT_METHODS[method]
    assert T.count_trainable_parameters(FAMILIES[family], spec) == peft_reference_counts(FAMILIES[family], spec)


def test_trainable_counts_closed_forms():
    h, a, k, f, L, p = 64, 4, 2, 160, 2, 6
    d = h // a
    total = T.count_parameters(LLAMA)
    assert T.count_trainable_parameters(LLAMA) == (total, total)
    assert T.count_trainable_parameters(LLAMA, {"method": "mezo"}) == (total, total)
    assert T.count_trainable_parameters(LLAMA, {"method": "bitfit"}) == (0, total)  # llama has no bias
    lora = L * (8 * (h + a * d) + 8 * (h + k * d))  # r (in + out) on q_proj, v_proj
    assert T.count_trainable_parameters(LLAMA, PEFT_METHODS["lora"]) == (lora, total + lora)
    all_linear = L * 4 * ((h + a * d) + 2 * (h + k * d) + (a * d + h) + 2 * (h + f) + (f + h))
    assert T.count_trainable_parameters(LLAMA, PEFT_METHODS["lora_all_linear"])[0] == all_linear
    assert T.count_trainable_parameters(LLAMA, PEFT_METHODS["prefix"])[0] == p * L * 2 * k * d  # un-repeated kv
    assert T.count_trainable_parameters(LLAMA, PEFT_METHODS["prompt"])[0] == 5 * h
    assert T.count_trainable_parameters(LLAMA, PEFT_METHODS["ia3"])[0] == L * (k * d + k * d + f)  # k, v out; down in
    qwen2 = dict(LLAMA, model_type="qwen2")
    assert T.count_trainable_parameters(qwen2, PEFT_METHODS["ia3"])[0] == L * (a * d + k * d + f)  # q, v, down
    assert T.count_trainable_parameters(qwen2, {"method": "bitfit"})[0] == L * (a * d + 2 * k * d)  # q, k, v biases
    # gpt2: c_attn (h -> 3h) biases, attn.c_proj, c_fc (h -> 4h), mlp.c_proj, ln_1, ln_2; ln_f
    assert T.count_trainable_parameters(GPT2, {"method": "bitfit"})[0] == L * 11 * h + h
    assert T.count_trainable_parameters(GPT2, PEFT_METHODS["ia3"])[0] == L * (3 * h + 4 * h)  # c_attn; mlp.c_proj in


# --------------------------------------------------------------------------- traces


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trace_completes_for_each_method(family):
    cfg = FAMILIES[family]
    for name, spec in ALL_METHODS.items():
        for attention in ("flash", "eager"):
            if name == "bitfit" and family in ("llama", "mistral"):
                with pytest.raises(ValueError, match="no trainable parameter"):
                    T.trace_activations(cfg, seq_len=16, micro_batch=2, attention=attention, peft=spec)
                continue
            r = T.trace_activations(cfg, seq_len=16, micro_batch=2, attention=attention, peft=spec)
            assert r.total_bytes > 0 and r.num_layers == 2 and r.method == spec["method"]
            assert r.total_bytes == r.model_bytes + sum(r.layer_bytes)
            assert r.gpu_correction_bytes == r.cpu_trace_bytes - r.total_bytes
            assert sum(n for _, n in r.breakdown) == r.total_bytes
            expected_dtype = "float32" if spec["method"] in ("lora", "prefix", "prompt", "ia3") else "bfloat16"
            assert r.adapter_dtype == expected_dtype, name
            assert r.virtual_tokens == spec.get("num_virtual_tokens", 0)
            assert bool(r.peak_at) == (spec["method"] == "mezo")


def test_peft_none_and_full_are_the_default():
    a = T.trace_activations(LLAMA, seq_len=16, micro_batch=2)
    b = T.trace_activations(LLAMA, seq_len=16, micro_batch=2, peft={"method": "full"})
    assert (a.total_bytes, a.layer_bytes, a.model_bytes) == (b.total_bytes, b.layer_bytes, b.model_bytes)
    assert a.method == b.method == "full"


def test_bad_peft_arguments_and_dtype_restored():
    before = torch.get_default_dtype()
    with pytest.raises(ValueError, match="method"):
        T.trace_activations(LLAMA, seq_len=8, micro_batch=1, peft={"method": "adapter"})
    with pytest.raises(ValueError, match="no options"):
        T.trace_activations(LLAMA, seq_len=8, micro_batch=1, peft={"method": "bitfit", "r": 4})
    T.trace_activations(LLAMA, seq_len=8, micro_batch=1, peft=PEFT_METHODS["lora"])
    assert torch.get_default_dtype() == before


def test_autocast_adapter_dtype_false_shares_the_lora_input():
    # bf16 adapters: lora_A saves the base input itself, one storage for q_proj and v_proj.
    s, b, h, r = 16, 2, 64, 8
    t = b * s
    fp32 = T.trace_activations(LLAMA, seq_len=s, micro_batch=b, peft=PEFT_METHODS["lora"])
    no_autocast = dict(PEFT_METHODS["lora"], autocast_adapter_dtype=False)
    bf16 = T.trace_activations(LLAMA, seq_len=s, micro_batch=b, peft=no_autocast)
    assert (fp32.adapter_dtype, bf16.adapter_dtype) == ("float32", "bfloat16")
    assert fp32.layer_bytes[1] - bf16.layer_bytes[1] == 2 * (4 * t * h + 4 * t * r) - (2 * t * h + 2 * 2 * t * r)


def test_prompt_tokens_are_copied_per_step_on_gpu():
    # CPU run: the embedding saves peft's [p] prompt_tokens buffer; CUDA: a [b, p] copy (host -> device).
    s, b, p = 16, 3, 5
    r = T.trace_activations(LLAMA, seq_len=s, micro_batch=b, peft=PEFT_METHODS["prompt"])
    assert r.gpu_correction_bytes == 8 * p - 8 * b * p


@pytest.mark.parametrize("spec", [PEFT_METHODS["lora"], PEFT_METHODS["prefix"], PEFT_METHODS["ia3"],
                                  {"method": "mezo"}], ids=lambda s: s["method"])
def test_extrapolation_from_one_and_two_layers(spec):
    # prefix: a 1-layer rotary model never saves cos/sin (neither q nor k of layer 0 requires grad)
    c = dict(LLAMA, num_hidden_layers=5)
    full = T.trace_activations(c, seq_len=16, micro_batch=2, peft=spec)
    one = T.trace_activations(c, seq_len=16, micro_batch=2, peft=spec, num_layers_override=1)
    two = T.trace_activations(c, seq_len=16, micro_batch=2, peft=spec, num_layers_override=2)
    assert T.extrapolate_layers(one, two, 5) == full.total_bytes


# --------------------------------------------------------------------------- real CPU runs


def real_cpu_saved_bytes(hf_config: dict, *, seq_len: int, micro_batch: int, attention: str, dtype: str,
                         spec: dict) -> int:
    """Bytes a real CPU training forward of the peft model keeps for backward (data_ptr keys,
    parameters excluded, counted while only the loss lives); then a backward must run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tdtype = getattr(torch, T._DTYPE_NAMES[dtype])
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**hf_config)
    cfg.use_cache = False
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa" if attention == "flash" else "eager",
                                             dtype=tdtype)
    if spec["method"] == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
    else:
        options = {k: v for k, v in spec.items() if k != "method"}
        cls = {"lora": peft.LoraConfig, "prefix": peft.PrefixTuningConfig, "prompt": peft.PromptTuningConfig,
               "ia3": peft.IA3Config}[spec["method"]]
        model = peft.get_peft_model(model, cls(task_type="CAUSAL_LM", **options))
    model.train()
    return saved_bytes_of_forward(model, vocab_size=hf_config["vocab_size"], seq_len=seq_len,
                                  micro_batch=micro_batch, backward=True)


REAL_CASES = [
    ("llama", "lora", "flash", "bf16"), ("llama", "lora_dropout", "eager", "bf16"), ("llama", "lora", "flash", "fp32"),
    ("llama", "lora_all_linear", "flash", "bf16"), ("llama", "prefix", "flash", "bf16"),
    ("llama", "prefix", "eager", "bf16"),
    ("llama", "prompt", "flash", "bf16"), ("llama", "ia3", "eager", "bf16"), ("qwen2", "bitfit", "flash", "bf16"),
    ("gpt2", "lora_dropout", "flash", "bf16"), ("gpt2", "prefix", "eager", "bf16"), ("gpt2", "prompt", "flash", "fp32"),
    ("gpt2", "ia3", "flash", "bf16"), ("gpt2", "bitfit", "eager", "bf16"),
]


@pytest.mark.parametrize("family,method,attention,dtype", REAL_CASES)
def test_peft_cpu_trace_equals_real_cpu_run(family, method, attention, dtype):
    cfg, spec = FAMILIES[family], ALL_METHODS[method]
    r = T.trace_activations(cfg, seq_len=16, micro_batch=2, attention=attention, dtype=dtype, peft=spec)
    assert r.cpu_trace_bytes == real_cpu_saved_bytes(cfg, seq_len=16, micro_batch=2, attention=attention,
                                                     dtype=dtype, spec=spec)


def real_cpu_inference_peak(hf_config: dict, *, seq_len: int, micro_batch: int, attention: str, dtype: str) -> int:
    """Peak of the CPU allocator's live bytes (torch.profiler memory events) during a no_grad eval
    forward with labels; input ids and labels (allocated before) added."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**hf_config)
    cfg.use_cache = False
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa" if attention == "flash" else "eager",
                                             dtype=getattr(torch, T._DTYPE_NAMES[dtype])).eval()
    ids = torch.randint(0, hf_config["vocab_size"], (micro_batch, seq_len))
    labels = ids.clone()
    with torch.no_grad():
        model(input_ids=ids, labels=labels)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            del_me = model(input_ids=ids, labels=labels).loss
            del del_me
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak + ids.untyped_storage().nbytes() + labels.untyped_storage().nbytes()


@pytest.mark.parametrize("attention", ["flash", "eager"])
def test_mezo_cpu_peak_equals_profiler(attention):
    # fp32 llama: no CPU kernel allocates hidden buffers, so the allocator's own peak is comparable.
    c = dict(LLAMA, intermediate_size=1000, vocab_size=300)  # peak inside a layer
    for s, b in ((16, 2), (40, 1)):
        r = T.trace_activations(c, seq_len=s, micro_batch=b, attention=attention, dtype="fp32", peft={"method": "mezo"})
        assert "layers.1" in r.peak_at
        assert r.cpu_trace_bytes == real_cpu_inference_peak(c, seq_len=s, micro_batch=b, attention=attention,
                                                            dtype="fp32")
    r = T.trace_activations(LLAMA, seq_len=16, micro_batch=2, attention=attention, dtype="fp32",
                            peft={"method": "mezo"})
    assert "cross_entropy" in r.peak_at  # V = 1000 >> h: the loss is the peak
    assert r.cpu_trace_bytes == real_cpu_inference_peak(LLAMA, seq_len=16, micro_batch=2, attention=attention,
                                                        dtype="fp32")


def test_mezo_peak_is_below_full_finetune_saved_bytes():
    c = dict(LLAMA, num_hidden_layers=4, vocab_size=256)
    for attention in ("flash", "eager"):
        full = T.trace_activations(c, seq_len=64, micro_batch=2, attention=attention)
        mezo = T.trace_activations(c, seq_len=64, micro_batch=2, attention=attention, peft={"method": "mezo"})
        assert 0 < mezo.total_bytes < full.total_bytes / 2
    # A peak, not a sum: depth does not add to it.
    shallow = T.trace_activations(c, seq_len=64, micro_batch=2, peft={"method": "mezo"})
    deeper = T.trace_activations(dict(c, num_hidden_layers=8), seq_len=64, micro_batch=2, peft={"method": "mezo"})
    assert deeper.total_bytes == shallow.total_bytes


# --------------------------------------------------------------------------- closed forms (see the report)


def llama_forms(c: dict, s: int, b: int, attention: str, method: str, dtype: str = "bf16", r: int = 8, p: int = 0,
                dropout: bool = False, all_linear: bool = False) -> tuple[int, int, int]:
    """(model-level, layer 0, each later layer) bytes, GPU figure, bf16/fp16 (peft's fp32 adapters)."""
    e = ELT[dtype]
    h, a, f, V = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"], c["vocab_size"]
    k = c.get("num_key_value_heads", a)
    d = h // a
    t = b * s
    one = 8 if b == 1 else 0  # b == 1: the shifted labels are a view of the padded [1, s + 1] labels
    if method == "prompt":  # the layers, logits and loss see s + p positions
        s, t = s + p, b * (s + p)
    # frozen base, input requiring grad: 2 RMSNorms (fp32 x, rsqrt), attention, gate/silu/up outputs
    if attention == "flash":  # q, k, v, o, lse
        fb = t * (8 * h + 8 + 2 * e * a * d + 2 * e * k * d + 4 * a + 3 * e * f)
    else:  # q, k^T and v repeated, fp32 softmax, probs
        fb = t * (8 * h + 8 + 3 * e * a * d + 3 * e * f) + (4 + e) * b * a * s * s
    fb_model = t * (4 * V + 4 * h + 12) + 2 * e * s * d + 4 + one  # fp32 log_softmax, final norm, targets, cos/sin
    first = t * (4 * h + 4)  # layer 0's input norm: its input does not require grad
    if method == "lora":
        ins = [h, h] if not all_linear else [h, h, h, a * d, h, h, f]
        layer = fb + sum(t * (4 * i + 4 * r) for i in ins) + (sum(t * i for i in ins) if dropout else 0)
        l0 = layer - first - ((3 if all_linear else 2) * t * h if dropout else 0)
        if attention == "eager" and not all_linear:
            l0 -= e * t * a * d  # k of layer 0 does not require grad: q @ k^T does not save q
        return fb_model, l0, layer
    if method == "prefix":
        if attention == "flash":
            layer = t * (8 * h + 8 + 2 * e * a * d + 4 * a + 3 * e * f) + 2 * e * b * (s + p) * k * d
            return fb_model + 8 * b * p, layer - first, layer
        layer = t * (8 * h + 8 + e * a * d + 3 * e * f) + 2 * e * b * (s + p) * a * d + (4 + e) * b * a * s * (s + p)
        return fb_model + 8 * b * p, layer - first - e * b * (s + p) * a * d, layer
    if method == "prompt":
        return fb_model + 8 * b * p, fb, fb
    if method == "ia3":  # k_proj, v_proj outputs scaled; down_proj input scaled (fp32)
        layer = fb + t * (2 * e * k * d + 4 * f) + 4 * (2 * k * d + f)
        return fb_model, layer - first - 8 * k * d - (e * t * a * d if attention == "eager" else 0), layer
    if method == "mezo":  # peak of live bytes
        loss = t * ((e + 4 * (e != 4) + 4) * V + e * h + 24) + 8 * b + 8 + (8 * t if b > 1 else 0)
        base = 16 * t + 8 * s + 2 * e * s * d
        mlp = base + t * (4 * e * h + 3 * e * f)
        att = 0
        if attention == "eager":
            mlp += e * b * a * s * s + e * b * s * s
            up = 4 if dtype == "bf16" else 0
            # softmax(dtype=fp32): input (e) + its fp32 copy (bf16) + fp32 probs, then .to(dtype) (e)
            probs = (e + 4 + max(up, e * (e != 4))) * b * a * s * s
            att = base + t * (3 * e * h + 3 * e * a * d + 2 * e * k * d) + e * b * s * s + probs
        return max(loss, mlp, att), 0, 0
    raise ValueError(method)


def gpt2_forms(c: dict, s: int, b: int, attention: str, method: str, dtype: str = "bf16", r: int = 8, p: int = 0,
               dropout: bool = False, all_linear: bool = False) -> tuple[int, int, int]:
    e = ELT[dtype]
    h, a, V = c["n_embd"], c["n_head"], c["vocab_size"]
    f = 4 * h
    t = b * s
    one = 8 if b == 1 else 0
    if method == "prompt":
        s, t = s + p, b * (s + p)
    att = 4 * b * a * s if attention == "flash" else (2 * e + 1) * b * a * s * s
    full = t * (8 * e * h + 2 * h + 5 * e * f + 16) + att
    fb = full - t * (2 * e * h + e * f) - (e * t * h if attention == "eager" else 0)  # c_attn, c_fc, c_proj inputs
    fb_model = t * (4 * V + 16) + 4 + one
    first = 8 * t  # ln_1 of layer 0: no mean / rstd
    if method == "lora":
        ins = [h] if not all_linear else [h, h, h, f]
        layer = fb + sum(t * (4 * i + 4 * r) for i in ins) + (sum(t * i for i in ins) if dropout else 0)
        return fb_model, layer - first - (t * h if dropout else 0), layer
    if method == "prefix":
        if attention == "flash":
            layer = fb + 2 * e * b * (s + p) * h
            return fb_model + 8 * b * p, layer - first, layer
        layer = fb - 2 * e * t * h + 2 * e * b * (s + p) * h + (2 * e + 1) * b * a * s * p
        if b == 1:  # q is a view of c_attn's output reshaped without a copy: the whole [t, 3h] is saved
            layer += 2 * e * t * h
        return fb_model + 8 * b * p, layer - first - e * b * (s + p) * h, layer
    if method == "prompt":
        return t * (4 * V + 16 + e * h + h) + 4 + one + 8 * b * p, fb, fb
    if method == "ia3":
        layer = fb + t * (3 * e * h + 4 * f) + 4 * (3 * h + f)
        return fb_model, layer - first - 12 * h, layer
    if method == "bitfit":
        return t * (4 * V + 16 + e * h) + 4 + one, fb, fb
    if method == "mezo":
        loss = t * ((e + 4 * (e != 4) + 4) * V + e * h + 24) + 8 * b + 8 + (8 * t if b > 1 else 0)
        base = 16 * t + 8 * s + e * s * h
        mlp = base + t * (5 * e * h + 4 * e * f)
        att = 0
        if attention == "eager":
            mlp += e * b * a * s * s + e * b * s * s
            att = base + 6 * e * t * h + 2 * e * b * a * s * s + e * b * s * s
        return max(loss, mlp, att), 0, 0
    raise ValueError(method)


FORM_CASES = {
    "lora": ({"method": "lora", "r": 8}, dict(r=8)),
    "lora_all_linear": ({"method": "lora", "r": 4, "target_modules": "all-linear"}, dict(r=4, all_linear=True)),
    "lora_dropout": ({"method": "lora", "r": 8, "lora_dropout": 0.05}, dict(r=8, dropout=True)),
    "prefix": ({"method": "prefix", "num_virtual_tokens": 6}, dict(p=6)),
    "prompt": ({"method": "prompt", "num_virtual_tokens": 5}, dict(p=5)),
    "ia3": ({"method": "ia3"}, {}),
    "bitfit": ({"method": "bitfit"}, {}),
    "mezo": ({"method": "mezo"}, {}),
}


@pytest.mark.parametrize("attention", ["flash", "eager"])
@pytest.mark.parametrize("s,b", [(16, 1), (40, 3)])
def test_closed_forms(attention, s, b):
    small_v = {"mezo_llama": dict(LLAMA, vocab_size=50), "mezo_gpt2": dict(GPT2, vocab_size=20)}  # peak in a layer
    for arch, cfg, forms in (("llama", LLAMA, llama_forms), ("gpt2", GPT2, gpt2_forms)):
        for name, (spec, kw) in FORM_CASES.items():
            if arch == "llama" and name == "bitfit":
                continue
            for c in (cfg, small_v.get(f"{name}_{arch}")):
                if c is None:
                    continue
                r = T.trace_activations(c, seq_len=s, micro_batch=b, attention=attention, peft=spec)
                model, l0, later = forms(c, s, b, attention, spec["method"], **kw)
                if spec["method"] == "mezo":
                    assert r.total_bytes == model, (arch, name, c["vocab_size"])
                else:
                    assert (r.model_bytes, r.layer_bytes) == (model, (l0, later)), (arch, name)
