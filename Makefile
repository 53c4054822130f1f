# Two commands set up a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs everything from scratch if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel for dev/CI. On MLU servers torch comes with Cambricon's container: use
# `pip install -e .` there, never this target's pin.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all venv predictor profile-cpu serve-emulated clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,plot,server]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/odma-mlu bench

test: venv
	$(PY) -m pytest -q -m "not slow and not cuda and not mlu"

test-all: venv
	$(PY) -m pytest -q

predictor: venv
	$(VENV)/bin/odma-mlu predictor train --data ../shared/data/lengths/alpaca_vicuna7b_train.jsonl --out odma_mlu/predictor/default

profile-cpu: venv
	$(VENV)/bin/odma-mlu profile-bandwidth --backend cpu --out device_profiles/cpu-host.yaml --plot docs/img/cpu-host-bandwidth.png

# The emulator-mode server on CPU (no accelerator): a tiny random Qwen2 folder, then serve.
serve-emulated: venv
	test -f out/tiny-qwen2/config.json || $(PY) tools/make_tiny_model.py out/tiny-qwen2
	$(VENV)/bin/odma-mlu serve --config deploy/emulator-cpu.yaml

clean:
	rm -rf $(VENV) build *.egg-info
