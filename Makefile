# Quickstart: `make demo` (set up, fetch real assets, train the embedded default) and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_WORKERS ?= 2

GEMMA   := .venv-gemma
# gemma==3.3.0's linen model without tensorflow: the library --no-deps plus what its model
# modules import, in a side venv that reads .venv's packages (tests/third_party/test_gemma.py).
GEMMA_PKGS := gemma==3.3.0 kauldron==1.4.2 chex==0.1.92 clu==0.0.12 einops==0.8.2 \
	immutabledict==4.3.1 jaxtyping==0.3.11 wadler_lindig==0.1.8 lark==1.3.1 \
	sentencepiece==0.2.3 typeguard==4.6.1 toolz==1.2.0 wrapt==2.5.2
GEMMA_STAMP := $(GEMMA)/.installed-$(shell echo '$(GEMMA_PKGS)' | sha1sum | cut -c1-12)

.PHONY: setup assets test demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,reference]'
	touch $@

setup: $(STAMP)

$(GEMMA_STAMP): $(STAMP)
	test -x $(GEMMA)/bin/python || $(PY) -m venv $(GEMMA)
	$(VPY) -c "import sysconfig; print(\"import site; site.addsitedir('\" + sysconfig.get_paths()['purelib'] + \"')\")" \
		> $$($(GEMMA)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_loraxs_venv.pth
	$(GEMMA)/bin/python -m pip install -q --no-deps $(GEMMA_PKGS)
	touch $@


assets: setup
	$(VPY) -m loraxs_jax.experiments.assets fetch all

test: setup assets $(GEMMA_STAMP)
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
	rm -rf $(VENV) $(GEMMA) build *.egg-info .pytest_cache
