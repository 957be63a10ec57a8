"""Which model families orch's launch code can split (pure constants; no torch).

- PIPELINE_FAMILIES: model_type values whose Hugging Face models have the Llama layout
  launch/pipeline_model.py cuts into pipeline layers: ``model.model.{embed_tokens, layers, norm,
  rotary_emb}`` and an untied ``model.lm_head``.
- AUTOTP_FAMILIES: those DeepSpeed 0.19 AutoTP shards in training (checked end to end in
  tests/launch/test_launch_tp_pp.py).
"""

PIPELINE_FAMILIES = frozenset({"llama", "mistral", "mixtral", "qwen2"})
AUTOTP_FAMILIES = frozenset({"llama", "mistral", "qwen2"})
