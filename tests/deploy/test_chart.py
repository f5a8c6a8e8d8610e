"""The Helm chart, rendered by Helm's own Go library (no helm binary), each object validated
against the Kubernetes schemas (or the prometheus-operator CRD models), and the service's own
settings code reading the configuration the chart writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from typing import Any

import pytest
import yaml

from orchestrator.settings import Settings
from tests.deploy.conftest import CHART, ROOT, job

pytestmark = pytest.mark.slow

KUBE_OLDEST, KUBE_NEWEST = "1.27.0", "1.37.0"  # Chart.yaml kubeVersion >=1.27; newest schemas bundled

BUNDLED = {  # several replicas on the bundled PostgreSQL and Redis, everything optional turned on
    "replicaCount": 2, "postgresql": {"enabled": True}, "bundledRedis": {"enabled": True},
    "config": {"schedulerPolicyOptions": {"aging_s": 600}},
    "auth": {"apiKeys": '{"sk-a": "team-a", "sk-b": "team-b"}'},
    "backends": [{"name": "sim", "kind": "sim", "replicas": 3, "sim": {"speed": 5, "capacityTokens": 50000}}],
    "externalBackends": [{"name": "hosted", "kind": "openai", "url": "https://api.example.com/v1", "model": "gpt-x"}],
    "sandbox": {"kind": "kubernetes", "kubernetes": {"namespace": "agents", "extra": {"via": "pod_ip"}}},
    "networkPolicy": {"enabled": True, "kubeApiCidrs": ["10.0.0.1/32"]},
    "ingress": {"enabled": True, "hosts": [{"host": "orch.local"}]},
    "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True}, "grafanaDashboards": {"enabled": True, "namespace": "monitoring"}},
    "extraObjects": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "extra"}, "data": {"a": "b"}},
                     "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: '{{ .Release.Name }}-templated'\n"],
}

INVALID = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "datta": {}},
           {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "b"},
            "spec": {"replicas": "two", "selector": {}, "template": {}}},
           {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "c"},
            "spec": {"selector": {}, "endpoints": [{"port": "http", "intervall": "5s"}]}}]

RENDERS: dict[str, dict[str, Any]] = {
    "default": job("render"),
    "dev": job("render", "dev"),
    "production": job("render", "production"),
    "production-oldest-kube": job("render", "production", kube_version=KUBE_OLDEST),
    "production-newest-kube": job("render", "production", kube_version=KUBE_NEWEST),
    "bundled": job("render", values=BUNDLED),
    "invalid-extra-objects": job("render", values={"extraObjects": INVALID}),
    "inline-urls": job("render", values={"database": {"url": "postgresql+asyncpg://u:p@pg:5432/orch"},
                                         "redis": {"url": "redis://redis:6379/0"}, "auth": {"apiKeys": "sk-x=team"}}),
}

CONTRADICTIONS = {
    "replicas-on-sqlite": ({"replicaCount": 3}, "need PostgreSQL"),
    "hpa-without-redis": ({"autoscaling": {"enabled": True}, "postgresql": {"enabled": True}}, "need Redis"),
    "hpa-min-above-max": ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2},
                           "postgresql": {"enabled": True}, "bundledRedis": {"enabled": True}},
                          "autoscaling.minReplicas (5) is above autoscaling.maxReplicas (2)"),
    "two-databases": ({"database": {"url": "postgresql+asyncpg://u:p@h/d"}, "postgresql": {"enabled": True}},
                      "pick one"),
    "podmonitor-without-metrics": ({"metrics": {"podMonitor": {"enabled": True}},
                                    "backends": [{"name": "gpu", "kind": "sglang", "model": "m", "enableMetrics": False,
                                                  "image": {"repository": "lmsysorg/sglang", "tag": "v0"}}]},
                                   "SGLang serves only with enableMetrics=true"),
    "duplicate-backend": ({"backends": [{"name": "a", "kind": "sim"}, {"name": "a", "kind": "sim"}]},
                          'the name "a" is used twice'),
    "sim-ranks-with-a-priority-queue": ({"backends": [{"name": "sim", "kind": "sim", "enablePriorityScheduling": True}]},
                                        "would read the program policy's eviction ranks as urgency"),
    "rwo-volume-shared": ({"replicaCount": 2, "postgresql": {"enabled": True}, "bundledRedis": {"enabled": True},
                           "persistence": {"enabled": True}}, "cannot be shared by several replicas"),
}

BAD_VALUES = {
    "replicas-as-string": ({"replicaCount": "three"}, "at '/replicaCount': got string, want integer"),
    "unknown-top-level-key": ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    "unknown-policy": ({"config": {"schedulerPolicy": "fifo"}}, "at '/config/schedulerPolicy': value must be one of"),
    "policy-options-as-string": ({"config": {"schedulerPolicyOptions": "aging_s=600"}},
                                 "at '/config/schedulerPolicyOptions': got string, want object"),
    "backend-kind": ({"backends": [{"name": "gpu", "kind": "vllm"}]}, "at '/backends/0/kind': value must be one of 'sglang', 'sim'"),
    "backend-name": ({"backends": [{"name": "GPU_0", "kind": "sim"}]}, "at '/backends/0/name'"),
    "sglang-without-model": ({"backends": [{"name": "gpu", "kind": "sglang", "image": {"repository": "x"}}]},
                             "missing property 'model'"),
    "database-url-scheme": ({"database": {"url": "postgres://u:p@h/d"}}, "at '/database/url'"),
    "bad-quantity": ({"resources": {"limits": {"memory": "lots"}}}, "at '/resources/limits/memory'"),
    "extra-env-prefix": ({"config": {"extraEnv": {"LOG_LEVEL": "x"}}}, "'LOG_LEVEL' does not match pattern '^ORCH_"),
    "ingress-without-hosts": ({"ingress": {"enabled": True}}, "at '/ingress/hosts': minItems"),
    "bad-interval": ({"metrics": {"serviceMonitor": {"interval": "15 seconds"}}}, "at '/metrics/serviceMonitor/interval'"),
    "tensor-parallel-3": ({"backends": [{"name": "g", "kind": "sglang", "model": "m", "image": {"repository": "x"},
                                         "tensorParallelSize": 3}]}, "at '/backends/0/tensorParallelSize'"),
}


@pytest.fixture(scope="session")
def results(chartcheck) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Everything rendered and checked in one chartcheck process (the Go library and the schemas
    load once)."""
    jobs = ([job("lint"), job("lint", "dev"), job("lint", "production")]
            + list(RENDERS.values())
            + [job("render", values=v) for v, _ in CONTRADICTIONS.values()]
            + [job("schema", values=v) for v, _ in BAD_VALUES.values()]
            + [job("schema", p) for p in ("dev", "production")])
    out = chartcheck("batch", jobs)
    it = iter(out)
    return {"lint": [next(it) for _ in range(3)],
            "render": {name: next(it) for name in RENDERS},
            "contradiction": {name: next(it) for name in CONTRADICTIONS},
            "bad": {name: next(it) for name in BAD_VALUES},
            "profiles_schema": [next(it) for _ in range(2)]}


