"""Instruction data (launch/data.py): the loss counts completion / assistant tokens only; examples
are padded or packed to --seq-len; the driver's check reads every record before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch import data
from planner.errors import PlanInputError
from tests.launch.saved_model import chat_records, tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return tokenizer()


def test_chat_labels_are_the_assistant_turns(tok) -> None:  # type: ignore[no-untyped-def]
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is ice?"},
                        {"role": "assistant", "content": "Ice is frozen water."}, {"role": "user", "content": "And fish?"},
                        {"role": "assistant", "content": "Fish live in water."}]}
    (ids, labels), = data.instruction_examples([rec], "messages", tok)
    rendered = tok.apply_chat_template(rec["messages"], tokenize=False)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    kept = tok.decode([t for t, lab in zip(ids, labels) if lab != data.IGNORE])
    assert kept == "Ice is frozen water.<|end|>\nFish live in water.<|end|>\n"
    assert all(lab in (data.IGNORE, t) for t, lab in zip(ids, labels))


def test_prompt_completion_labels_and_bytes(tok) -> None:  # type: ignore[no-untyped-def]
    (ids, labels), = data.instruction_examples([{"prompt": "Q: sky? A:", "completion": " blue"}], "prompt", tok)
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != data.IGNORE]) == " blue<|end|>"
    (ids, labels), = data.instruction_examples([{"prompt": "ab", "completion": "c"}], "prompt", None)
    assert ids == [97, 98, 99, 10] and labels == [data.IGNORE, data.IGNORE, 99, 10]


def test_pad_and_pack() -> None:
    examples = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9, 10], [-100, -100, -100, -100, 10])]
    ids, labels = data.to_sequences(examples, 4, pad_id=0, pack=False)
    # the third example loses its only label to truncation at 4 tokens: dropped
    assert ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert labels.tolist() == [[-100, 2, 3, -100], [-100, 5, -100, -100]]
    ids, labels = data.to_sequences(examples, 4, pad_id=0, pack=True)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert labels.tolist() == [[-100, 2, 3, -100], [5, -100, -100, -100], [-100, 10, -100, -100]]
    with pytest.raises(ValueError, match="seq-len"):
        data.to_sequences([([1, 2, 3], [-100, -100, 3])], 2, pad_id=0, pack=False)


def test_the_check_reads_every_record(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    tdir = tmp_path / "tok"
    tok.save_pretrained(tdir)
    good = write_jsonl(tmp_path / "chat.jsonl", chat_records(4))
    data.check(good, tdir, vocab_size=len(tok), seq_len=32)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"messages": []}\n')
    with pytest.raises(PlanInputError, match="line 5"):
        data.check(bad, tdir, vocab_size=len(tok), seq_len=32)


def test_sequence_batches_are_deterministic(tok) -> None:  # type: ignore[no-untyped-def]
    seqs = data.to_sequences(data.instruction_examples(chat_records(8), "messages", tok), 48, tok.pad_token_id, False)
    a, b = data.sequence_batch(seqs, 3, 1, 4), data.sequence_batch(seqs, 3, 1, 4)
    assert a[0].equal(b[0]) and a[1].equal(b[1]) and a[0].shape == (4, 48)
    assert not data.sequence_batch(seqs, 4, 1, 4)[0].equal(a[0]) or seqs[0].shape[0] == 1
