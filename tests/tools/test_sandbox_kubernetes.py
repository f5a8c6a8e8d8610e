"""The Kubernetes pod sandbox against a fake Kubernetes API server on loopback.

The fake implements the few endpoints the client uses (create / read / delete a pod, and the pod
proxy). When a pod "runs", the fake starts the real sandbox agent (``tools.sandbox.agent``) with
the token from the pod's spec, over a real subprocess sandbox, and proxies to it as the API
server would (dropping the client's ``Authorization`` header). What cannot run here: a real
cluster, the image, the kubelet."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tools.sandbox import SandboxError, SubprocessSandbox
from tools.sandbox.agent import create_agent_app
from tools.sandbox.kubernetes import (KubernetesSandboxConfig, KubernetesSandboxFactory, pod_name,
                                      sandbox_network_policy)
from tests.servers import free_port

API_TOKEN = "k8s-sa-token"


class FakeKubernetes:
    def __init__(self, root: Path, mode: str = "ok") -> None:
        self.root = root
        self.mode = mode  # ok | forbidden | imagepull
        self.pods: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.agents: dict[str, tuple[uvicorn.Server, asyncio.Task[None], int, Any]] = {}
        self.deleted: list[str] = []
        self.proxied_auth: list[str | None] = []

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/api/v1/namespaces/{ns}/pods", self.create, methods=["POST"]),
            Route("/api/v1/namespaces/{ns}/pods/{name}", self.read, methods=["GET"]),
            Route("/api/v1/namespaces/{ns}/pods/{name}", self.delete, methods=["DELETE"]),
            Route("/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy/{path:path}", self.proxy,
                  methods=["GET", "POST", "PUT"]),
        ])

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {API_TOKEN}" and self.mode != "forbidden"

    async def create(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"kind": "Status", "message": 'pods is forbidden: User "system:serviceaccount:'
                                 'orch:orchestrator" cannot create resource "pods"'}, status_code=403)
        pod = await request.json()
        name = pod["metadata"]["name"]
        if name in self.pods:
            return JSONResponse({"message": "already exists"}, status_code=409)
        self.pods[name] = pod
        self.polls[name] = 0
        return JSONResponse(pod, status_code=201)

    async def read(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.pods:
            return JSONResponse({"message": "not found"}, status_code=404)
        self.polls[name] += 1
        pod = self.pods[name]
        if self.mode == "imagepull":
            pod["status"] = {"phase": "Pending", "containerStatuses": [{"name": "sandbox", "state": {"waiting": {
                "reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope:1\""}}}]}
        elif self.polls[name] < 3:
            pod["status"] = {"phase": "Pending"}
        else:
            if name not in self.agents:
                await self._start_agent(name, pod)
            pod["status"] = {"phase": "Running", "podIP": "10.0.0.7",
                             "conditions": [{"type": "Ready", "status": "True"}]}
        return JSONResponse(pod)

    async def _start_agent(self, name: str, pod: dict[str, Any]) -> None:
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
        sandbox = await SubprocessSandbox.create(self.root / name, "w")
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_agent_app(sandbox, env["SANDBOX_TOKEN"]), host="127.0.0.1",
                                               port=port, log_config=None, access_log=False))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        self.agents[name] = (server, task, port, sandbox)

    async def delete(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.pods:
            return JSONResponse({"message": "not found"}, status_code=404)
        self.pods.pop(name)
        self.deleted.append(name)
        await self._stop_agent(name)
        return JSONResponse({"kind": "Status", "status": "Success"})

    async def _stop_agent(self, name: str) -> None:
        if name in self.agents:
            server, task, _, sandbox = self.agents.pop(name)
            server.should_exit = True
            await task
            await sandbox.close()

    async def proxy(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"message": "forbidden"}, status_code=403)
        name = request.path_params["name"]
        if name not in self.agents:
            return JSONResponse({"message": "pod not running"}, status_code=503)
        self.proxied_auth.append(request.headers.get("x-sandbox-token"))
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("authorization", "host", "content-length")}
        port = self.agents[name][2]
        async with httpx.AsyncClient(timeout=60) as client:
            resp = await client.request(request.method, f"http://127.0.0.1:{port}/{request.path_params['path']}",
                                        params=request.query_params, content=await request.body(), headers=headers)
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type"))

    async def close(self) -> None:
        for name in list(self.agents):
            await self._stop_agent(name)


@pytest.fixture
async def fake(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[FakeKubernetes, str]]:
    k8s = FakeKubernetes(tmp_path, getattr(request, "param", "ok"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(k8s.app(), host="127.0.0.1", port=port, log_config=None,
                                           access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield k8s, f"http://127.0.0.1:{port}"
    finally:
        await k8s.close()
        server.should_exit = True
        await task


def config(url: str, **kw: Any) -> KubernetesSandboxConfig:
    return KubernetesSandboxConfig(api_url=url, namespace="agents", image="orch:test", token=API_TOKEN,
                                   poll_interval_s=0.05, startup_timeout_s=10, **kw)


async def test_pod_lifecycle_exec_files_kill_and_close(fake: tuple[FakeKubernetes, str]):
    k8s, url = fake
    factory = KubernetesSandboxFactory(config(url, runtime_class_name="gvisor"))
    sb = await factory("run_01ABC/agent")
    name = pod_name("run_01ABC/agent")
    assert sb.name == name and k8s.polls[name] >= 3  # waited through Pending
    pod = k8s.pods[name]
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 65534
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
    assert spec["runtimeClassName"] == "gvisor" and spec["activeDeadlineSeconds"] > 0
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert {"name": "workspace", "emptyDir": {"sizeLimit": "1Gi"}} in spec["volumes"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "orchestrator"

    result = await sb.exec(["/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, "hello\n", "oops\n")
    result = await sb.exec(["python3", "-"], stdin=b"print(6 * 7)")
    assert result.ok and result.stdout == "42\n"
    await sb.write_file("src/a.txt", b"data")
    assert await sb.read_file("src/a.txt") == b"data"
    assert [(e.path, e.is_dir) for e in await sb.list_files(".", recursive=True) if not e.path.startswith(".")] == \
        [("src", True), ("src/a.txt", False)]
    assert await sb.disk_bytes() > 0
    with pytest.raises(SandboxError, match="outside"):
        await sb.read_file("../../etc/passwd")

    slow = asyncio.create_task(sb.exec(["sleep", "30"]))
    await asyncio.sleep(0.5)
    await sb.kill()
    killed = await asyncio.wait_for(slow, 10)
    assert killed.exit_code != 0
    assert set(k8s.proxied_auth) == {sb._token}  # the agent's token, never the API token

    await sb.close()
    await sb.close()  # idempotent
    assert k8s.deleted == [name] and name not in k8s.pods
    with pytest.raises(SandboxError, match="closed"):
        await sb.exec(["true"])
    await factory.http.aclose()


async def test_the_agent_refuses_a_wrong_token(fake: tuple[FakeKubernetes, str]):
    k8s, url = fake
    factory = KubernetesSandboxFactory(config(url))
    sb = await factory("p2")
    sb._token = "guess"
    with pytest.raises(SandboxError, match="401"):
        await sb.exec(["id"])
    await sb.close()
    await factory.http.aclose()


@pytest.mark.parametrize("fake", ["forbidden"], indirect=True)
async def test_forbidden_api_names_rbac(fake: tuple[FakeKubernetes, str]):
    _, url = fake
    factory = KubernetesSandboxFactory(config(url))
    with pytest.raises(SandboxError, match="RBAC.*cannot create resource"):
        await factory("p3")
    await factory.http.aclose()


@pytest.mark.parametrize("fake", ["imagepull"], indirect=True)
async def test_image_pull_failure_is_named_and_the_pod_deleted(fake: tuple[FakeKubernetes, str]):
    k8s, url = fake
    factory = KubernetesSandboxFactory(config(url))
    with pytest.raises(SandboxError, match="ImagePullBackOff"):
        await factory("p4")
    assert k8s.deleted == [pod_name("p4")]
    await factory.http.aclose()


def test_network_policy_denies_all_egress():
    policy = sandbox_network_policy("agents")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["egress"] == []
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "orchestrator-sandbox"}


def test_pod_names_are_dns_labels():
    for pid in ("run_01ABC", "A/B C", "x" * 200, "---"):
        name = pod_name(pid)
        assert len(name) <= 63 and name == name.lower()
        assert all(ch.isalnum() or ch == "-" for ch in name) and name[0].isalpha() and name[-1].isalnum()
    assert pod_name("a_b") != pod_name("a-b")
