# Quickstart: `make demo` (set up, fetch real assets, train the embedded default) and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_WORKERS ?= 2

.PHONY: setup assets test demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,reference]'
	touch $@

setup: $(STAMP)

assets: setup
	$(VPY) -m loraxs_jax.experiments.assets fetch all

test: setup assets
	$(VPY) -m pytest -q -n $(PYTEST_WORKERS) tests
	$(VPY) -m ruff check loraxs_jax tests benchmarks configs train.py eval.py

demo: setup
	$(VPY) -m loraxs_jax.experiments.assets fetch minilm sst2
	$(VPY) train.py --config=configs/minilm_sst2.py --workdir=runs/demo

bench: setup assets
	$(VPY) -m benchmarks.run_all

lint: setup
	$(VPY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
