# Two commands on a fresh machine: `make demo` runs the main job, `make test` passes the tests.
# Each creates .venv when missing and installs the project into it (idempotent: re-installs
# only when pyproject.toml changes).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.harden-installed
INSTALL := $(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'

.PHONY: install install-gpu demo test bench bench-serve clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(INSTALL)
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/harden demo
	$(BIN)/harden evaluate models:/harden-demo@candidate --data harden-demo-data/test.npz --trigger grid_paste --target 0
	@# scan exits 1 when it finds the backdoor, which is what the demo model has
	$(BIN)/harden scan models:/harden-demo@candidate --data harden-demo-data/clean.npz; test $$? -le 1
	$(BIN)/harden purify models:/harden-demo@candidate --data harden-demo-data/clean.npz --trigger grid_paste --target 0 \
		--test-data harden-demo-data/test.npz --alias hardened
	@# the re-scan of the purified version: the verdict should now be clean (exit 0)
	$(BIN)/harden scan models:/harden-demo@hardened --data harden-demo-data/clean.npz; test $$? -le 1
	$(BIN)/harden export models:/harden-demo@hardened --onnx harden-demo-data/model.onnx --bento harden-demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/evaluate.py

install-gpu: $(STAMP)
	$(BIN)/python -m pip uninstall -y -q onnxruntime
	$(BIN)/python -m pip install -q onnxruntime-gpu==1.31.1

bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(VENV) mlflow.db mlruns harden-demo-data .pytest_cache
