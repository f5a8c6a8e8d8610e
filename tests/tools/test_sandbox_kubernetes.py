"""The Kubernetes pod sandbox against a fake Kubernetes API server on loopback.

The fake (uvicorn on 127.0.0.1, in the test's loop) implements the few endpoints the client uses:
pods create / get / delete, secrets create / get / delete, and the pod proxy. It validates the
fields of a created pod that the real API server would reject or that matter to us. When a pod
"runs" it starts the real sandbox agent (``tools.sandbox.agent``) over a real subprocess sandbox,
on the pod's own loopback address (127.0.x.y, so ``via="pod_ip"`` is real too) and the port of the
pod spec, with the token resolved from the pod's env as the kubelet would (plain value or Secret).
Its proxy drops the caller's ``Authorization`` header, as the API server does. Not covered here: a
real cluster, the image, the kubelet's enforcement of limits, a CNI enforcing the NetworkPolicy.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.servers import free_port
from tools.sandbox.agent import create_agent_app
from tools.sandbox.base import SandboxError
from tools.sandbox.kubernetes import (KubernetesSandboxConfig, KubernetesSandboxFactory, pod_manifest, pod_name,
                                      sandbox_network_policy, secret_manifest, secret_name)
from tools.sandbox.cgroups import SandboxCgroup, host_layout
from tools.sandbox.subprocess import SubprocessSandbox, _group_name

API_TOKEN = "k8s-sa-token"
NS = "agents"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def status(code: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                         "message": message, "code": code}, status_code=code)


def pod_problems(pod: dict[str, Any], ns: str) -> list[str]:
    """What the real API server (or our requirements) would refuse in a created pod."""
    problems = []
    meta, spec = pod.get("metadata", {}), pod.get("spec", {})
    if (pod.get("apiVersion"), pod.get("kind")) != ("v1", "Pod"):
        problems.append("not a v1 Pod")
    if not DNS_LABEL.match(meta.get("name", "")) or len(meta["name"]) > 63:
        problems.append("metadata.name is not a DNS-1123 label")
    if meta.get("namespace") not in (None, ns):
        problems.append("metadata.namespace does not match the request")
    for key, value in meta.get("labels", {}).items():
        if len(value) > 63 or not LABEL_VALUE.match(value) or len(key.split("/")[-1]) > 63:
            problems.append(f"label {key}={value!r} is invalid")
    containers = spec.get("containers") or []
    if len(containers) != 1 or not containers[0].get("image") or not containers[0].get("name"):
        problems.append("exactly one named container with an image")
    if spec.get("restartPolicy") not in ("Never", "OnFailure", "Always"):
        problems.append("restartPolicy")
    for c in containers:
        if not all(isinstance(a, str) for a in c.get("command", [])):
            problems.append("command must be strings")
        for env in c.get("env", []):
            if ("value" in env) == ("valueFrom" in env):
                problems.append(f"env {env.get('name')}: exactly one of value / valueFrom")
        res = c.get("resources", {})
        for kind in res.get("requests", {}):
            if kind in res.get("limits", {}) and res["requests"][kind] != res["limits"][kind]:
                problems.append("requests differ from limits")  # we ask for Guaranteed QoS
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        if not mounts <= {v["name"] for v in spec.get("volumes", [])}:
            problems.append("a volumeMount names no volume")
    return problems


def recording(app: Any, seen: list[tuple[str | None, str | None]]) -> Any:
    """Wrap the agent app to record the credentials every request brings to the pod."""
    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            seen.append((headers.get("authorization"), headers.get("x-sandbox-token")))
        await app(scope, receive, send)
    return asgi


class FakeKubernetes:
    def __init__(self, root: Path, mode: str = "ok") -> None:
        self.root = root
        self.mode = mode  # ok | forbidden | imagepull | unschedulable
        self.pods: dict[str, dict[str, Any]] = {}
        self.secrets: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.failed: set[str] = set()  # pods to report as Failed (e.g. past activeDeadlineSeconds)
        self.agents: dict[str, tuple[uvicorn.Server, asyncio.Task[None], SubprocessSandbox]] = {}
        self.created: list[str] = []
        self.deleted: list[tuple[str, str, str | None]] = []  # (kind, name, gracePeriodSeconds)
        self.proxied: list[str] = []
        self.agent_saw: list[tuple[str | None, str | None]] = []
        self._net = random.randrange(1, 250)
        self._next_ip = 2

    def app(self) -> Starlette:
        base = "/api/v1/namespaces/{ns}"
        return Starlette(routes=[
            Route(base + "/pods", self.create_pod, methods=["POST"]),
            Route(base + "/pods/{name}", self.read_pod, methods=["GET"]),
            Route(base + "/pods/{name}", self.delete, methods=["DELETE"]),
            Route(base + "/pods/{name}:{port:int}/proxy/{path:path}", self.proxy, methods=["GET", "POST", "PUT"]),
            Route(base + "/secrets", self.create_secret, methods=["POST"]),
            Route(base + "/secrets/{name}", self.read_secret, methods=["GET"]),
            Route(base + "/secrets/{name}", self.delete, methods=["DELETE"]),
        ])

    def _refused(self, request: Request) -> Response | None:
        if request.headers.get("authorization") != f"Bearer {API_TOKEN}":
            return status(401, "Unauthorized", "Unauthorized")
        if self.mode == "forbidden":
            return status(403, "Forbidden", 'secrets is forbidden: User "system:serviceaccount:orch:orchestrator" '
                          f'cannot create resource "secrets" in API group "" in the namespace "{NS}"')
        return None

    async def create_pod(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        pod = await request.json()
        if problems := pod_problems(pod, request.path_params["ns"]):
            return status(422, "Invalid", "; ".join(problems))
        name = pod["metadata"]["name"]
        if name in self.pods:
            return status(409, "AlreadyExists", f'pods "{name}" already exists')
        pod["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp="2026-01-01T00:00:00Z")
        pod["status"] = {"phase": "Pending", "qosClass": "Guaranteed"}
        self.pods[name], self.polls[name] = pod, 0
        self.created.append(name)
        return JSONResponse(pod, status_code=201)

    async def read_pod(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        name = request.path_params["name"]
        if name not in self.pods:
            return status(404, "NotFound", f'pods "{name}" not found')
        self.polls[name] += 1
        pod = self.pods[name]
        if name in self.failed:
            pod["status"] = {"phase": "Failed", "reason": "DeadlineExceeded"}
        elif self.mode == "imagepull":
            pod["status"] = {"phase": "Pending", "containerStatuses": [{"name": "sandbox", "ready": False, "state": {
                "waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "orch:test"'}}}]}
        elif self.mode == "unschedulable":
            pod["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                             "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient cpu."}]}
        elif self.polls[name] < 3:
            pod["status"] = {"phase": "Pending", "containerStatuses": [{"name": "sandbox", "ready": False, "state": {
                "waiting": {"reason": "ContainerCreating"}}}]}
        elif name not in self.agents:
            token = self._token_of(pod)
            if token is None:  # what the kubelet says when the Secret is missing
                pod["status"] = {"phase": "Pending", "containerStatuses": [{"name": "sandbox", "state": {"waiting": {
                    "reason": "CreateContainerConfigError", "message": "secret not found"}}}]}
            else:
                ip = f"127.0.{self._net}.{self._next_ip}"
                self._next_ip += 1
                await self._start_agent(name, token, ip, pod["spec"]["containers"][0]["ports"][0]["containerPort"])
                pod["status"] = {"phase": "Running", "podIP": ip,
                                 "conditions": [{"type": "PodScheduled", "status": "True"},
                                                {"type": "Ready", "status": "True"}]}
        return JSONResponse(pod)

    def _token_of(self, pod: dict[str, Any]) -> str | None:
        for env in pod["spec"]["containers"][0]["env"]:
            if env["name"] == "SANDBOX_TOKEN":
                if "value" in env:
                    return env["value"]
                ref = env["valueFrom"]["secretKeyRef"]
                secret = self.secrets.get(ref["name"])
                return base64.b64decode(secret["data"][ref["key"]]).decode() if secret else None
        return None

    async def _start_agent(self, name: str, token: str, ip: str, port: int) -> None:
        # As `python -m tools.sandbox.agent --workspace /workspace` does: a subprocess sandbox at <root>/w.
        sandbox = await SubprocessSandbox.create(self.root / name, "w")
        app = recording(create_agent_app(sandbox, token), self.agent_saw)
        server = uvicorn.Server(uvicorn.Config(app, host=ip, port=port, log_config=None, access_log=False,
                                               lifespan="off"))
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        self.agents[name] = (server, task, sandbox)

    async def _stop_agent(self, name: str) -> None:
        if name in self.agents:
            server, task, sandbox = self.agents.pop(name)
            server.should_exit = True
            await task
            await sandbox.close()

    async def delete(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        name = request.path_params["name"]
        kind = request.url.path.split("/")[-2]
        store = self.pods if kind == "pods" else self.secrets
        if name not in store:
            return status(404, "NotFound", f'{kind} "{name}" not found')
        obj = store.pop(name)
        self.deleted.append((kind, name, request.query_params.get("gracePeriodSeconds")))
        self.failed.discard(name)
        await self._stop_agent(name)
        return JSONResponse(obj)

    async def create_secret(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        secret = await request.json()
        name = secret["metadata"]["name"]
        if name in self.secrets:
            return status(409, "AlreadyExists", f'secrets "{name}" already exists')
        data = {k: base64.b64encode(v.encode()).decode() for k, v in secret.pop("stringData", {}).items()}
        secret["data"] = {**secret.get("data", {}), **data}  # the API server stores stringData as data
        self.secrets[name] = secret
        return JSONResponse(secret, status_code=201)

    async def read_secret(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        name = request.path_params["name"]
        if name not in self.secrets:
            return status(404, "NotFound", f'secrets "{name}" not found')
        return JSONResponse(self.secrets[name])

    async def proxy(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        name, port = request.path_params["name"], request.path_params["port"]
        if name not in self.agents:
            return status(503, "ServiceUnavailable", f'pod "{name}" is not running')
        self.proxied.append(request.path_params["path"])
        # The API server authenticates the caller by Authorization and does not forward it.
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("authorization", "host", "content-length")}
        ip = self.pods[name]["status"]["podIP"]
        async with httpx.AsyncClient(timeout=60) as client:
            resp = await client.request(request.method, f"http://{ip}:{port}/{request.path_params['path']}",
                                        params=request.query_params, content=await request.body(), headers=headers)
        return Response(resp.content, status_code=resp.status_code, media_type=resp.headers.get("content-type"))

    async def close(self) -> None:
        for name in list(self.agents):
            await self._stop_agent(name)


@pytest.fixture
async def fake(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[FakeKubernetes, str]]:
    k8s = FakeKubernetes(tmp_path, getattr(request, "param", "ok"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(k8s.app(), host="127.0.0.1", port=port, log_config=None,
                                           access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield k8s, f"http://127.0.0.1:{port}"
    finally:
        await k8s.close()
        server.should_exit = True
        await task


def factory_for(url: str, **kw: Any) -> KubernetesSandboxFactory:
    options: dict[str, Any] = dict(api_url=url, namespace=NS, image="orch:test", token=API_TOKEN,
                                   agent_port=free_port(), poll_interval_s=0.05, startup_timeout_s=10)
    return KubernetesSandboxFactory(**{**options, **kw})


async def test_pod_lifecycle_exec_files_kill_and_close(fake: tuple[FakeKubernetes, str]):
    k8s, url = fake
    factory = factory_for(url, runtime_class_name="gvisor", node_selector={"pool": "sandboxes"})
    sb = await factory("run_01ABC/agent")
    name = pod_name("run_01ABC/agent")
    assert sb.name == name and k8s.polls[name] >= 3  # waited through Pending

    pod = k8s.pods[name]
    meta, spec, container = pod["metadata"], pod["spec"], pod["spec"]["containers"][0]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "orchestrator"
    assert meta["labels"]["orchestrator/program-id"] and meta["annotations"]["orchestrator/program-id"] == \
        "run_01ABC/agent"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 65534
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
    assert spec["runtimeClassName"] == "gvisor" and spec["activeDeadlineSeconds"] > 0
    assert spec["nodeSelector"] == {"pool": "sandboxes"}
    assert container["command"][:3] == ["python", "-m", "tools.sandbox.agent"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["limits"] == container["resources"]["requests"] == {
        "cpu": "1", "memory": "1Gi", "ephemeral-storage": "2Gi"}
    assert {"name": "workspace", "emptyDir": {"sizeLimit": "1Gi"}} in spec["volumes"]
    assert {"name": "workspace", "mountPath": "/workspace"} in container["volumeMounts"]
    # The token is in a Secret, not in the pod spec that anyone with `get pods` can read.
    assert {"name": "SANDBOX_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret_name(name), "key": "token"}}} \
        in container["env"]
    assert sb._token not in str(pod) and sb._token != API_TOKEN
    assert base64.b64decode(k8s.secrets[secret_name(name)]["data"]["token"]).decode() == sb._token

    result = await sb.exec(["/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, "hello\n", "oops\n")
    result = await sb.exec(["python3", "-c", "import sys; print(6 * 7, sys.argv[1:])", "x"])
    assert result.ok and result.stdout == "42 ['x']\n"
    result = await sb.exec(["python3", "-c", "import sys; print(sys.stdin.read().upper())"], stdin=b"abc")
    assert result.ok and result.stdout == "ABC\n"
    result = await sb.exec(["/bin/sh", "-c", "cat; echo \"$GREETING\""], stdin=b"piped\n", env={"GREETING": "hi"})
    assert result.ok and result.stdout == "piped\nhi\n"

    await sb.write_file("src/a.txt", b"data\x00\xff")
    assert await sb.read_file("src/a.txt") == b"data\x00\xff"
    assert (await sb.exec(["cat", "src/a.txt"])).stdout.startswith("data")
    entries = [(e.path, e.is_dir, e.size) for e in await sb.list_files(".", recursive=True)
               if not e.path.startswith(".")]
    assert entries == [("src", True, entries[0][2]), ("src/a.txt", False, 6)]
    assert [e.path for e in await sb.list_files("src")] == ["src/a.txt"]
    assert await sb.disk_bytes() >= 6 and sb.info().disk_bytes >= 6 and sb.info().kind == "kubernetes"
    with pytest.raises(SandboxError, match="outside"):
        await sb.read_file("../../etc/passwd")
    with pytest.raises(SandboxError):
        await sb.read_file("missing.txt")

    slow = asyncio.create_task(sb.exec(["sleep", "30"]))
    await asyncio.sleep(0.3)
    await sb.kill()
    killed = await asyncio.wait_for(slow, 10)
    assert not killed.ok
    assert (await sb.exec(["true"])).ok  # still usable after kill

    # Through the proxy: the agent saw the pod's own token, never the API credential.
    assert k8s.proxied and set(k8s.agent_saw) == {(None, sb._token)}

    await sb.close()
    await sb.close()  # idempotent
    assert k8s.deleted == [("pods", name, "0"), ("secrets", secret_name(name), "0")]
    assert name not in k8s.pods and not k8s.secrets and not k8s.agents
    with pytest.raises(SandboxError, match="closed"):
        await sb.exec(["true"])
    await factory.aclose()


async def test_pod_ip_mode_calls_the_pod_directly_with_its_own_token(fake: tuple[FakeKubernetes, str]):
    k8s, url = fake
    factory = factory_for(url, via="pod_ip", token_secret=False)
    sb = await factory("direct")
    assert sb.pod_ip and sb.pod_ip.startswith("127.0.")
    env = k8s.pods[sb.name]["spec"]["containers"][0]["env"]
    assert {"name": "SANDBOX_TOKEN", "value": sb._token} in env and not k8s.secrets  # the plain-env option
    result = await sb.exec(["python3", "-c", "print('direct')"])
    assert result.ok and result.stdout == "direct\n"
    await sb.write_file("x.txt", b"via pod ip")
    assert await sb.read_file("x.txt") == b"via pod ip"
    assert k8s.proxied == []  # never through the API server
    assert set(k8s.agent_saw) == {(f"Bearer {sb._token}", None)}  # no API token sent to the pod
    await sb.close()
    assert k8s.deleted == [("pods", sb.name, "0")]
    await factory.aclose()


async def test_the_agent_refuses_missing_and_wrong_tokens(fake: tuple[FakeKubernetes, str], tmp_path: Path):
    k8s, url = fake
    factory = factory_for(url)
    sb = await factory("p2")
    real = sb._token
    sb._token = "guess"
    with pytest.raises(SandboxError, match="sandbox agent.*401.*wrong sandbox token") as err:
        await sb.exec(["id"])
    assert "RBAC" not in str(err.value)  # the agent refused, not the API server
    sb._token = real
    assert (await sb.exec(["true"])).ok
    await sb.close()
    await factory.aclose()

    # The agent app on its own: every route but /healthz needs the token, in either header.
    inner = await SubprocessSandbox.create(tmp_path / "direct", "w")
    app = create_agent_app(inner, "s3cret")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent") as client:
        assert (await client.get("/healthz")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-Sandbox-Token": "s3cret-"},
                        {"Authorization": "Basic s3cret"}):
            resp = await client.post("/exec", json={"argv": ["true"]}, headers=headers)
            assert resp.status_code == 401 and resp.json() == {"error": "missing or wrong sandbox token"}
        for headers in ({"Authorization": "Bearer s3cret"}, {"X-Sandbox-Token": "s3cret"}):
            resp = await client.post("/exec", json={"argv": ["echo", "ok"]}, headers=headers)
            assert resp.status_code == 200 and resp.json()["stdout"] == "ok\n"
        resp = await client.post("/exec", json={"argv": "echo ok"}, headers={"X-Sandbox-Token": "s3cret"})
        assert resp.status_code == 400 and "argv" in resp.json()["error"]
    await inner.close()


async def test_the_pod_command_serves_the_agent(tmp_path: Path):
    """The container's command, as a process: it serves, and its commands do not inherit the token."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.sandbox.agent", "--host", "127.0.0.1", "--port", str(port),
        "--workspace", str(tmp_path / "workspace"), env={**os.environ, "SANDBOX_TOKEN": "pod-secret"},
        cwd=Path(__file__).resolve().parents[2], stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(200):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    assert proc.returncode is None, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
                    await asyncio.sleep(0.05)
            assert (await client.post("/exec", json={"argv": ["true"]})).status_code == 401
            resp = await client.post("/exec", headers={"Authorization": "Bearer pod-secret"},
                                     json={"argv": ["/bin/sh", "-c", "echo ${SANDBOX_TOKEN:-unset}; pwd"]})
            assert resp.status_code == 200 and resp.json()["stdout"] == f"unset\n{tmp_path / 'workspace' / 'w'}\n"
    finally:
        proc.terminate()
        await proc.wait()
        # The agent leaves its workspace (filesystem mounted, cgroups) for the pod's next agent;
        # in a pod they go with the container, here they are this machine's.
        workspace = tmp_path / "workspace" / "w"
        if os.path.ismount(workspace):
            subprocess.run(["umount", "-l", str(workspace)], check=True)
        SandboxCgroup(host_layout(), _group_name(workspace)).remove()


