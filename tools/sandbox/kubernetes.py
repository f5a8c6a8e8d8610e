"""A sandbox in its own Kubernetes pod, so production runs tools away from the control plane.

The control plane talks to the Kubernetes REST API with httpx (no client library, so no heavy
dependency and every call is visible here): it creates a Secret holding a fresh per-pod token and
a pod running the sandbox agent (``tools.sandbox.agent``), waits until the pod is Ready, and then
calls the agent through the API server's pod proxy (``.../pods/<name>:<port>/proxy/...``), so it
needs no route to the pod network; ``via="pod_ip"`` calls the pod IP directly instead. Closing
deletes the pod and its Secret. A pod left by a control plane that died (same program id) is
adopted, so a resumed run finds its workspace, as with the subprocess sandbox.

RBAC needed in the sandbox namespace: ``pods`` create / get / delete, ``pods/proxy`` get / create,
``secrets`` create / get / delete (see docs/sandboxes-kubernetes.md).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import re
import secrets
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from tools.sandbox.agent import TOKEN_ENV, TOKEN_HEADER
from tools.sandbox.base import ExecResult, FileEntry, Limits, Sandbox, SandboxError, SandboxInfo

AGENT_PORT = 8088
SA_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SA_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
SANDBOX_LABELS = {"app.kubernetes.io/name": "orchestrator-sandbox", "app.kubernetes.io/managed-by": "orchestrator"}
# Container waiting reasons that will not fix themselves within a start-up timeout.
_STUCK = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CrashLoopBackOff",
          "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
_EXEC_FIELDS = {f.name for f in dataclasses.fields(ExecResult)}


@dataclass
class KubernetesSandboxConfig:
    """Where and how sandbox pods run. In a cluster the defaults read the service account."""

    api_url: str = "https://kubernetes.default.svc"
    namespace: str = "default"
    image: str = "ghcr.io/agentic-orchestrator/orchestrator:latest"
    token: str | None = None                    # the API bearer token; else read from token_file
    token_file: str | None = SA_TOKEN_FILE      # re-read when it changes (projected tokens rotate)
    ca_file: str | None = SA_CA_FILE
    verify: bool = True
    resources: dict[str, str] = field(default_factory=lambda: {"cpu": "1", "memory": "1Gi",
                                                                "ephemeral-storage": "2Gi"})
    workspace_size: str = "1Gi"                 # the workspace emptyDir's sizeLimit
    node_selector: dict[str, str] = field(default_factory=dict)
    service_account: str | None = None          # the pod's own (its token is never mounted)
    runtime_class_name: str | None = None       # e.g. "gvisor" for a user-space kernel
    labels: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 120.0
    active_deadline_s: int = 24 * 3600          # the kubelet ends a pod that outlives this
    poll_interval_s: float = 0.5
    via: Literal["proxy", "pod_ip"] = "proxy"
    agent_port: int = AGENT_PORT
    token_secret: bool = True                   # False: the pod token as a plain env value in the spec


def pod_name(program_id: str) -> str:
    """A DNS-1123 name from any program id, unique by a digest suffix, stable so it can be adopted."""
    base = re.sub(r"[^a-z0-9-]+", "-", program_id.lower()).strip("-")[:40].strip("-") or "p"
    return f"sbx-{base}-{hashlib.sha256(program_id.encode()).hexdigest()[:8]}"


def secret_name(pod: str) -> str:
    return f"{pod}-token"


def _labels(config: KubernetesSandboxConfig, name: str) -> dict[str, str]:
    # A label value is at most 63 characters of [A-Za-z0-9-_.]: the pod name's program part
    # fits; the raw program id goes into an annotation.
    return {**SANDBOX_LABELS, "orchestrator/program-id": name[4:], **config.labels}


def secret_manifest(config: KubernetesSandboxConfig, name: str, program_id: str, token: str) -> dict[str, Any]:
    """The Secret holding the pod's agent token (readable only with RBAC on secrets, unlike a pod spec)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": secret_name(name), "namespace": config.namespace,
                         "labels": _labels(config, name), "annotations": {"orchestrator/program-id": program_id}},
            "stringData": {"token": token}}


