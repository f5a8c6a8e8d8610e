"""A sandbox in its own Kubernetes pod, so production runs tools away from the control plane.

The control plane talks to the Kubernetes REST API with httpx (no client library): it creates a
pod running the sandbox agent (``tools.sandbox.agent``), waits until the pod is Ready, and then
calls the agent through the API server's pod proxy (``.../pods/<name>:<port>/proxy/...``), so it
needs no route to the pod network; ``via="pod_ip"`` talks to the pod IP directly instead.
Closing deletes the pod. RBAC needed: ``pods`` create / get / delete, ``pods/proxy`` get and
create (see docs/sandboxes-kubernetes.md).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from tools.sandbox.agent import TOKEN_HEADER
from tools.sandbox.base import ExecResult, FileEntry, Limits, Sandbox, SandboxError, SandboxInfo

AGENT_PORT = 8088
SA_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SA_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
_STUCK = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CrashLoopBackOff",
          "CreateContainerConfigError", "CreateContainerError"}


@dataclass
class KubernetesSandboxConfig:
    """Where and how sandbox pods run. In a cluster the defaults read the service account."""

    api_url: str = "https://kubernetes.default.svc"
    namespace: str = "default"
    image: str = "ghcr.io/agentic-orchestrator/orchestrator:latest"
    token: str | None = None
    token_file: str | None = SA_TOKEN_FILE
    ca_file: str | None = SA_CA_FILE
    verify: bool = True
    resources: dict[str, str] = field(default_factory=lambda: {"cpu": "1", "memory": "1Gi",
                                                                "ephemeral-storage": "1Gi"})
    workspace_size: str = "1Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    service_account: str | None = None
    runtime_class_name: str | None = None  # e.g. "gvisor" for a user-space kernel
    labels: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 120.0
    active_deadline_s: int = 24 * 3600
    poll_interval_s: float = 0.5
    via: Literal["proxy", "pod_ip"] = "proxy"


def pod_name(program_id: str) -> str:
    """A DNS-1123 name from any program id, unique by a digest suffix."""
    base = re.sub(r"[^a-z0-9-]+", "-", program_id.lower()).strip("-")[:40] or "p"
    return f"sbx-{base}-{hashlib.sha256(program_id.encode()).hexdigest()[:8]}"


def pod_manifest(config: KubernetesSandboxConfig, name: str, program_id: str, token: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "orchestrator-sandbox", "app.kubernetes.io/managed-by": "orchestrator",
              "orchestrator/program-id": pod_name(program_id)[4:], **config.labels}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "activeDeadlineSeconds": config.active_deadline_s,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534, "fsGroup": 65534,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "sandbox",
            "image": config.image,
            "command": ["python", "-m", "tools.sandbox.agent", "--port", str(AGENT_PORT),
                        "--workspace", "/workspace"],
            "env": [{"name": "SANDBOX_TOKEN", "value": token}],
            "ports": [{"name": "agent", "containerPort": AGENT_PORT}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": AGENT_PORT}, "periodSeconds": 1},
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
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": config.namespace,
                                                          "labels": labels}, "spec": spec}


def sandbox_network_policy(namespace: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Deny all egress from sandbox pods (the pod-level "no network"); ingress only to the agent port."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "orchestrator-sandbox-deny-egress", "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": labels or {"app.kubernetes.io/name": "orchestrator-sandbox"}},
                     "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"ports": [{"protocol": "TCP", "port": AGENT_PORT}]}],
                     "egress": []}}


class KubernetesSandboxFactory:
    """``await factory(program_id)`` creates the program's pod and waits for it (a pool factory)."""

    def __init__(self, config: KubernetesSandboxConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        token = config.token
        if token is None and config.token_file and Path(config.token_file).exists():
            token = Path(config.token_file).read_text().strip()
        verify: Any = config.verify
        if verify and config.ca_file and Path(config.ca_file).exists():
            verify = config.ca_file
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=config.api_url.rstrip("/"), headers=headers, verify=verify,
                                      timeout=httpx.Timeout(30.0, connect=5.0), transport=transport)

    async def __call__(self, program_id: str) -> "KubernetesSandbox":
        c = self.config
        name = pod_name(program_id)
        token = secrets.token_urlsafe(32)
        pods = f"/api/v1/namespaces/{c.namespace}/pods"
        resp = await self._api("POST", pods, json=pod_manifest(c, name, program_id, token))
        if resp.status_code == 409:
            raise SandboxError(f"pod {name} already exists in namespace {c.namespace}")
        _check(resp, f"create pod {name}")
        sandbox = KubernetesSandbox(self, name, program_id, token)
        try:
            pod_ip = await self._wait_ready(name)
        except BaseException:
            await sandbox.close()
            raise
        sandbox.pod_ip = pod_ip
        return sandbox

    async def _api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return await self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise SandboxError(f"Kubernetes API at {self.config.api_url} unreachable: {exc}") from exc

    async def _wait_ready(self, name: str) -> str | None:
        c = self.config
        deadline = time.monotonic() + c.startup_timeout_s
        last = "Pending"
        while time.monotonic() < deadline:
            resp = await self._api("GET", f"/api/v1/namespaces/{c.namespace}/pods/{name}")
            _check(resp, f"read pod {name}")
            status = resp.json().get("status", {})
            phase = status.get("phase", "Pending")
            for cs in status.get("containerStatuses", []) or []:
                reason = (cs.get("state", {}).get("waiting") or {}).get("reason")
                if reason in _STUCK:
                    raise SandboxError(f"sandbox pod {name} cannot start: {reason}"
                                       f" ({(cs['state']['waiting'].get('message') or '').strip()})")
            for cond in status.get("conditions", []) or []:
                if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason"):
                    last = f"{cond['reason']}: {cond.get('message', '')}".strip()
                if cond.get("type") == "Ready" and cond.get("status") == "True" and phase == "Running":
                    return status.get("podIP")
            if phase in ("Failed", "Succeeded"):
                raise SandboxError(f"sandbox pod {name} ended before it was ready ({phase}: "
                                   f"{status.get('reason') or status.get('message') or 'no reason given'})")
            last = last if last != "Pending" else phase
            await asyncio.sleep(c.poll_interval_s)
        raise SandboxError(f"sandbox pod {name} not ready after {c.startup_timeout_s:g} s (last seen: {last})")


