"""The model a job trains: a transformers causal LM, randomly initialised or loaded from a local
``save_pretrained`` directory, prepared for the job's fine-tuning method with the recipe the
planner assumes (planner.finetune.methods.trace_spec gives the peft options and the 4-bit base):

- full: every parameter trains, built in fp32 (DeepSpeed casts it to the training precision);
- lora / prefix / prompt / ia3 / bitfit: the base in the training precision, wrapped by the
  planner's own peft step (planner.trace.finetuning.apply_method: ``peft.get_peft_model`` with
  peft's defaults, fp32 adapters through ``autocast_adapter_dtype``; BitFit: biases only);
- qlora: the base loaded through transformers' ``BitsAndBytesConfig`` (NF4/FP4, double
  quantisation, compute in the training precision), then peft's ``prepare_model_for_kbit_training``
  (freeze, fp32 upcast of every non-4-bit parameter; ``upcast=False``: freeze only), then LoRA;
- adapter: Houlsby et al. 2019 bottleneck adapters (h -> m -> h with biases, after the attention
  block and after the feed-forward block of every decoder layer, before the residual add), which
  peft does not build; the up-projection starts at zero, so training starts from the base model.

Also what the job's checkpoints carry beside DeepSpeed's shards: the trainable weights in a form
the user can load (peft's adapter directory, or a safetensors file of the trained tensors).
Imports transformers, peft and bitsandbytes inside functions (the driver never loads them).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16"}
ADAPTER_DIR = "adapter"  # peft's save_pretrained directory inside a checkpoint
TRAINABLE_FILE = "trainable.safetensors"  # BitFit / Houlsby adapters: the trained tensors by name
PEFT_METHODS = ("lora", "qlora", "prefix", "prompt", "ia3")


def _dtype(name: str):  # type: ignore[no-untyped-def]
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def _config(hf_config: dict[str, Any]):  # type: ignore[no-untyped-def]
    import transformers

    cfg = {k: v for k, v in hf_config.items() if k not in ("dtype", "torch_dtype", "architectures")}
    return transformers.AutoConfig.for_model(**cfg)


def base_model(hf_config: dict[str, Any], pretrained_dir: str | None, dtype: str = "fp32", quant: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
    """The causal LM in ``dtype``; from ``pretrained_dir`` when given; 4-bit linears with ``quant``
    (a random base is saved to a temporary directory first: bitsandbytes quantises at load)."""
    import torch
    import transformers

    attn = hf_config.get("attn_implementation")
    kwargs: dict[str, Any] = {"dtype": _dtype(dtype), **({"attn_implementation": attn} if attn else {})}
    if quant is None and pretrained_dir is None:
        return transformers.AutoModelForCausalLM.from_config(_config(hf_config), **kwargs)
    if quant is not None:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant["quant_type"], bnb_4bit_use_double_quant=quant["double_quant"],
            bnb_4bit_compute_dtype=_dtype(dtype))
    if pretrained_dir is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(pretrained_dir, local_files_only=True, **kwargs)
    with tempfile.TemporaryDirectory(prefix="orch-base-") as tmp:
        transformers.AutoModelForCausalLM.from_config(_config(hf_config), dtype=torch.float32).save_pretrained(tmp)
        return transformers.AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True, **kwargs)


def build(hf_config: dict[str, Any], pretrained_dir: str | None, finetune: dict[str, Any] | None, recompute: str = "none"):  # type: ignore[no-untyped-def]
    """The job's model, ready for DeepSpeed: every parameter that trains has requires_grad."""
    if finetune is None or finetune["method"] == "full":
        model = base_model(hf_config, pretrained_dir, "fp32")
    else:
        model = _finetune_model(hf_config, pretrained_dir, finetune)
    if recompute != "none":
        # Full recompute: keep each decoder layer's input and recompute the layer in backward,
        # transformers' gradient checkpointing (modeling_utils.py ``gradient_checkpointing_enable``;
        # the non-reentrant torch.utils.checkpoint, which needs no input that requires grad, so a
        # frozen embedding needs no enable_input_require_grads).
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _finetune_model(hf_config: dict[str, Any], pretrained_dir: str | None, ft: dict[str, Any]):  # type: ignore[no-untyped-def]
    from planner.trace.finetuning import apply_method

    quant = ft.get("quant")
    model = base_model(hf_config, pretrained_dir, ft["dtype"], quant)
    if quant is not None:
        import peft

        if quant.get("upcast", True):
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            model.requires_grad_(False)
    if ft["method"] == "adapter":
        return add_bottleneck_adapters(model, int(ft["adapter_size"]), ft.get("adapter_dtype", "fp32"))
    return apply_method(model, ft["peft"])


