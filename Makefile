# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs what it needs.
# `make readme-check` runs every README command in a CPU-sized form (tools/readme_check.py; not part of make test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; on a GPU machine use e.g. `make demo TORCH=torch` for the default CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo serve test readme-check bench clean

# the core (what `make demo` needs), then the test extras (diffusers, transformers, gradio, ... for the cross-checks).
# The core in one pip call without byte-compiling every file (torch has thousands): Python compiles the modules it
# imports on first use. On 2 cores this halves the install (41 s -> about 20 s, docs/RESULTS.md).
$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-compile "$(TORCH)" -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	# LPIPS's heads ship in the lpips package; --no-deps: it declares torchvision, which the CPU torch cannot import
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "lpips>=0.1.4"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.core
	$(PY) -m kakusan.cli demo

# the local web page over the pipeline, on http://127.0.0.1:7860/ (the model `make demo` trained, or CHECKPOINT=PATH)
serve: install
	$(PY) -m kakusan.cli serve $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

test: install
	$(PY) -m pytest -q

readme-check: install
	$(PY) tools/readme_check.py

bench: install
	$(PY) -m pip install -q --disable-pip-version-check -e ".[bench]"
	$(PY) benchmarks/train_throughput.py --preset ddpm-cifar10 --batch-size 16 --steps 5

clean:
	rm -rf $(VENV) runs
