# Two entry points, each creating .venv when it is missing:
#   make demo   builds a small study from the shipped example tiles, trains and evaluates (offline)
#   make test   runs the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/histomil demo --out demo_run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf demo_run .pytest_cache