@pytest.mark.parametrize("fake", ["forbidden"], indirect=True)
async def test_forbidden_api_names_rbac(fake: tuple[FakeKubernetes, str]):
    k8s, url = fake
    factory = factory_for(url)
    with pytest.raises(SandboxError, match=r"refused.*\(403\).*RBAC.*cannot create resource"):
        await factory("p3")
    assert not k8s.created and not k8s.secrets
    await factory.aclose()


async def test_a_bad_api_token_is_reported_and_a_rotated_token_file_is_reread(
        fake: tuple[FakeKubernetes, str], tmp_path: Path):
    k8s, url = fake
    token_file = tmp_path / "token"
    token_file.write_text("expired\n")
    factory = factory_for(url, token=None, token_file=str(token_file))
    with pytest.raises(SandboxError, match=r"\(401\).*credentials and RBAC"):
        await factory("p5")
    token_file.write_text(API_TOKEN + "\n")  # the kubelet rotates the projected token
    sb = await factory("p5")
    assert (await sb.exec(["true"])).ok
    await sb.close()
    await factory.aclose()


@pytest.mark.parametrize("fake", ["imagepull"], indirect=True)
async def test_image_pull_failure_is_named_at_once_and_cleaned_up(fake: tuple[FakeKubernetes, str]):
    k8s, url = fake
    factory = factory_for(url, startup_timeout_s=30)
    with pytest.raises(SandboxError, match="ImagePullBackOff.*orch:test") as refused:
        await factory("p4")
    assert "not ready after" not in str(refused.value)  # named at once, not after the start-up timeout
    assert [(kind, n) for kind, n, _ in k8s.deleted] == [("pods", pod_name("p4")),
                                                          ("secrets", secret_name(pod_name("p4")))]
    await factory.aclose()


