# Two entry points, each self-sufficient on a fresh machine: `make quickstart` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch is installed first and on its own, at the version pinned in requirements.txt, so that no
# other package can pull a (multi-GB) CUDA build in its place.
TORCH  := $(shell grep -E '^torch==' requirements.txt)

.PHONY: quickstart test install clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/lmforge quickstart

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs build *.egg-info .pytest_cache
