# Set-up and entry points. `make test` and `make demo` each build .venv from
# nothing on a fresh machine. torch is installed first, pinned, so that the
# package's bare `torch` requirement is already met. Where pip has no local CPU
# wheel of torch, pass TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to
# take the CPU build instead of PyPI's CUDA one (several GB of packages).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install -q -e ".[test,el]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/train.py --config recipes/configs/demo.yaml

bench: $(STAMP)
	$(PIP) install -q -e ".[bench]"
	$(PIP) install -q --no-deps curvlinops-for-pytorch==3.0.1
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
