"""FLOPs per token (planner.speed.flops, from the model's own linear modules) against PyTorch's
own count of a real forward (torch.utils.flop_counter.FlopCounterMode: every matmul, 2mkn) for
every architecture of tests/planner/architectures.py, MoE with and without shared experts
included. Eager attention, whose two s x s matmuls are the full square the planner counts (as
Narayanan et al. 2021 and PaLM do), and eager experts (a matmul per routed expert, which the
counter sees; top-k of them per token in total, whatever the routing)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from planner.speed.flops import layer_forward_flops_per_token, logits_forward_flops_per_token
from planner.structure.hf_config import spec_from_hf_config
from tests.planner.architectures import ARCHITECTURES, config

BATCH, SEQ = 2, 64


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_forward_flops_equal_the_counted_matmuls(name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = config(name)
    hf = AutoConfig.for_model(**cfg)
    hf.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf, attn_implementation="eager", dtype=torch.float32,
                                             experts_implementation="eager")
    ids = torch.randint(0, 300, (BATCH, SEQ))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    m = spec_from_hf_config(cfg, name=name)
    dense, core = layer_forward_flops_per_token(m, SEQ)
    planned = (dense + core + logits_forward_flops_per_token(m)) * BATCH * SEQ
    assert planned == counter.get_total_flops()
