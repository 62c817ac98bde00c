# Two entry points, each self-sufficient on a fresh machine: `make quickstart` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch is installed first and on its own, at the version pinned in requirements.txt, so that no
# other package can pull a (multi-GB) CUDA build in its place.
TORCH  := $(shell grep -E '^torch==' requirements.txt)

.PHONY: quickstart test install browser clean

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

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

# The chat-page tests drive Debian's chromium with playwright (never `playwright install`).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null) || \
		echo "warning: could not install chromium; the browser tests will be skipped"

clean:
	rm -rf runs build *.egg-info .pytest_cache
