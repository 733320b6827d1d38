# `make demo` and `make test` set everything up first; `make install` alone builds .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to a release that exists on this machine's disk (a CPU build); override for CUDA,
# e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[hf,tb,plot,dev,chat,gguf]'
	touch $@

demo: install
	$(VENV)/bin/minigpt prepare builtin --out $(DEMO_DIR)/data
	rm -rf $(DEMO_DIR)/pretrain
	$(VENV)/bin/minigpt train configs/demo-cpu.toml --out $(DEMO_DIR)/pretrain
	$(VENV)/bin/minigpt plot $(DEMO_DIR)/pretrain --out $(DEMO_DIR)/pretrain/loss.png
	rm -rf $(DEMO_DIR)/sft
	$(VENV)/bin/minigpt sft configs/sft-demo-cpu.toml --init $(DEMO_DIR)/pretrain --out $(DEMO_DIR)/sft
	printf 'Hello!\nWhat do you like to do?\n/exit\n' | \
		$(VENV)/bin/minigpt chat --model $(DEMO_DIR)/sft --seed 0 --max-new-tokens 40

test: install
	$(PY) -m ruff check src tests bench tools
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check src tests bench tools
	$(PY) -m ruff format --check src tests bench tools

clean:
	rm -rf $(VENV) runs
