"""Synthetic training tokens with a learnable pattern, so the loss of a randomly initialised model
falls within a few dozen steps (pure torch; no I/O)."""

from __future__ import annotations

import torch


def pattern(vocab_size: int, period: int = 16, seed: int = 0) -> torch.Tensor:
    """One fixed random sequence of ``period`` tokens, repeated by every sample."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (period,), generator=gen)


def batch(step: int, rank: int, micro_batch: int, seq_len: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """``micro_batch`` sequences of ``seq_len`` tokens: the pattern repeated from a random offset.
    Deterministic in (seed, step, rank), so a resumed run sees the same data it would have seen."""
    base = pattern(vocab_size, seed=seed)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    offsets = torch.randint(0, base.numel(), (micro_batch, 1), generator=gen)
    idx = (offsets + torch.arange(seq_len)) % base.numel()
    return base[idx]
