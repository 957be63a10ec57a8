# Two commands do everything on a fresh machine (see README):
#   make demo   set up, then run the main job on the embedded default
#   make test   set up, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ORCH := $(VENV)/bin/orch
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo finetune-demo test bench clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build (shared/ENVIRONMENT.md).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The main job: plan Llama 3.1 70B on 64 H100s (dry run), then plan and really train the debug model
# with DeepSpeed on an embedded local Ray cluster (2 CPU workers, ZeRO-2, checkpoints).
demo: setup
	$(ORCH) plan --model llama3.1-70b --cluster h100-8x8-ib
	$(ORCH) launch --model debug --cluster cpu-2 --zero 2 --seq-len 128 --steps 30 --lr 1e-3 \
		--checkpoint-every 10 --checkpoint-dir .orch-demo --name demo-$$(date +%Y%m%d-%H%M%S)
	$(MAKE) finetune-demo

# QLoRA of a saved model (a small Llama-layout model with its own tokenizer and chat template,
# written here: this machine has no model hub) on a chat dataset, then its adapter exported.
finetune-demo: setup
	$(PY) -m tests.launch.saved_model .orch-demo/data
	name=qlora-$$(date +%Y%m%d-%H%M%S); \
	$(ORCH) launch --model .orch-demo/data/llama --gpu cpu --gpus 2 --method qlora --dataset .orch-demo/data/chat.jsonl \
		--seq-len 64 --steps 30 --lr 5e-3 --checkpoint-every 10 --checkpoint-dir .orch-demo --name $$name && \
	$(ORCH) export $$name --checkpoint-dir .orch-demo --out .orch-demo/$$name-adapter

# Debian's prometheus (the monitoring tests run a real server); sudo only when not root.
system-deps:
	bash .ci/install-prometheus

test: setup system-deps
	$(VENV)/bin/pytest tests

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info