@functools.lru_cache(maxsize=1)
def _bottleneck_class():  # type: ignore[no-untyped-def]
    """The adapter module class (defined once torch is imported)."""
    import torch

    class BottleneckAdapter(torch.nn.Module):
        """Houlsby et al. 2019, Fig. 2: down-project, non-linearity, up-project, added to the
        sub-layer's output; near-identity at the start (up-projection zero)."""

        def __init__(self, hidden: int, size: int, dtype: Any) -> None:
            super().__init__()
            self.down = torch.nn.Linear(hidden, size, dtype=dtype)
            self.up = torch.nn.Linear(size, hidden, dtype=dtype)
            torch.nn.init.zeros_(self.up.weight)
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, x: Any) -> Any:
            return x + self.up(torch.nn.functional.gelu(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)

    return BottleneckAdapter


_ATTENTION = ("self_attn", "attn", "attention", "self_attention")
_FEED_FORWARD = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def _decoder_layers(model):  # type: ignore[no-untyped-def]
    """The model's decoder layers: modules of the classes transformers keeps whole (``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def add_bottleneck_adapters(model, size: int, dtype: str = "fp32"):  # type: ignore[no-untyped-def]
    """Freeze the model and add a trainable adapter after the attention and the feed-forward block
    of every decoder layer (forward hooks on those blocks' outputs, before the residual add)."""
    from planner.errors import PlanInputError

    model.requires_grad_(False)
    hidden = int(model.config.hidden_size)
    cls = _bottleneck_class()
    layers = _decoder_layers(model)
    for layer in layers:
        blocks = [next((getattr(layer, n) for n in g if hasattr(layer, n)), None) for g in (_ATTENTION, _FEED_FORWARD)]
        if None in blocks:
            raise PlanInputError(f"--method adapter: {type(layer).__name__} has no attention and feed-forward block orch can find",
                                 "use --method lora for this model")
        for i, block in enumerate(blocks):
            adapter = cls(hidden, size, _dtype(dtype))
            layer.add_module(f"adapter_{'attn' if i == 0 else 'ffn'}", adapter)
            block.register_forward_hook(_add_adapter(adapter))
    if not layers:
        raise PlanInputError("--method adapter: the model names no decoder layer class", "use --method lora for this model")
    return model


def _add_adapter(adapter):  # type: ignore[no-untyped-def]
    def hook(module, args, output):  # type: ignore[no-untyped-def]
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def trainable(model) -> list[Any]:  # type: ignore[no-untyped-def]
    return [p for p in model.parameters() if p.requires_grad]


def save_trained(model, directory: str | Path, method: str) -> None:  # type: ignore[no-untyped-def]
    """What a user loads: peft's adapter directory (``PeftModel.from_pretrained``), or the trained
    tensors by name (BitFit, Houlsby adapters). Call with the trainable parameters gathered."""
    directory = Path(directory)
    if method in PEFT_METHODS:
        model.save_pretrained(directory / ADAPTER_DIR)
        return
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
              str(directory / TRAINABLE_FILE))


def export_adapter(adapter_dir: str | Path, out: str | Path) -> None:
    """Copy a checkpoint's peft adapter directory to ``out`` (``PeftModel.from_pretrained`` loads it)."""
    import shutil

    shutil.copytree(adapter_dir, out, dirs_exist_ok=True)


def export_merged(hf_config: dict[str, Any], pretrained_dir: str, checkpoint: str | Path, method: str, dtype: str,
                  out: str | Path) -> None:
    """The base with the trained weights folded in, as a plain transformers model in ``out``:
    LoRA / (IA)^3 merged by peft (``merge_and_unload``; a QLoRA adapter is merged into the 16-bit
    base, as the QLoRA recipe does), BitFit's biases loaded into the base."""
    checkpoint = Path(checkpoint)
    model = base_model(hf_config, pretrained_dir, dtype)
    if method in PEFT_METHODS:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(checkpoint / ADAPTER_DIR)).merge_and_unload()
    else:
        from safetensors.torch import load_file

        trained = load_file(str(checkpoint / TRAINABLE_FILE))
        missing = set(trained) - set(dict(model.named_parameters()))
        if missing:
            raise ValueError(f"trained tensors the base has no parameter for: {sorted(missing)[:3]}")
        model.load_state_dict(trained, strict=False)
    model.save_pretrained(out)
