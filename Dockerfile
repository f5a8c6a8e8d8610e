# syntax=docker/dockerfile:1
# The control-plane image the Helm chart runs by default (deploy/helm/orchestrator): the
# service (`orchestrator serve`), its migrations (`orchestrator migrate`), the Kubernetes
# tool-sandbox agent (`python -m tools.sandbox.agent`) and the SGLang simulator
# (`python -m scheduler.sim.server`, the dev profile's backend).
#   docker build -t ghcr.io/agentic-orchestrator/orchestrator:0.1.0 .
# Not in the image: the local CPU engine (torch, the SmolLM2 weights); in a cluster the
# engines are SGLang pods.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with the project and its dependencies ---------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first (a layer that survives code changes), then the code.
COPY pyproject.toml README.md ./
COPY sdk/ sdk/
COPY orchestrator/ orchestrator/
COPY scheduler/ scheduler/
COPY tools/ tools/
COPY agents/ agents/
COPY evolve/ evolve/
RUN /opt/venv/bin/pip install --no-cache-dir ./sdk . \
 && /opt/venv/bin/python -c "import orchestrator.cli, orchestrator_sdk, scheduler.sim.server, tools.sandbox.agent" \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# --- runtime: the same Python, the venv, a non-root user; no compilers, no pip cache ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="orchestrator" \
      org.opencontainers.image.description="Program-aware control plane for LLM agents in front of SGLang" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/agentic-orchestrator/orchestrator"
RUN groupadd --system --gid 10001 orchestrator \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/orchestrator --create-home \
      --shell /usr/sbin/nologin orchestrator \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORCH_HOST=0.0.0.0 \
    ORCH_PORT=8080 \
    ORCH_DATABASE_URL=sqlite+aiosqlite:////data/orchestrator.db \
    ORCH_SANDBOX_ROOT=/data/sandboxes
USER 10001:10001
WORKDIR /home/orchestrator
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["orchestrator"]
CMD ["serve"]
