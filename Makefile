# Two entry points, each creating .venv when it is missing:
#   make demo   builds a small study from the shipped example tiles, trains and evaluates (offline)
#   make test   runs the test suite
# and one for peer comparisons (benchmarks/peer_torchmil.py), kept out of histomil's own environment:
#   make bench-env   creates .venv-bench with histomil (editable, dev extras) and benchmarks/requirements-peer.txt
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1

BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp

.PHONY: demo test install clean bench-env

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(BENCH_STAMP): pyproject.toml benchmarks/requirements-peer.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' -r benchmarks/requirements-peer.txt
	touch $(BENCH_STAMP)

bench-env: $(BENCH_STAMP)

demo: $(STAMP)
	$(VENV)/bin/histomil demo --out demo_run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto

clean:
	rm -rf demo_run .pytest_cache