def objects(results: dict[str, Any], name: str) -> list[dict[str, Any]]:
    rendered = results["render"][name]
    assert rendered["ok"], rendered.get("error")
    return [o["object"] for o in rendered["objects"]]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def test_helm_lint_passes_with_each_profile(results: dict[str, Any]) -> None:
    for report in results["lint"]:
        assert report["ok"], report["errors"]
        assert report["helm_python"]["total_charts_linted"] == 1
        assert report["helm_sdkpy"]["TotalChartsLinted"] == 1


@pytest.mark.parametrize("name", [n for n in RENDERS if n != "invalid-extra-objects"])
def test_every_rendered_object_is_valid_kubernetes(results: dict[str, Any], name: str) -> None:
    rendered = results["render"][name]
    assert rendered["ok"], rendered.get("error")
    bad = [(o["template"], o["object"]["kind"], o["error"]) for o in rendered["objects"] if o["error"]]
    assert not bad
    nulls = [(o["template"], path) for o in rendered["objects"] for path in _null_paths(o["object"], "")]
    assert not nulls  # an empty `key:` is a template bug the API server would silently drop
    assert len(rendered["objects"]) >= 7


def _null_paths(value: Any, path: str) -> list[str]:
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _null_paths(v, f"{path}/{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _null_paths(v, f"{path}/{i}")]
    return []


def test_validation_catches_a_bad_object(results: dict[str, Any]) -> None:
    """The validators are not vacuous: an unknown field, a wrong type and an unknown
    ServiceMonitor field are each reported."""
    rendered = results["render"]["invalid-extra-objects"]
    errors = {o["object"]["metadata"]["name"]: o["error"] for o in rendered["objects"] if o["template"].endswith("extra-objects.yaml")}
    assert "'datta' was unexpected" in errors["a"]
    assert "spec/replicas" in errors["b"]
    assert "intervall" in errors["c"]


@pytest.mark.parametrize("name", list(CONTRADICTIONS))
def test_contradictory_settings_fail_fast(results: dict[str, Any], name: str) -> None:
    rendered = results["contradiction"][name]
    assert not rendered["ok"]
    assert CONTRADICTIONS[name][1] in rendered["error"]


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_values_schema_rejects_bad_values(results: dict[str, Any], name: str) -> None:
    checked = results["bad"][name]
    assert not checked["ok"]
    assert BAD_VALUES[name][1] in checked["error"], checked["error"]


def test_values_schema_accepts_the_profiles(results: dict[str, Any]) -> None:
    assert all(r["ok"] for r in results["profiles_schema"]), results["profiles_schema"]


def _env_of(objs: list[dict[str, Any]]) -> dict[str, str]:
    """What the control-plane container sees: the ConfigMap plus literal env values."""
    [cm] = find(objs, "ConfigMap", "orch-orchestrator")
    [dep] = find(objs, "Deployment", "orch-orchestrator")
    [container] = dep["spec"]["template"]["spec"]["containers"]
    literal = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return {**cm["data"], **literal}


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_dev_profile_service_finds_the_simulator_pods(results: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    objs = objects(results, "dev")
    settings = _settings(_env_of(objs), monkeypatch)  # the service's own parser of ORCH_*
    assert settings.is_sqlite and settings.database_url.endswith("/data/orchestrator.db")
    assert settings.redis_url is None and settings.host == "0.0.0.0"
    assert settings.program_idle_release_s == 1800 and settings.scheduler_policy == "program"
    [sts] = find(objs, "StatefulSet", "orch-orchestrator-sim")
    [svc] = find(objs, "Service", "orch-orchestrator-sim")
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert [b.url for b in settings.backends] == ["http://orch-orchestrator-sim-0.orch-orchestrator-sim.ai.svc:30000"]
    assert settings.backends[0].kind == "sglang"  # the simulator speaks SGLang's API
    [engine] = sts["spec"]["template"]["spec"]["containers"]
    assert engine["command"] == ["python", "-m", "scheduler.sim.server"]
    assert "--speed=10" in engine["args"] and "--host=0.0.0.0" in engine["args"]
    # the program policy's Retain: the simulator evicts by rank, with no priority queue (it
    # models only SGLang's default order, largest first, which ranks would turn around)
    assert "--radix-eviction-policy=priority" in engine["args"]
    assert "--enable-priority-scheduling" not in engine["args"]
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    # One pod on SQLite: no rolling update with two pods on one file, no PDB, no migration Job.
    [dep] = find(objs, "Deployment")
    assert dep["spec"]["strategy"]["type"] == "Recreate" and dep["spec"]["replicas"] == 1
    assert not find(objs, "PodDisruptionBudget") and not find(objs, "Job")


def test_simulator_args_are_accepted_by_its_cli(results: dict[str, Any]) -> None:
    """The args the chart gives the simulator parse with the simulator's own argument parser."""
    [sts] = find(objects(results, "bundled"), "StatefulSet", "orch-orchestrator-sim")
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    code = ("import sys, uvicorn, scheduler.sim.server as s\n"
            "real = s.create_app\n"
            "def spy(config, **kw):\n"
            "    print('capacity', config.kv_capacity_tokens, 'speed', kw['speed'], 'model', kw['model_name'])\n"
            "    return real(config, **kw)\n"
            "s.create_app = spy\n"
            "uvicorn.run = lambda app, **kw: print('listen', kw['host'], kw['port'])\n"
            "s.main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "capacity 50000 speed 5.0 model sim" in proc.stdout and "--radix-eviction-policy=priority" in args
    assert "listen 0.0.0.0 30000" in proc.stdout


def test_production_profile(results: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    objs = objects(results, "production")
    kinds = {o["kind"] for o in objs}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "PodMonitor", "PrometheusRule",
            "NetworkPolicy", "Ingress", "Role", "RoleBinding", "ServiceAccount", "Job"} <= kinds
    [dep] = find(objs, "Deployment")
    assert "replicas" not in dep["spec"]  # the HPA owns it
    [container] = dep["spec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert refs["ORCH_DATABASE_URL"] == {"name": "orch-db", "key": "url"}
    assert refs["ORCH_REDIS_URL"] == {"name": "orch-redis", "key": "url"}
    assert refs["ORCH_API_KEYS"] == {"name": "orch-keys", "key": "api-keys"}
    assert not find(objs, "Secret")  # nothing secret in the release itself
    # Migrations before the new pods, with the same database URL.
    [migrate] = find(objs, "Job")
    assert migrate["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    [mc] = migrate["spec"]["template"]["spec"]["containers"]
    assert mc["args"] == ["migrate"] and any(e["name"] == "ORCH_DATABASE_URL" for e in mc["env"])
    # Two SGLang engines, each a GPU, with the flags the control plane relies on.
    [sts] = find(objs, "StatefulSet", "orch-orchestrator-llama-8b")
    [engine] = sts["spec"]["template"]["spec"]["containers"]
    assert sts["spec"]["replicas"] == 2
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    for flag in ("--enable-metrics", "--enable-cache-report", "--enable-priority-scheduling",
                 "--tool-call-parser=llama3", "--model-path=meta-llama/Llama-3.1-8B-Instruct",
                 # the program policy's Retain: eviction by rank, a queue that ranks cannot turn around
                 "--radix-eviction-policy=priority", "--schedule-low-priority-values-first",
                 "--disable-priority-preemption"):
        assert flag in engine["args"]
    env = {k: v for k, v in _env_of(objs).items()}
    settings = _settings({**env, "ORCH_DATABASE_URL": "postgresql+asyncpg://u:p@h/d"}, monkeypatch)
    assert [b.name for b in settings.backends] == ["llama-8b-0", "llama-8b-1"]
    assert settings.sandbox_kind == "kubernetes"
    assert settings.sandbox_kubernetes["runtime_class_name"] == "gvisor"
    # RBAC of the Kubernetes sandbox (docs/sandboxes-kubernetes.md) bound to the service account.
    [role] = find(objs, "Role", "orch-orchestrator-sandboxes")
    granted = {r["resources"][0]: set(r["verbs"]) for r in role["rules"]}
    assert granted == {"pods": {"create", "get", "delete"}, "pods/proxy": {"get", "create"},
                       "secrets": {"create", "get", "delete"}}
    [binding] = find(objs, "RoleBinding", "orch-orchestrator-sandboxes")
    assert binding["subjects"][0]["name"] == dep["spec"]["template"]["spec"]["serviceAccountName"]


def test_monitoring_objects_match_the_files(results: dict[str, Any]) -> None:
    objs = objects(results, "bundled")
    [rule] = find(objs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "rules" / "orchestrator.rules.yaml").read_text())
    dashboards = [o for o in find(objs, "ConfigMap") if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    files = {p.name: p.read_text() for p in (CHART / "dashboards").glob("*.json")}
    assert len(dashboards) == len(files) >= 7
    for cm in dashboards:
        assert cm["metadata"]["namespace"] == "monitoring"
        [(name, text)] = cm["data"].items()
        assert json.loads(text) == json.loads(files[name])
    [sm] = find(objs, "ServiceMonitor")
    [svc] = find(objs, "Service", "orch-orchestrator")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    [pm] = find(objs, "PodMonitor")
    [sts] = find(objs, "StatefulSet", "orch-orchestrator-sim")
    assert pm["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_bundled_databases_and_network_policy(results: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    objs = objects(results, "bundled")
    env = _env_of(objs)
    assert env["ORCH_DATABASE_URL"] == "postgresql+asyncpg://orchestrator:$(POSTGRES_PASSWORD)@orch-orchestrator-postgresql:5432/orchestrator"
    assert env["ORCH_REDIS_URL"] == "redis://orch-orchestrator-redis:6379/0"
    # The password comes from the chart's Secret; the pod spec's $(VAR) refers to a variable defined before it.
    [dep] = find(objs, "Deployment", "orch-orchestrator")
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    names = [e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert names.index("POSTGRES_PASSWORD") < names.index("ORCH_DATABASE_URL")
    assert find(objs, "Secret", "orch-orchestrator-postgresql")
    # On install the database does not exist before the hooks: migrate on upgrades only.
    [migrate] = find(objs, "Job")
    assert migrate["metadata"]["annotations"]["helm.sh/hook"] == "pre-upgrade"
    [wait] = dep["spec"]["template"]["spec"]["initContainers"]
    compile(wait["args"][0], "wait-for-database", "exec")  # the wait loop is valid Python
    assert "orch-orchestrator-postgresql" in wait["args"][0]
    [engine_pdb] = find(objs, "PodDisruptionBudget", "orch-orchestrator-sim")
    assert engine_pdb["spec"]["maxUnavailable"] == 1
    settings = _settings({**env, "ORCH_DATABASE_URL": "postgresql+asyncpg://u:p@h/d"}, monkeypatch)
    assert [b.name for b in settings.backends] == ["sim-0", "sim-1", "sim-2", "hosted"]
    assert settings.backends[-1].kind == "openai"
    assert settings.scheduler_policy_options == {"aging_s": 600}  # program's tail setting reaches the service
    policies = {p["metadata"]["name"]: p for p in find(objs, "NetworkPolicy")}
    assert set(policies) == {"orch-orchestrator", "orch-orchestrator-backends", "orch-orchestrator-postgresql",
                             "orch-orchestrator-redis", "orch-orchestrator-sandbox-deny-egress"}
    # The engines accept requests from the control plane's pods only (and scrapes).
    [from_cp, *_] = policies["orch-orchestrator-backends"]["spec"]["ingress"][0]["from"]
    assert from_cp["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "control-plane"
    # Sandbox pods: the very policy the sandbox code documents, in the sandbox namespace.
    from tools.sandbox.kubernetes import AGENT_PORT, sandbox_network_policy

    [sandbox_policy] = [p for p in find(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("sandbox-deny-egress")]
    assert sandbox_policy["metadata"]["namespace"] == "agents"
    assert sandbox_policy["spec"] == sandbox_network_policy("agents", agent_port=AGENT_PORT)["spec"]
    # The helm test pod carries the label the API policy admits.
    [test_pod] = find(objs, "Pod")
    assert test_pod["metadata"]["labels"]["orch-orchestrator-client"] == "true"
    assert find(objs, "ConfigMap", "extra") and find(objs, "ConfigMap", "orch-templated")


@pytest.mark.parametrize("keys", ["sk-a=team-a,sk-b=team-b", '{"sk-a": "team-a", "sk-b": "team-b"}'])
def test_helm_test_pod_script_picks_the_first_key(results: dict[str, Any], keys: str) -> None:
    """The `helm test` pod parses ORCH_API_KEYS with the service's settings code: run its
    snippet here with both formats."""
    [pod] = find(objects(results, "bundled"), "Pod")
    [container] = pod["spec"]["containers"]
    script = container["args"][0]
    assert "runs submit - --follow" in script and "http://orch-orchestrator:8080" in script
    snippet = re.search(r"python -c '([^']*)'", script).group(1)  # type: ignore[union-attr]
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=ROOT,
                          env={"TEST_API_KEYS": keys, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "sk-a"
    secret_ref = container["env"][0]["valueFrom"]["secretKeyRef"]
    assert secret_ref == {"name": "orch-orchestrator-secrets", "key": "api-keys"}


def test_notes_tell_how_to_reach_the_service(results: dict[str, Any]) -> None:
    dev = results["render"]["dev"]["notes"]
    assert "kubectl -n ai port-forward svc/orch-orchestrator 8080:8080" in dev
    assert "development key sk-orch-dev" in dev and "helm test orch -n ai" in dev
    assert "orch-orchestrator-sim-<i>.orch-orchestrator-sim:30000" in dev
    prod = results["render"]["production"]["notes"]
    assert "https://orchestrator.example.com/" in prod and "WARNING" not in prod


def test_chart_default_image_is_this_release() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


def test_inline_urls_reach_the_migration_hook_first(results: dict[str, Any]) -> None:
    """Hooks run before the release's other objects: a Secret the pre-install Job reads must
    itself be a hook, of a lower weight, or the Job would start without its database URL."""
    objs = objects(results, "inline-urls")
    [secret] = find(objs, "Secret")
    [migrate] = find(objs, "Job")
    assert secret["stringData"] == {"database-url": "postgresql+asyncpg://u:p@pg:5432/orch",
                                    "redis-url": "redis://redis:6379/0", "api-keys": "sk-x=team"}
    s_ann, j_ann = secret["metadata"]["annotations"], migrate["metadata"]["annotations"]
    assert s_ann["helm.sh/hook"] == j_ann["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(s_ann["helm.sh/hook-weight"]) < int(j_ann["helm.sh/hook-weight"])
    [env] = [e for e in migrate["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "ORCH_DATABASE_URL"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "database-url"}
