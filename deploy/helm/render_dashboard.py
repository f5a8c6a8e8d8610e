"""Draw one of the chart's dashboards from real data, for docs/ (not a test: it takes minutes).

What is real: the service (`orchestrator serve`) and the SGLang simulator run as processes on
loopback; Debian's Prometheus scrapes both every 2 s and evaluates the chart's rule file; an
agent-like load (programs of several turns with tool phases, and runs) drives them; every
panel's PromQL is sent to Prometheus's query_range API exactly as the dashboard JSON has it
(``$__rate_interval`` and ``$namespace`` substituted as Grafana would). What is not Grafana:
the drawing. No Grafana build is reachable from this machine, so the panels are drawn with
uPlot (the chart library Grafana's time series panels use) in a page that headless Chromium
screenshots.

    python deploy/helm/render_dashboard.py --uid orch-scheduling --minutes 4 --out docs/dashboard-scheduling.png
Needs: prometheus and chromium (Debian), `npm install uplot@1` under --uplot-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "helm" / "orchestrator" / "dashboards"
RULES = ROOT / "deploy" / "helm" / "orchestrator" / "rules" / "orchestrator.rules.yaml"
KEY = "sk-orch-dev"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer")


async def program(client: httpx.AsyncClient, pid: str, turns: int, rng: random.Random) -> None:
    """One agent: turns of an LLM call then a tool phase, its context growing, then release."""
    messages = [{"role": "system", "content": "You are a coding agent. " * 40},
                {"role": "user", "content": f"task {pid}: " + "fix the failing test " * rng.randint(20, 120)}]
    for _ in range(turns):
        r = await client.post("/v1/chat/completions", json={"model": "sim-model", "messages": messages,
                                                             "max_tokens": rng.randint(16, 96), "program_id": pid})
        if r.status_code != 200:
            return
        messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
        await client.post(f"/v1/programs/{pid}/tool", json={"phase": "acting", "tool": rng.choice(["bash", "edit"])})
        await asyncio.sleep(rng.uniform(0.2, 2.5))
        await client.post(f"/v1/programs/{pid}/tool", json={"phase": "reasoning"})
        messages.append({"role": "user", "content": "tool output: " + "ok " * rng.randint(50, 300)})
    await client.post(f"/v1/programs/{pid}/release")


async def drive(base: str, seconds: float, concurrency: int) -> dict[str, int]:
    """Bounded load: programs `concurrency` at a time, and a run every second, for `seconds`."""
    rng = random.Random(7)
    counts = {"programs": 0, "runs": 0}
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        async def programs() -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                counts["programs"] += 1
                await program(client, f"agent-{n}-{rng.randint(0, 10**6)}", rng.randint(3, 8), rng)

        async def runs() -> None:
            while time.monotonic() < deadline:
                wf = rng.choice(["echo", "demo", "sleep"])
                body = {"echo": {"message": "hi"}, "demo": {"steps": 3, "step_seconds": 0.3},
                        "sleep": {"seconds": rng.uniform(0.5, 3)}}[wf]
                await client.post("/v1/runs", json={"workflow": wf, "input": body})
                counts["runs"] += 1
                await asyncio.sleep(1.0)

        await asyncio.gather(runs(), *(programs() for _ in range(concurrency)))
    return counts


def query_panels(prom: str, dashboard: dict[str, Any], start: float, end: float, step: float) -> list[dict[str, Any]]:
    panels = []
    for p in dashboard["panels"]:
        if p["type"] == "row":
            panels.append({"type": "row", "title": p["title"], "gridPos": p["gridPos"]})
            continue
        series = []
        for t in p["targets"]:
            expr = t["expr"].replace("$__rate_interval", "15s").replace("$namespace", ".*")
            r = httpx.get(f"{prom}/api/v1/query_range", params={"query": expr, "start": start, "end": end,
                                                                 "step": step}, timeout=30).json()
            if r.get("status") != "success":
                raise RuntimeError(f"{p['title']}: {expr}: {r}")
            for res in r["data"]["result"]:
                legend = t.get("legendFormat", "")
                for k, v in res["metric"].items():
                    legend = legend.replace("{{" + k + "}}", v)
                legend = re.sub(r"\{\{\s*\w+\s*\}\}", "", legend).strip()  # Grafana shows a missing label as ""
                series.append({"legend": legend or json.dumps(res["metric"]), "values": res["values"]})
        panels.append({"type": p["type"], "title": p["title"], "gridPos": p["gridPos"],
                       "unit": p["fieldConfig"]["defaults"].get("unit", "short"), "series": series,
                       "stack": p["fieldConfig"]["defaults"].get("custom", {}).get("stacking", {}).get("mode") == "normal"})
    return panels


PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>{css}
body{{background:#111217;color:#ccccdc;font-family:'DejaVu Sans',sans-serif;margin:0;padding:12px}}
h1{{font-size:18px;font-weight:500;margin:4px 4px 2px}} .sub{{font-size:11px;color:#8e8e9e;margin:0 4px 8px}}
#grid{{position:relative}} .panel{{position:absolute;background:#181b1f;border:1px solid #2c3235;border-radius:2px;box-sizing:border-box;padding:4px 6px}}
.title{{font-size:12px;font-weight:500;margin-bottom:2px}} .row{{position:absolute;font-size:14px;font-weight:500;color:#ccccdc}}
.stat{{font-size:34px;color:#73bf69;text-align:center;margin-top:18px}} .empty{{color:#8e8e9e;font-size:12px;text-align:center;margin-top:40px}}
.u-legend{{font-size:10px}} .u-legend th{{font-weight:400}}</style></head>
<body><h1>{title}</h1><div class="sub">{sub}</div><div id="grid"></div><script>{js}</script><script>
const data = {data}; const W = {width}, CW = (W - 24) / 24, RH = 30;
const colors = ['#7eb26d','#eab839','#6ed0e0','#ef843c','#e24d42','#1f78c1','#ba43a9','#705da0','#508642','#cca300'];
function fmt(unit, v) {{ if (v == null) return '';
  if (unit === 'percentunit') return (v*100).toFixed(1) + '%';
  if (unit === 's') return v < 1 ? (v*1000).toFixed(v < 0.01 ? 2 : 0) + ' ms' : v.toFixed(2) + ' s';
  if (unit === 'ops' || unit === 'reqps') return v.toFixed(2) + (unit === 'ops' ? ' ops/s' : ' req/s');
  if (unit === 'bytes') return v > 1e6 ? (v/1e6).toFixed(1) + ' MB' : (v/1e3).toFixed(1) + ' kB';
  return Math.abs(v) >= 1000 ? (v/1000).toFixed(1) + 'k' : (+v.toFixed(3)).toString(); }}
const grid = document.getElementById('grid'); let maxY = 0;
for (const p of data) {{
  const g = p.gridPos, x = g.x * CW, y = g.y * RH, w = g.w * CW - 6, h = g.h * RH - 6; maxY = Math.max(maxY, y + h);
  if (p.type === 'row') {{ const r = document.createElement('div'); r.className = 'row'; r.style.left = x + 'px';
    r.style.top = (y + 6) + 'px'; r.textContent = p.title; grid.appendChild(r); continue; }}
  const el = document.createElement('div'); el.className = 'panel'; Object.assign(el.style, {{left: x+'px', top: y+'px', width: w+'px', height: h+'px'}});
  el.innerHTML = '<div class="title">' + p.title + '</div>'; grid.appendChild(el);
  if (!p.series.length) {{ el.innerHTML += '<div class="empty">No data</div>'; continue; }}
  if (p.type === 'stat') {{ const s = p.series[0].values; el.innerHTML += '<div class="stat">' + fmt(p.unit, +s[s.length-1][1]) + '</div>'; continue; }}
  const ts = [...new Set(p.series.flatMap(s => s.values.map(v => v[0])))].sort((a, b) => a - b);
  const cols = [ts]; const stackBase = ts.map(() => 0);
  for (const s of p.series) {{ const m = new Map(s.values.map(v => [v[0], +v[1]]));
    let col = ts.map(t => m.has(t) && isFinite(m.get(t)) ? m.get(t) : (p.stack ? 0 : null));
    if (p.stack) col = col.map((v, i) => (stackBase[i] += v));
    cols.push(col); }}
  const opts = {{ width: w - 12, height: h - 56, legend: {{show: true, live: false}}, cursor: {{show: false}},
    axes: [{{stroke: '#8e8e9e', grid: {{stroke: '#2c3235'}}, ticks: {{stroke: '#2c3235'}}, font: '10px DejaVu Sans'}},
           {{stroke: '#8e8e9e', grid: {{stroke: '#2c3235'}}, ticks: {{stroke: '#2c3235'}}, font: '10px DejaVu Sans', size: 78,
             values: (u, vals) => vals.map(v => fmt(p.unit, v))}}],
    series: [{{}}, ...p.series.map((s, i) => ({{label: s.legend, stroke: colors[i % colors.length], width: 1.5, points: {{show: false}},
             fill: colors[i % colors.length] + (p.stack ? '55' : '22'), value: (u, v) => fmt(p.unit, v)}}))] }};
  new uPlot(opts, cols, el); }}
grid.style.height = (maxY + 10) + 'px'; document.title = 'ready';
</script></body></html>"""


