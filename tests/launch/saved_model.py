"""A small saved Llama-layout model with its own tokenizer (a byte-level BPE trained here, with a
chat template), and chat / prompt-completion datasets: what a user fine-tunes, built offline."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<|end|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
FACTS = [("What colour is the sky?", "The sky is blue."), ("What is two plus two?", "Two plus two is four."),
         ("Name a fruit.", "An apple is a fruit."), ("Where do fish live?", "Fish live in water."),
         ("What do bees make?", "Bees make honey."), ("What is ice?", "Ice is frozen water.")]


def chat_records(n: int = 48) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": FACTS[i % len(FACTS)][0]},
                          {"role": "assistant", "content": FACTS[i % len(FACTS)][1]}]} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tokenizer(vocab_size: int = 384):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer trained on the facts, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [q + " " + a for q, a in FACTS] * 20 + ["Answer briefly. system user assistant"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def saved_llama(directory: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """save_pretrained of a random small Llama and its tokenizer in ``directory``."""
    import torch
    import transformers

    tok = tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


if __name__ == "__main__":  # `python -m tests.launch.saved_model DIR`: the fine-tuning demo's model and data
    import os
    import sys

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # transformers imports deepspeed, which would warn it found no GPU
    import transformers

    transformers.utils.logging.disable_progress_bar()
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    saved_llama(out / "llama", layers=2, hidden=128)
    write_jsonl(out / "chat.jsonl", chat_records())
    print(f"wrote {out / 'llama'} (save_pretrained weights and tokenizer) and {out / 'chat.jsonl'} (chat records)")
