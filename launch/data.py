"""Training tokens from a local text or JSONL file: tokenised with a local Hugging Face tokenizer,
or as UTF-8 bytes when there is none (token id = byte value, so the model's vocabulary must have
at least 256 entries). Every worker reads the same file (on a multi-node cluster, put it on a
shared filesystem or at the same path on every node) and draws sequences at offsets that depend
only on (seed, step, data-parallel rank): a resumed run sees exactly the data it would have seen.

``check`` is the driver-side validation (no torch), run before any worker starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from planner.errors import PlanInputError

SUFFIXES = (".txt", ".jsonl")
BYTE_VOCAB = 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).exists() for f in TOKENIZER_FILES)


def read_texts(path: Path) -> list[str]:
    """The documents of a .txt file (one) or a .jsonl file (the 'text' field of each line)."""
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlanInputError(f"--dataset {path}: line {n} is not JSON ({exc.msg})", "fix that line or pass a .txt file") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise PlanInputError(f"--dataset {path}: line {n} has no string field 'text'",
                                 "write one {\"text\": \"...\"} object per line")
        texts.append(row["text"])
    return texts


def check(dataset: Path, tokenizer: Path | None, vocab_size: int, seq_len: int) -> None:
    """Refuse, before any worker starts, a dataset the workers could not train on."""
    if dataset.suffix not in SUFFIXES:
        raise PlanInputError(f"--dataset {dataset}: unsupported file type '{dataset.suffix}'", "pass a .txt or .jsonl file")
    if not dataset.is_file():
        raise PlanInputError(f"--dataset {dataset}: no such file", "pass the path of a local .txt or .jsonl file")
    try:
        texts = read_texts(dataset)
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanInputError(f"--dataset {dataset}: cannot read it ({exc})", "pass a readable UTF-8 text file") from None
    if tokenizer is None:
        if vocab_size < BYTE_VOCAB:
            raise PlanInputError(f"--dataset without a tokenizer trains on bytes, but the model's vocabulary has {vocab_size} < 256 entries",
                                 "pass --tokenizer DIR, or a model with a vocabulary of at least 256")
        n_bytes = sum(len(t.encode("utf-8")) + 1 for t in texts)
        if n_bytes <= seq_len:
            raise PlanInputError(f"--dataset {dataset}: {n_bytes} bytes is shorter than one sequence of {seq_len + 1}",
                                 "use a larger dataset or a smaller --seq-len")
    elif not (tokenizer.is_dir() and has_tokenizer(tokenizer)):
        raise PlanInputError(f"--tokenizer {tokenizer}: not a directory with a Hugging Face tokenizer",
                             "pass a directory holding tokenizer.json or tokenizer_config.json")


def load_tokens(dataset: str, tokenizer: str | None):  # type: ignore[no-untyped-def]
    """The whole dataset as one 1-D tensor of token ids, documents separated by the tokenizer's
    end-of-sequence token (bytes: by a newline)."""
    import torch

    texts = read_texts(Path(dataset))
    if tokenizer is None:
        data = b"\n".join(t.encode("utf-8") for t in texts)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    ids: list[int] = []
    for text in texts:
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        if tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def window_batch(tokens, step: int, rank: int, micro_batch: int, seq_len: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """``micro_batch`` windows of ``seq_len`` tokens at offsets drawn from (seed, step, rank)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    high = tokens.numel() - seq_len
    if high <= 0:
        raise ValueError(f"the dataset has {tokens.numel()} tokens, fewer than one sequence of {seq_len + 1}")
    offsets = torch.randint(0, high, (micro_batch, 1), generator=gen)
    return tokens[offsets + torch.arange(seq_len)]
