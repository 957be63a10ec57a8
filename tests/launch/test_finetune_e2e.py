"""End-to-end fine-tuning with `orch launch --method ...`: a small saved Llama-layout model (its own
tokenizer, a chat template) fine-tuned on a chat JSONL by 2 CPU ranks on an embedded Ray cluster,
for real (peft, bitsandbytes NF4 on CPU, DeepSpeed). Checks: the loss falls, a worker killed
mid-run resumes from the adapter-sized checkpoint and ends at the full step count, the exported
adapter loaded with peft gives the trained model's logits, the merged model loads with transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.launch import progress
from tests.launch.saved_model import chat_records, saved_llama, write_jsonl

pytestmark = pytest.mark.e2e

ORCH = [sys.executable, "-c", "from orchestrator.cli import main; main()"]
STEPS = 16


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("saved")
    return saved_llama(root / "llama", layers=2, hidden=128), write_jsonl(root / "chat.jsonl", chat_records())


def _orch(*args: str, run_dirs: list[Path]) -> tuple[int, str, str]:
    proc = progress.run([*ORCH, *args], run_dirs)
    return proc.returncode, proc.stdout, proc.stderr


def _launch(tmp_path: Path, model: Path, dataset: Path, name: str, *extra: str) -> tuple[dict, list[dict], Path]:
    storage, log = tmp_path / "runs", tmp_path / f"{name}.jsonl"
    code, out, err = _orch("launch", "--model", str(model), "--gpu", "cpu", "--gpus", "2", "--dataset", str(dataset),
                           "--seq-len", "48", "--checkpoint-dir", str(storage), "--name", name, "--log-jsonl", str(log),
                           "--json", *extra, run_dirs=[storage / name])
    run_log = (storage / name / "orch.log")
    assert code == 0, err[-3000:] + (run_log.read_text()[-4000:] if run_log.exists() else "")
    return json.loads(out.strip().splitlines()[-1]), [json.loads(x) for x in log.read_text().splitlines()], storage


def _input_ids(model_dir: Path):  # type: ignore[no-untyped-def]
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(chat_records(1)[0]["messages"], tokenize=False)
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _base(model_dir: Path, quantized: bool):  # type: ignore[no-untyped-def]
    """The base as the job built it (launch/models.py): bf16, or NF4 with fp32 upcast for QLoRA."""
    import peft
    import torch
    import transformers

    if not quantized:
        return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=q)
    return peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def _trained_logits(model_dir: Path, checkpoint: Path, quantized: bool):  # type: ignore[no-untyped-def]
    """Logits of the trained model as DeepSpeed saved it (the adapter weights of the newest
    checkpoint's module states, loaded into a fresh peft model of the same config)."""
    import peft
    import torch

    (tag,) = [p for p in checkpoint.iterdir() if p.name.startswith("step")]
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model = peft.get_peft_model(_base(model_dir, quantized), peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    # The trainable weights only; a 4-bit base adds its quantisation constants (bitsandbytes'
    # state_dict extras, not parameters, so exclude_frozen_parameters keeps them: a few KB).
    lora = {k: v for k, v in module.items() if "lora_" in k}
    others = [k for k in module if k not in lora]
    assert lora and all(any(m in k for m in ("absmax", "quant_map", "nested_", "quant_state")) for k in others), others[:4]
    assert not set(lora) - set(model.state_dict())
    model.load_state_dict(lora, strict=False)
    with torch.no_grad():
        return model(input_ids=_input_ids(model_dir)).logits.float()


def _exported_logits(model_dir: Path, adapter: Path, quantized: bool):  # type: ignore[no-untyped-def]
    import peft
    import torch

    model = peft.PeftModel.from_pretrained(_base(model_dir, quantized), adapter)
    with torch.no_grad():
        return model(input_ids=_input_ids(model_dir)).logits.float()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_finetune_resumes_and_exports(method: str, saved: tuple[Path, Path], tmp_path: Path) -> None:
    """Rank 0 dies after step 7; the group restarts from the step-5 checkpoint (trainable weights
    and their optimizer states only), repeats steps 6-7 with the same losses and ends at step 16."""
    import torch
    import transformers

    from orchestrator.export import newest_checkpoint

    model_dir, dataset = saved
    name = f"ft-{method}"
    summary, records, storage = _launch(tmp_path, model_dir, dataset, name, "--method", method, "--steps", str(STEPS),
                                        "--lr", "5e-3", "--checkpoint-every", "5", "--max-failures", "1",
                                        "--fail-at-step", "7")
    assert summary["status"] == "succeeded" and summary["steps"] == STEPS and summary["restarts"] == 1
    steps = [r["step"] for r in records]
    assert steps == list(range(1, 8)) + list(range(6, STEPS + 1))
    # Step 6 again: same state and data. QLoRA on CPU to 1e-4 only: saving a checkpoint calls
    # state_dict(), which turns bitsandbytes' CPU-packed 4-bit weights back into the standard layout
    # in place (bitsandbytes/nn/modules.py Linear4bit._save_to_state_dict), so the first run's steps
    # after a checkpoint use the other kernel path than the restarted run's (runs without a
    # checkpoint repeat bit for bit).
    assert records[7]["loss"] == pytest.approx(records[5]["loss"], rel=1e-4 if method == "qlora" else 1e-5)
    assert summary["final_loss"] < summary["initial_loss"] - 0.3

    checkpoint, step = newest_checkpoint(storage / name)
    assert step == STEPS
    model_bytes = _size(model_dir / "model.safetensors")
    assert _size(checkpoint) < 0.25 * model_bytes, (_size(checkpoint), model_bytes)

    adapter = tmp_path / "adapter"
    code, _, err = _orch("export", name, "--checkpoint-dir", str(storage), "--out", str(adapter), run_dirs=[])
    assert code == 0, err
    assert (adapter / "adapter_config.json").exists() and (adapter / "tokenizer_config.json").exists()
    quantized = method == "qlora"
    exported = _exported_logits(model_dir, adapter, quantized)
    assert torch.equal(exported, _trained_logits(model_dir, checkpoint, quantized))

    merged = tmp_path / "merged"
    code, _, err = _orch("export", name, "--checkpoint-dir", str(storage), "--out", str(merged), "--merge", run_dirs=[])
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    with torch.no_grad():
        logits = model(input_ids=_input_ids(model_dir)).logits.float()
    if not quantized:  # the LoRA delta folded into the bf16 weights: equal to bf16 rounding
        assert (logits - exported).abs().max() < 0.1
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["prefix", "ia3", "bitfit"])
def test_other_methods_train(method: str, tmp_path: Path) -> None:
    """prefix tuning, (IA)^3 and BitFit train a few steps (BitFit on a Qwen2-layout config, whose
    attention projections have biases; random weights from a bare config.json)."""
    import torch
    import transformers

    from tests.launch.saved_model import tokenizer

    tok = tokenizer()
    model_dir = tmp_path / "model"
    cfg = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    summary, records, _ = _launch(tmp_path, model_dir, dataset, f"ft-{method}", "--method", method, "--steps", "8",
                                  "--lr", "5e-2")
    assert summary["status"] == "succeeded" and [r["step"] for r in records] == list(range(1, 9))
    losses = [r["loss"] for r in records]
    assert sum(losses[-2:]) < sum(losses[:2])