@pytest.mark.parametrize("fake", ["unschedulable"], indirect=True)
async def test_an_unschedulable_pod_times_out_naming_why(fake: tuple[FakeKubernetes, str]):
    k8s, url = fake
    factory = factory_for(url, startup_timeout_s=0.3)
    with pytest.raises(SandboxError, match=r"not ready after 0.3 s \(timeout; last seen: Unschedulable: 0/3 nodes"):
        await factory("p6")
    assert not k8s.pods and not k8s.secrets
    await factory.aclose()


async def test_a_pod_left_by_a_dead_control_plane_is_adopted_or_replaced(fake: tuple[FakeKubernetes, str]):
    k8s, url = fake
    first = factory_for(url)
    sb = await first("run-resumed")
    await sb.write_file("notes.md", b"turn 1")
    await first.aclose()  # the control plane dies: no close(), the pod and its Secret stay

    second = factory_for(url, agent_port=first.config.agent_port)
    again = await second("run-resumed")
    assert again.name == sb.name and again._token == sb._token and k8s.created == [sb.name]
    assert await again.read_file("notes.md") == b"turn 1"  # the same workspace

    k8s.failed.add(sb.name)  # e.g. it outlived activeDeadlineSeconds: replaced by a fresh pod
    third = await second("run-resumed")
    assert k8s.created == [sb.name, sb.name] and ("pods", sb.name, "0") in k8s.deleted
    assert not [e for e in await third.list_files(".") if not e.path.startswith(".")]  # a fresh workspace
    await third.close()
    assert not k8s.pods and not k8s.secrets
    await second.aclose()


