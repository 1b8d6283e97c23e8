# Two entry points, both from a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
PY = $$(tools/setup.sh)/bin/python

.PHONY: setup demo test test-system lint

setup:
	@tools/setup.sh >/dev/null

demo: setup
	@V=$$(tools/setup.sh); $$V/bin/edgekd compress --target cpu

test-system:
	@tools/system_deps.sh

test: setup test-system
	@V=$$(tools/setup.sh); $$V/bin/python -m pytest -q tests

lint: setup
	@V=$$(tools/setup.sh); $$V/bin/ruff check edgekd tests tools
