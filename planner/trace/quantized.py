"""QLoRA's base model under FakeTensorMode: bitsandbytes 4-bit linears and peft's
``prepare_model_for_kbit_training``, as the standard recipe runs them (Dettmers et al. 2023;
artidoro/qlora ``qlora.py``; TRL's SFT scripts).

``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` replaces every
``nn.Linear`` / ``Conv1D`` except the output embedding, the tied weights and the last module
(transformers ``replace_with_bnb_linear`` with ``get_keys_to_not_convert``) by a
``bnb.nn.Linear4bit`` whose weight is quantised when it is loaded. Quantising fake weights is not
possible (bitsandbytes builds its code book with ``tolist()``), so the module is built here with a
fake packed weight of the same shape ([(out*in + 1) // 2, 1] uint8) and a real ``QuantState`` of
fake tensors (absmax per block of ``blocksize``, 8-bit with a second-level state per 256 blocks
under double quantisation). Everything that runs is bitsandbytes' and peft's own code:
``Linear4bit.forward`` (input cast to the compute dtype, ``matmul_4bit``, output cast back to the
input dtype), ``MatMul4Bit`` (which keeps no activation for backward: only the packed weight, as a
ctx attribute), the fake kernels of ``torch.ops.bitsandbytes.gemm_4bit`` and
``dequantize_4bit`` (the backward dequantises the weight once per use: a transient 16-bit copy),
and peft's ``lora.bnb.Linear4bit`` wrapper.

``prepare_model_for_kbit_training`` (peft/utils/other.py) then freezes every parameter and casts
every 16-bit parameter that is not 4-bit (norms, embeddings, lm_head, biases) to fp32: the
residual stream, the norms and the logits then run in fp32, which is most of what QLoRA keeps
beyond a 16-bit LoRA. ``upcast=False`` is the variant that keeps them in 16 bits. Gradient
checkpointing, which the function also enables by default, is the plan's ``recompute``.
"""

from __future__ import annotations

from typing import Any


def _fake_linear4bit_class() -> type:
    import bitsandbytes as bnb
    import torch

    class FakeLinear4bit(bnb.nn.Linear4bit):
        """A ``bnb.nn.Linear4bit`` whose weight is already 'quantised': built without Params4bit,
        which cannot wrap a fake tensor; forward and backward are bitsandbytes'."""

        def __init__(self, in_f: int, out_f: int, bias: Any, dtype: Any, options: dict[str, Any]) -> None:
            import bitsandbytes.functional as BF

            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = in_f, out_f
            n = in_f * out_f
            block = int(options["block_size"])
            blocks = -(-n // block)
            shape = torch.Size([out_f, in_f])
            if options["double_quant"]:
                state2 = BF.QuantState(absmax=torch.empty(-(-blocks // 256), dtype=torch.float32),
                                       code=torch.empty(256, dtype=torch.float32), blocksize=256, dtype=torch.float32)
                state = BF.QuantState(absmax=torch.empty(blocks, dtype=torch.uint8), shape=shape, code=torch.empty(16, dtype=torch.float32),
                                      blocksize=block, quant_type=options["quant_type"], dtype=dtype,
                                      offset=torch.empty((), dtype=torch.float32), state2=state2)
            else:
                state = BF.QuantState(absmax=torch.empty(blocks, dtype=torch.float32), shape=shape, code=torch.empty(16, dtype=torch.float32),
                                      blocksize=block, quant_type=options["quant_type"], dtype=dtype)
            weight = torch.nn.Parameter(torch.empty((n + 1) // 2, 1, dtype=torch.uint8), requires_grad=False)
            weight.quant_state = state
            weight.bnb_quantized = True
            weight.compress_statistics = bool(options["double_quant"])
            weight.quant_type = options["quant_type"]
            weight.blocksize = block
            weight.quant_storage = torch.uint8
            self.weight = weight
            self.bias = bias
            self.compute_dtype = dtype
            self.compute_type_is_set = True
            self.quant_state = None
            self.quant_storage = torch.uint8
            self.support_avx512bf16_for_cpu = False

    return FakeLinear4bit


def quantize_4bit(model: Any, options: dict[str, Any], compute_dtype: Any) -> Any:
    """Replace the linears bitsandbytes would quantise by 4-bit ones, in place; then
    ``prepare_model_for_kbit_training``'s freeze and fp32 upcast (``options["upcast"]``)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    cls = _fake_linear4bit_class()
    skip = get_keys_to_not_convert(model)
    for name, module in list(model.named_modules()):
        if not name or not should_convert_module(name, skip):
            continue
        if isinstance(module, Conv1D) or type(module) is torch.nn.Linear:
            in_f, out_f = (module.weight.shape if isinstance(module, Conv1D) else (module.in_features, module.out_features))
            new = cls(int(in_f), int(out_f), module.bias, compute_dtype, options)
            new.source_cls = type(module)
            model.set_submodule(name, new)
    model.is_loaded_in_4bit = True
    if options.get("upcast", True):
        from peft import prepare_model_for_kbit_training

        # peft's own function: freeze, then ``param.data = param.data.to(torch.float32)`` for every
        # 16-bit parameter that is not 4-bit (tied weights stay one Parameter).
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
