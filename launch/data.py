"""Training tokens from a local text or JSONL file: tokenised with a local Hugging Face tokenizer,
or as UTF-8 bytes when there is none (token id = byte value, so the model's vocabulary must have
at least 256 entries). Every worker reads the same file (on a multi-node cluster, put it on a
shared filesystem or at the same path on every node) and draws sequences at offsets that depend
only on (seed, step, data-parallel rank): a resumed run sees exactly the data it would have seen.

A .jsonl file holds one kind of record:
- ``{"text": ...}``: documents, trained on every token (windows of the concatenated stream);
- ``{"prompt": ..., "completion": ...}``: the loss counts the completion's tokens only;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat rendered with the tokenizer's chat
  template; the loss counts the assistant turns' tokens only (each turn is the part the template
  adds between the conversation before it with the generation prompt and the conversation with
  it, TRL's "assistant-only loss" without needing ``{% generation %}`` markers in the template).
Instruction examples are padded to ``--seq-len`` (labels -100 on the padding; right padding under
a causal mask changes no real token's logits) or packed several to a sequence (``--pack``).

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
# What a save_pretrained tokenizer may consist of (copied beside an exported model).
TOKENIZER_ARTIFACTS = (*TOKENIZER_FILES, "merges.txt", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).exists() for f in TOKENIZER_FILES)


IGNORE = -100  # labels transformers' loss skips (torch.nn.CrossEntropyLoss ignore_index)
KINDS = {"text": "{\"text\": \"...\"}", "prompt": "{\"prompt\": \"...\", \"completion\": \"...\"}",
         "messages": "{\"messages\": [{\"role\": \"user\", \"content\": \"...\"}, {\"role\": \"assistant\", ...}]}"}


def _kind(row: Any) -> str | None:
    """Which record kind a parsed line is, or None."""
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("text"), str):
        return "text"
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return "prompt"
    msgs = row.get("messages")
    if (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in msgs)
            and any(m["role"] == "assistant" for m in msgs)):
        return "messages"
    return None


def read_records(path: Path) -> tuple[str, list[Any]]:
    """(kind, records) of a dataset file: a .txt file is one text document; a .jsonl file holds
    one record kind throughout (see the module docstring), refused with the line number otherwise."""
    if path.suffix == ".txt":
        return "text", [path.read_text(encoding="utf-8")]
    kind, rows = None, []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlanInputError(f"--dataset {path}: line {n} is not JSON ({exc.msg})", "fix that line or pass a .txt file") from None
        this = _kind(row)
        if this is None:
            raise PlanInputError(f"--dataset {path}: line {n} is not a text, prompt/completion or chat record",
                                 "write one of " + ", ".join(KINDS.values()) + " per line (chat: with an assistant turn)")
        if kind is not None and this != kind:
            raise PlanInputError(f"--dataset {path}: line {n} is a {this} record, but the file's first is a {kind} record",
                                 f"keep one kind of record per file ({KINDS[kind]})")
        kind = this
        rows.append(row["text"] if this == "text" else row)
    if kind is None:
        raise PlanInputError(f"--dataset {path}: no records", "write at least one JSON record per line")
    return kind, rows


def has_chat_template(directory: Path) -> bool:
    """The tokenizer directory carries a chat template (tokenizer_config.json or chat_template.jinja)."""
    if (directory / "chat_template.jinja").exists() or (directory / "chat_template.json").exists():
        return True
    try:
        return bool(json.loads((directory / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False


def check(dataset: Path, tokenizer: Path | None, vocab_size: int, seq_len: int) -> None:
    """Refuse, before any worker starts, a dataset the workers could not train on."""
    if dataset.suffix not in SUFFIXES:
        raise PlanInputError(f"--dataset {dataset}: unsupported file type '{dataset.suffix}'", "pass a .txt or .jsonl file")
    if not dataset.is_file():
        raise PlanInputError(f"--dataset {dataset}: no such file", "pass the path of a local .txt or .jsonl file")
    try:
        kind, rows = read_records(dataset)
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanInputError(f"--dataset {dataset}: cannot read it ({exc})", "pass a readable UTF-8 text file") from None
    if kind == "messages" and not (tokenizer is not None and has_chat_template(tokenizer)):
        raise PlanInputError(f"--dataset {dataset}: chat records need a tokenizer with a chat template"
                             + ("" if tokenizer is None else f", and {tokenizer} has none"),
                             "pass --tokenizer DIR (or --model DIR) whose tokenizer_config.json has a chat_template, "
                             "or write prompt/completion records")
    texts = rows if kind == "text" else [r["prompt"] + r["completion"] for r in rows] if kind == "prompt" else []
    if tokenizer is None:
        if vocab_size < BYTE_VOCAB:
            raise PlanInputError(f"--dataset without a tokenizer trains on bytes, but the model's vocabulary has {vocab_size} < 256 entries",
                                 "pass --tokenizer DIR, or a model with a vocabulary of at least 256")
        n_bytes = sum(len(t.encode("utf-8")) + 1 for t in texts)
        if kind == "text" and n_bytes <= seq_len:
            raise PlanInputError(f"--dataset {dataset}: {n_bytes} bytes is shorter than one sequence of {seq_len + 1}",
                                 "use a larger dataset or a smaller --seq-len")
    elif not (tokenizer.is_dir() and has_tokenizer(tokenizer)):
        raise PlanInputError(f"--tokenizer {tokenizer}: not a directory with a Hugging Face tokenizer",
                             "pass a directory holding tokenizer.json or tokenizer_config.json")


def load_tokenizer(tokenizer: str | None):  # type: ignore[no-untyped-def]
    """The local Hugging Face tokenizer, or None (UTF-8 bytes)."""
    if tokenizer is None:
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)


def load_tokens(texts: list[str], tok):  # type: ignore[no-untyped-def]
    """Text documents as one 1-D tensor of token ids, separated by the tokenizer's end-of-sequence
    token (bytes: by a newline)."""
    import torch

    if tok is None:
        data = b"\n".join(t.encode("utf-8") for t in texts)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
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


def _ids(tok, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    """Token ids of ``text`` (UTF-8 bytes without a tokenizer)."""
    if tok is None:
        return list(text.encode("utf-8"))
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _chat_ids(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    """(ids, labels) of a chat: the whole rendering, labels only on each assistant turn's tokens."""
    def render(msgs: list[dict[str, str]], prompt: bool) -> list[int]:
        out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    ids = render(messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        labels[start:end] = ids[start:end]
    return ids, labels


def instruction_examples(rows: list[Any], kind: str, tok) -> list[tuple[list[int], list[int]]]:  # type: ignore[no-untyped-def]
    """(ids, labels) per record: prompt tokens (or non-assistant turns) labelled -100; a
    prompt/completion example ends with the tokenizer's end-of-sequence token (bytes: a newline)."""
    out = []
    for row in rows:
        if kind == "messages":
            out.append(_chat_ids(tok, row["messages"]))
            continue
        eos = [tok.eos_token_id] if tok is not None and tok.eos_token_id is not None else ([10] if tok is None else [])
        prompt, completion = _ids(tok, row["prompt"]), _ids(tok, row["completion"]) + eos
        out.append((prompt + completion, [IGNORE] * len(prompt) + completion))
    return out


def to_sequences(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, pack: bool):  # type: ignore[no-untyped-def]
    """(input_ids, labels), each [n, seq_len]: every example cut or padded to one sequence, or
    (``pack``) the examples concatenated and cut into whole sequences (the last one padded).
    Sequences with no label left (a prompt longer than --seq-len) are dropped."""
    import torch

    rows: list[tuple[list[int], list[int]]] = []
    if pack:
        ids = [t for e in examples for t in e[0]]
        labels = [t for e in examples for t in e[1]]
        rows = [(ids[i:i + seq_len], labels[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    else:
        rows = [(e[0][:seq_len], e[1][:seq_len]) for e in examples]
    rows = [(i + [pad_id] * (seq_len - len(i)), lab + [IGNORE] * (seq_len - len(lab))) for i, lab in rows
            if any(t != IGNORE for t in lab)]
    if not rows:
        raise ValueError(f"no example keeps a completion token within --seq-len {seq_len}: use a larger --seq-len")
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def load_sequences(kind: str, rows: list[Any], tok, seq_len: int, pack: bool):  # type: ignore[no-untyped-def]
    """Instruction records as padded or packed (input_ids, labels)."""
    pad = 0 if tok is None else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0)
    return to_sequences(instruction_examples(rows, kind, tok), seq_len, pad, pack)


def sequence_batch(sequences, step: int, rank: int, micro_batch: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """``micro_batch`` (input_ids, labels) rows drawn from (seed, step, rank)."""
    import torch

    ids, labels = sequences
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    pick = torch.randint(0, ids.shape[0], (micro_batch,), generator=gen)
    return ids[pick], labels[pick]