def draw(panels: list[dict[str, Any]], dashboard: dict[str, Any], sub: str, uplot: Path, out: Path) -> None:
    dist = uplot / "node_modules" / "uplot" / "dist"
    width = 1600
    html = PAGE.format(css=(dist / "uPlot.min.css").read_text(), js=(dist / "uPlot.iife.min.js").read_text(),
                       data=json.dumps(panels), width=width, title=dashboard["title"], sub=sub)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "dashboard.html"
        page.write_text(html)
        height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) * 30 + 90
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},{height}", "--virtual-time-budget=5000",
                        f"--screenshot={out.resolve()}", page.as_uri()], check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uid", default="orch-scheduling")
    ap.add_argument("--minutes", type=float, default=4)
    ap.add_argument("--concurrency", type=int, default=24, help="programs running at once")
    ap.add_argument("--capacity-tokens", type=int, default=12000, help="simulated KV pool (small: the scheduler must pause)")
    ap.add_argument("--uplot-dir", type=Path, default=Path("/tmp/uplot"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard-scheduling.png")
    ap.add_argument("--save-data", type=Path, help="also write the queried panels (JSON) here")
    ap.add_argument("--redraw", type=Path, help="draw panels saved by --save-data; start nothing")
    args = ap.parse_args(argv)
    dashboard = json.loads((DASHBOARDS / f"{args.uid}.json").read_text())
    if args.redraw:
        saved = json.loads(args.redraw.read_text())
        draw(saved["panels"], dashboard, saved["sub"], args.uplot_dir, args.out)
        return 0
    work = Path(tempfile.mkdtemp(prefix="render-dashboard-"))
    sim_port, orch_port, prom_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, "-m", "scheduler.sim.server", "--port", str(sim_port),
                                       "--speed", "4", "--capacity-tokens", str(args.capacity_tokens),
                                       "--enable-priority-scheduling"], cwd=ROOT, env=env,
                                      stdout=(work / "sim.log").open("wb"), stderr=subprocess.STDOUT))
        wait_http(f"http://127.0.0.1:{sim_port}/health")
        orch_env = {**env, "ORCH_PORT": str(orch_port), "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{work}/o.db",
                    "ORCH_SANDBOX_ROOT": str(work / "sb"), "ORCH_LOG_LEVEL": "WARNING",
                    "ORCH_DEFAULT_LIMITS": '{"max_concurrent_runs": 1000, "requests_per_second": 1000, "burst": 1000}',
                    "ORCH_BACKENDS": json.dumps([{"name": "sim-0", "kind": "sglang", "url": f"http://127.0.0.1:{sim_port}"}])}
        procs.append(subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve"], cwd=ROOT, env=orch_env,
                                      stdout=(work / "orch.log").open("wb"), stderr=subprocess.STDOUT))
        wait_http(f"http://127.0.0.1:{orch_port}/readyz")
        shutil.copy(RULES, work / "rules.yaml")
        (work / "prometheus.yml").write_text(json.dumps({
            "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
            "rule_files": [str(work / "rules.yaml")],
            "scrape_configs": [
                {"job_name": "orchestrator", "static_configs": [{"targets": [f"127.0.0.1:{orch_port}"]}]},
                {"job_name": "sglang", "static_configs": [{"targets": [f"127.0.0.1:{sim_port}"],
                                                           "labels": {"backend": "sim", "pod": "sim-0"}}]}]}))
        procs.append(subprocess.Popen(["prometheus", f"--config.file={work / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                      stdout=(work / "prom.log").open("wb"), stderr=subprocess.STDOUT))
        prom = f"http://127.0.0.1:{prom_port}"
        wait_http(f"{prom}/-/ready")
        start = time.time()
        counts = asyncio.run(drive(f"http://127.0.0.1:{orch_port}", args.minutes * 60, args.concurrency))
        time.sleep(6)  # two more scrapes and rule evaluations
        end = time.time()
        panels = query_panels(prom, dashboard, start, end, 2)
        sub = (f"Data: Prometheus 2.42 scraping orchestrator serve + the SGLang simulator on loopback, "
               f"{counts['programs']} agent programs ({args.concurrency} at a time, KV pool {args.capacity_tokens} tokens) "
               f"and {counts['runs']} runs over {args.minutes:g} min. Drawn with uPlot from the dashboard JSON "
               f"(uid {args.uid}); not rendered by Grafana.")
        if args.save_data:
            args.save_data.write_text(json.dumps({"panels": panels, "sub": sub}))
        draw(panels, dashboard, sub, args.uplot_dir, args.out)
        print(json.dumps({"out": str(args.out), **counts,
                          "empty_panels": [p["title"] for p in panels if p["type"] != "row" and not p["series"]]}))
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