def pod_manifest(config: KubernetesSandboxConfig, name: str, program_id: str, token: str) -> dict[str, Any]:
    """The sandbox pod: the agent as a non-root user with nothing extra, a size-limited workspace."""
    port = config.agent_port
    if config.token_secret:
        token_env: dict[str, Any] = {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {
            "name": secret_name(name), "key": "token"}}}
    else:
        token_env = {"name": TOKEN_ENV, "value": token}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "activeDeadlineSeconds": config.active_deadline_s,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 0,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534, "fsGroup": 65534,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "sandbox",
            "image": config.image,
            "command": ["python", "-m", "tools.sandbox.agent", "--port", str(port), "--workspace", "/workspace"],
            "env": [token_env, {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
            "ports": [{"name": "agent", "containerPort": port, "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 1},
            "resources": {"requests": dict(config.resources), "limits": dict(config.resources)},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"},
                             {"name": "tmp", "mountPath": "/tmp"}],
        }],
        "volumes": [{"name": "workspace", "emptyDir": {"sizeLimit": config.workspace_size}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
    }
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.service_account:
        spec["serviceAccountName"] = config.service_account
    if config.runtime_class_name:
        spec["runtimeClassName"] = config.runtime_class_name
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": config.namespace, "labels": _labels(config, name),
                         "annotations": {"orchestrator/program-id": program_id}},
            "spec": spec}


