"""Hugging Face transformers activations (draft, replaced by the trace-derived terms)."""
from __future__ import annotations
from planner.model import ModelSpec
from planner.training import ParallelPlan, TrainingSpec

def hf_layer_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    s = training.seq_len // plan.cp
    sb = s * plan.micro_batch
    return sb * (34 * m.hidden_size) / plan.tp

def hf_embedding_bytes(m, training, plan) -> float:
    return 0.0

def hf_head_bytes(m, training, plan) -> float:
    s = training.seq_len // plan.cp
    return 4 * s * plan.micro_batch * m.vocab_size / plan.tp