def _check(resp: httpx.Response, what: str) -> None:
    if resp.status_code in (401, 403):
        raise SandboxError(f"Kubernetes API refused to {what} ({resp.status_code}): check the service account's "
                           f"RBAC (pods: create/get/delete, pods/proxy: get/create). {_message(resp)}")
    if resp.status_code >= 400:
        raise SandboxError(f"Kubernetes API failed to {what} ({resp.status_code}): {_message(resp)}")


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("message", ""))[:300]
    except ValueError:
        return resp.text[:300]


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
        self._disk = 0

    def _url(self, path: str) -> str:
        c = self.factory.config
        if c.via == "pod_ip" and self.pod_ip:
            return f"http://{self.pod_ip}:{AGENT_PORT}{path}"
        return f"/api/v1/namespaces/{c.namespace}/pods/{self.name}:{AGENT_PORT}/proxy{path}"

    async def _call(self, method: str, path: str, *, timeout: float = 30.0, **kw: Any) -> httpx.Response:
        if self._closed:
            raise SandboxError("the sandbox is closed")
        resp = await self.factory._api(method, self._url(path), headers={TOKEN_HEADER: self._token},
                                       timeout=timeout, **kw)
        if resp.status_code == 400:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            raise SandboxError(body.get("error") or body.get("message") or resp.text[:300])
        _check(resp, f"reach sandbox pod {self.name}")
        return resp

    async def exec(self, argv: list[str], *, stdin: bytes | None = None, limits: Limits | None = None,
                   env: dict[str, str] | None = None) -> ExecResult:
        lim = limits or self.limits
        body = {"argv": argv, "limits": dataclasses.asdict(lim), "env": env,
                "stdin_b64": base64.b64encode(stdin).decode() if stdin is not None else None}
        resp = await self._call("POST", "/exec", json=body, timeout=lim.wall_s + 30)
        return ExecResult(**resp.json())

    async def read_file(self, path: str, *, max_bytes: int = 1 << 20) -> bytes:
        return (await self._call("GET", "/file", params={"path": path, "max_bytes": max_bytes})).content

    async def write_file(self, path: str, data: bytes) -> None:
        await self._call("PUT", "/file", params={"path": path}, content=data)

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
        if self._closed:
            return
        self._closed = True
        c = self.factory.config
        resp = await self.factory._api("DELETE", f"/api/v1/namespaces/{c.namespace}/pods/{self.name}",
                                       params={"gracePeriodSeconds": 0})
        if resp.status_code != 404:
            _check(resp, f"delete pod {self.name}")

    def info(self) -> SandboxInfo:
        return SandboxInfo(self.id, "kubernetes", "/workspace/w", self._disk,
                           {"pod": self.name, "namespace": self.factory.config.namespace})