def sandbox_network_policy(namespace: str, labels: dict[str, str] | None = None, *,
                           agent_port: int = AGENT_PORT,
                           name: str = "orchestrator-sandbox-deny-egress") -> dict[str, Any]:
    """Deny all egress from sandbox pods (the pod-level "no network"), DNS included; admit ingress
    only to the agent port (the API server's proxy or the control plane calls it there)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": dict(labels or {"app.kubernetes.io/name":
                                                                    SANDBOX_LABELS["app.kubernetes.io/name"]})},
                     "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"ports": [{"protocol": "TCP", "port": agent_port}]}],
                     "egress": []}}


class _BearerAuth(httpx.Auth):
    """The API token: a fixed one, or the service-account file, re-read when it changes because
    projected tokens are rotated by the kubelet (reading it once would fail after expiry)."""

    def __init__(self, token: str | None, token_file: str | None) -> None:
        self.token, self.token_file = token, token_file
        self._stamp: tuple[float, int] | None = None
        self._cached: str | None = None

    def current(self) -> str | None:
        if self.token is not None or not self.token_file:
            return self.token
        try:
            st = os.stat(self.token_file)
        except OSError:
            return None
        if self._stamp != (st.st_mtime, st.st_size):
            with open(self.token_file) as fh:
                self._cached = fh.read().strip()
            self._stamp = (st.st_mtime, st.st_size)
        return self._cached

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.current()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request


class KubernetesSandboxFactory:
    """``await factory(program_id)`` creates (or adopts) the program's pod and waits for it; a
    pool factory. Give a ``KubernetesSandboxConfig`` or its fields as keywords."""

    def __init__(self, config: KubernetesSandboxConfig | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None, **options: Any) -> None:
        self.config = config = dataclasses.replace(config, **options) if config else KubernetesSandboxConfig(**options)
        verify: Any = config.verify
        if verify and config.ca_file and os.path.exists(config.ca_file):
            verify = config.ca_file
        self.http = httpx.AsyncClient(base_url=config.api_url.rstrip("/"), auth=_BearerAuth(config.token,
                                      config.token_file), verify=verify, transport=transport,
                                      timeout=httpx.Timeout(30.0, connect=5.0))
        # Direct pod-IP calls get a client of their own: the API credential must never reach a pod.
        self.pod_http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0))

    def _path(self, kind: str, name: str = "") -> str:
        return f"/api/v1/namespaces/{self.config.namespace}/{kind}" + (f"/{name}" if name else "")

    async def __call__(self, program_id: str) -> KubernetesSandbox:
        c = self.config
        name = pod_name(program_id)
        token = secrets.token_urlsafe(32)
        old_secret = False
        if c.token_secret:
            resp = await self.api("POST", self._path("secrets"), json=secret_manifest(c, name, program_id, token))
            if resp.status_code == 409:  # left by a control plane that died: its pod may live on
                token, old_secret = await self._secret_token(name), True
            else:
                _check(resp, f"create secret {secret_name(name)}")
        sandbox = KubernetesSandbox(self, name, program_id, token)
        try:
            await self._create_pod(sandbox, old_secret)
            sandbox.pod_ip = await self._wait_ready(name)
            if c.via == "pod_ip" and not sandbox.pod_ip:
                raise SandboxError(f"sandbox pod {name} is ready but has no pod IP")
        except BaseException as exc:
            try:
                await asyncio.shield(sandbox.close())
            except SandboxError as cleanup:  # e.g. no RBAC to delete either: report the first error
                exc.add_note(f"and cleaning up failed: {cleanup}")
            raise
        return sandbox

    async def _create_pod(self, sandbox: KubernetesSandbox, old_secret: bool) -> None:
        """POST the pod; on a conflict, adopt the old pod if it still runs and its token is known
        (a plain env value, or the Secret that was there before), else replace it."""
        c, name = self.config, sandbox.name
        deadline = time.monotonic() + c.startup_timeout_s
        while True:
            manifest = pod_manifest(c, name, sandbox.id, sandbox._token)
            resp = await self.api("POST", self._path("pods"), json=manifest)
            if resp.status_code != 409:
                _check(resp, f"create pod {name}")
                return
            if time.monotonic() > deadline:
                raise SandboxError(f"stale sandbox pod {name} is still being deleted (timeout)")
            old = await self.api("GET", self._path("pods", name))
            if old.status_code != 404:  # (404: deleted meanwhile, create again)
                _check(old, f"read pod {name}")
                pod = old.json()
                token = _pod_token(pod, sandbox._token if old_secret else None)
                live = (pod.get("status") or {}).get("phase", "Pending") in ("Pending", "Running")
                if live and token and not pod["metadata"].get("deletionTimestamp"):
                    sandbox._token = token
                    return
                await self._delete(self._path("pods", name), f"delete stale pod {name}")
            await asyncio.sleep(c.poll_interval_s)

    async def _secret_token(self, name: str) -> str:
        resp = await self.api("GET", self._path("secrets", secret_name(name)))
        _check(resp, f"read secret {secret_name(name)}")
        try:
            return base64.b64decode(resp.json()["data"]["token"]).decode()
        except (KeyError, ValueError, TypeError) as exc:
            raise SandboxError(f"secret {secret_name(name)} holds no token") from exc

    async def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One call to the API server; unreachable becomes ``SandboxError``."""
        try:
            return await self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise SandboxError(f"Kubernetes API at {self.config.api_url} unreachable: {exc!r}") from exc

    async def _delete(self, path: str, what: str) -> None:
        resp = await self.api("DELETE", path, params={"gracePeriodSeconds": 0})
        if resp.status_code != 404:
            _check(resp, what)

    async def _wait_ready(self, name: str) -> str | None:
        """Poll until Running and Ready (its pod IP), or fail naming why it is not."""
        c = self.config
        deadline = time.monotonic() + c.startup_timeout_s
        last = "no status yet"
        while True:
            resp = await self.api("GET", self._path("pods", name))
            _check(resp, f"read pod {name}")
            status = resp.json().get("status") or {}
            phase = status.get("phase") or "Pending"
            last = phase
            for cs in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or []):
                waiting = (cs.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in _STUCK:
                    raise SandboxError(f"sandbox pod {name} cannot start: {waiting['reason']}"
                                       f" ({(waiting.get('message') or '').strip()})")
            for cond in status.get("conditions") or []:
                if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason"):
                    last = f"{cond['reason']}: {cond.get('message') or ''}".strip()
                if cond.get("type") == "Ready" and cond.get("status") == "True" and phase == "Running":
                    return status.get("podIP")
            if phase in ("Failed", "Succeeded"):
                raise SandboxError(f"sandbox pod {name} ended before it was ready ({phase}: "
                                   f"{status.get('reason') or status.get('message') or 'no reason given'})")
            if time.monotonic() >= deadline:
                raise SandboxError(f"sandbox pod {name} not ready after {c.startup_timeout_s:g} s "
                                   f"(timeout; last seen: {last})")
            await asyncio.sleep(min(c.poll_interval_s, max(0.0, deadline - time.monotonic())))

    async def aclose(self) -> None:
        """Close the HTTP clients (the pods are the sandboxes' to delete)."""
        await self.http.aclose()
        await self.pod_http.aclose()


def _pod_token(pod: dict[str, Any], from_secret: str | None) -> str | None:
    """The agent token of an existing pod: a plain env value in its spec, or the Secret's."""
    for container in pod.get("spec", {}).get("containers", []):
        for env in container.get("env") or []:
            if env.get("name") == TOKEN_ENV:
                return env.get("value") or (from_secret if "valueFrom" in env else None)
    return None


def _check(resp: httpx.Response, what: str) -> None:
    """An API server error as ``SandboxError``; 401/403 point at the service account's RBAC."""
    if resp.status_code in (401, 403):
        raise SandboxError(f"Kubernetes API refused to {what} ({resp.status_code}): check the control plane's "
                           f"credentials and RBAC (pods: create/get/delete, pods/proxy: get/create, "
                           f"secrets: create/get/delete). {_message(resp)}")
    if resp.status_code >= 400:
        raise SandboxError(f"Kubernetes API failed to {what} ({resp.status_code}): {_message(resp)}")


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _message(resp: httpx.Response) -> str:
    body = _json(resp)
    return str(body.get("message") or resp.text)[:300]


class KubernetesSandbox(Sandbox):
    """One program's pod. Operations are HTTP calls to its agent."""

    def __init__(self, factory: KubernetesSandboxFactory, name: str, program_id: str, token: str) -> None:
        self.factory = factory
        self.id = program_id
        self.name = name
        self.limits = Limits()
        self.pod_ip: str | None = None
        self._token = token
        self._closed = False
        self._deleted = False
        self._close_lock = asyncio.Lock()
        self._disk = 0

    async def _call(self, method: str, path: str, *, timeout: float = 30.0,  # noqa: ASYNC109 (httpx's)
                    **kw: Any) -> httpx.Response:
        if self._closed:
            raise SandboxError("the sandbox is closed")
        c = self.factory.config
        if c.via == "pod_ip":
            url = f"http://{self.pod_ip}:{c.agent_port}{path}"
            try:
                resp = await self.factory.pod_http.request(method, url, timeout=timeout, headers={
                    "Authorization": f"Bearer {self._token}"}, **kw)
            except httpx.HTTPError as exc:
                raise SandboxError(f"sandbox pod {self.name} at {self.pod_ip} unreachable: {exc!r}") from exc
        else:
            url = f"{self.factory._path('pods', self.name)}:{c.agent_port}/proxy{path}"
            resp = await self.factory.api(method, url, timeout=timeout, headers={TOKEN_HEADER: self._token}, **kw)
        if resp.status_code < 400:
            return resp
        body = _json(resp)
        if "error" in body:  # the agent's own answer (the API server's errors are Status objects)
            if resp.status_code == 400:
                raise SandboxError(str(body["error"]))
            raise SandboxError(f"sandbox agent in pod {self.name} answered {resp.status_code}: {body['error']}")
        _check(resp, f"reach sandbox pod {self.name}")
        raise AssertionError("unreachable")

    async def exec(self, argv: list[str], *, stdin: bytes | None = None, limits: Limits | None = None,
                   env: dict[str, str] | None = None) -> ExecResult:
        lim = limits or self.limits
        body = {"argv": argv, "limits": dataclasses.asdict(lim), "env": env,
                "stdin_b64": base64.b64encode(stdin).decode() if stdin is not None else None}
        resp = await self._call("POST", "/exec", json=body, timeout=lim.wall_s + 30)
        return ExecResult(**{k: v for k, v in resp.json().items() if k in _EXEC_FIELDS})

    async def read_file(self, path: str, *, max_bytes: int = 1 << 20) -> bytes:
        return (await self._call("GET", "/file", params={"path": path, "max_bytes": max_bytes})).content

    async def write_file(self, path: str, data: bytes) -> None:
        await self._call("POST", "/file", params={"path": path}, content=data)

    async def list_files(self, path: str = ".", *, recursive: bool = False, limit: int = 1000) -> list[FileEntry]:
        resp = await self._call("GET", "/files", params={"path": path, "recursive": str(recursive).lower(),
                                                         "limit": limit})
        return [FileEntry(**e) for e in resp.json()]

    async def disk_bytes(self) -> int:
        self._disk = int((await self._call("GET", "/disk")).json()["bytes"])
        return self._disk

    async def kill(self) -> None:
        await self._call("POST", "/kill")

    async def close(self) -> None:
        """Delete the pod (no grace period) and its Secret. Idempotent; a failed delete is retried
        by the next call (meanwhile ``activeDeadlineSeconds`` bounds a leaked pod's life)."""
        self._closed = True
        async with self._close_lock:
            if self._deleted:
                return
            f = self.factory
            await f._delete(f._path("pods", self.name), f"delete pod {self.name}")
            if f.config.token_secret:
                await f._delete(f._path("secrets", secret_name(self.name)), f"delete secret of pod {self.name}")
            self._deleted = True

    def info(self) -> SandboxInfo:
        return SandboxInfo(self.id, "kubernetes", "/workspace/w", self._disk,
                           {"pod": self.name, "namespace": self.factory.config.namespace})