def test_network_policy_denies_all_egress():
    policy = sandbox_network_policy(NS)
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["metadata"]["namespace"] == NS and DNS_LABEL.match(policy["metadata"]["name"])
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["egress"] == []
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8088}]}]
    # It selects the pods the factory makes.
    pod = pod_manifest(KubernetesSandboxConfig(namespace=NS), pod_name("x"), "x", "t")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert sandbox_network_policy(NS, {"team": "a"})["spec"]["podSelector"] == {"matchLabels": {"team": "a"}}


def test_manifests_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    config = KubernetesSandboxConfig(namespace=NS, runtime_class_name="gvisor", node_selector={"a": "b"})
    name = pod_name("run_01ABC/agent")
    for manifest in (pod_manifest(config, name, "run_01ABC/agent", "t"),
                     pod_manifest(KubernetesSandboxConfig(token_secret=False), name, "p", "t"),
                     secret_manifest(config, name, "run_01ABC/agent", "t"), sandbox_network_policy(NS)):
        kubernetes_validate.validate(manifest, "1.30", strict=True)


def test_pod_names_are_dns_labels():
    for pid in ("run_01ABC", "A/B C", "x" * 200, "---", "a" * 39 + "-b"):
        name = pod_name(pid)
        assert len(name) <= 63 and DNS_LABEL.match(name) and name[0].isalpha()
        assert LABEL_VALUE.match(name[4:]) and len(secret_name(name)) <= 253
    assert pod_name("a_b") != pod_name("a-b")
