"""The ``orchestrator`` command: ``serve``, ``migrate``, ``runs ...`` and ``batches ...`` (on the SDK).

The client commands import only the SDK (``orchestrator_sdk``) and the settings module, not the
server, so they start fast. Their API key defaults to the development key, which a service
accepts only while ``ORCH_API_KEYS`` is unset (``make serve``): a newcomer's first command works,
and a configured service still answers it 401.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from orchestrator.settings import DEV_API_KEY
from orchestrator_sdk import BatchEvent, Client, OrchestratorError, RunEvent


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _progress_line(ev: RunEvent) -> str:
    at = datetime.fromtimestamp(ev.created_at).strftime("%H:%M:%S.%f")[:-3]
    data = json.dumps(ev.data, separators=(",", ":"), default=str)
    return f"{at} [{ev.seq:>3}] {ev.type:<16} {data}"


def _client(args: argparse.Namespace) -> Client:
    key = args.api_key or os.environ.get("ORCH_API_KEY") or DEV_API_KEY
    return Client(base_url=args.base_url, api_key=key)


def cmd_serve(args: argparse.Namespace) -> int:
    from orchestrator.server import serve
    from orchestrator.settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    serve(Settings(**overrides))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply database migrations and exit (for a pre-deploy job)."""
    import asyncio

    from orchestrator.db import create_engine, migrate
    from orchestrator.settings import Settings

    async def run() -> None:
        engine = create_engine(Settings().database_url)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    print("migrations applied")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    raw = sys.stdin.read() if args.file == "-" else open(args.file).read()
    try:
        spec = json.loads(raw)
    except ValueError as exc:
        raise SystemExit(f"error: {args.file} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict) or "workflow" not in spec:
        raise SystemExit('error: the run file must be a JSON object with a "workflow" field')
    with _client(args) as client:
        run = client.runs.create(spec["workflow"], spec.get("input"), metadata=spec.get("metadata"),
                                 priority=spec.get("priority", 0), timeout_seconds=spec.get("timeout_seconds"))
        if not args.follow:
            _print_json(run.model_dump())
            return 0
        print(f"submitted {run.id} ({run.workflow})", flush=True)
        for ev in client.runs.stream(run.id):
            print(_progress_line(ev), flush=True)
        final = client.runs.get(run.id)
        _print_json({"id": final.id, "status": final.status, "output": final.output, "error": final.error})
        return 0 if final.status == "succeeded" else 1


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.runs.get(args.run_id, wait=args.wait).model_dump())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.runs.list(limit=args.limit, status=args.status, workflow=args.workflow, after=args.after)
    for run in page.data:
        print(f"{run.id}  {run.workflow:<16} {run.status:<10} attempt={run.attempt}")
    if page.has_more:
        print(f"more: --after {page.next_cursor}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        run = client.runs.cancel(args.run_id)
    print(f"{run.id} {run.status}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    with _client(args) as client:
        run = client.runs.resume(args.run_id)
    print(f"{run.id} {run.status} attempt={run.attempt}")
    return 0


def cmd_fork(args: argparse.Namespace) -> int:
    with _client(args) as client:
        run = client.runs.fork(args.run_id, from_step=args.from_step)
    print(f"{run.id} {run.status} forked_from={run.forked_from} from_step={run.forked_from_step}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    with _client(args) as client:
        events = client.runs.stream(args.run_id) if args.follow else client.runs.events(
            args.run_id, limit=1000).data
        for ev in events:
            print(_progress_line(ev), flush=True)
    return 0


def cmd_batch_submit(args: argparse.Namespace) -> int:
    """A JSONL file (one workflow input a line) as one batch; ``--follow`` prints each run as it
    finishes, ``--results FILE`` then writes the results (JSONL, input order)."""
    text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    requests = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                requests.append(json.loads(line))
            except ValueError as exc:
                print(f"error: line {n} of {args.file} is not JSON: {exc}", file=sys.stderr)
                return 2
    with _client(args) as client:
        batch = client.batches.create(requests, workflow=args.workflow, return_tokens=args.return_tokens)
        print(f"{batch.id} {batch.status} runs={batch.counts.total}", flush=True)
        if args.follow or args.results:
            for ev in client.batches.stream(batch.id):
                if args.follow:
                    print(_batch_event_line(ev), flush=True)
        if args.results:
            _write_results(client, batch.id, args.results)
    return 0


def _batch_event_line(ev: BatchEvent) -> str:
    if ev.final:
        return f"{ev.type} {ev.status} {json.dumps(ev.counts)}"
    return f"{ev.type} [{ev.index}] {ev.run_id} {ev.status}"


def _write_results(client: Client, batch_id: str, path: str) -> None:
    lines = [r.model_dump_json(exclude_none=True) + "\n" for r in client.batches.results(batch_id)]
    if path == "-":
        sys.stdout.writelines(lines)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines)


def cmd_batch_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.batches.get(args.batch_id).model_dump())
    return 0


def cmd_batch_results(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _write_results(client, args.batch_id, args.output)
    return 0


def cmd_batch_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        batch = client.batches.cancel(args.batch_id)
    print(f"{batch.id} {batch.status}")
    return 0


def cmd_batch_events(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for ev in client.batches.stream(args.batch_id):
            print(_batch_event_line(ev), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestrator", description="Agentic orchestrator service and client.")
    p.add_argument("--base-url", help="service URL (env ORCH_BASE_URL, default http://127.0.0.1:8080)")
    p.add_argument("--api-key", help=f"API key (env ORCH_API_KEY; default {DEV_API_KEY}, the development key a "
                                     "service accepts while its ORCH_API_KEYS is unset)")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service (settings from ORCH_* variables)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(fn=cmd_serve)
    sub.add_parser("migrate", help="apply database migrations and exit").set_defaults(fn=cmd_migrate)

    runs = sub.add_parser("runs", help="submit and inspect runs").add_subparsers(dest="runs_command", required=True)
    submit = runs.add_parser("submit", help="submit a run from a JSON file ('-' for stdin)")
    submit.add_argument("file")
    submit.add_argument("--follow", action="store_true", help="stream its events until it finishes")
    submit.set_defaults(fn=cmd_submit)
    get = runs.add_parser("get", help="show a run")
    get.add_argument("run_id")
    get.add_argument("--wait", type=float, help="long-poll up to this many seconds for it to finish")
    get.set_defaults(fn=cmd_get)
    lst = runs.add_parser("list", help="list runs, newest first")
    lst.add_argument("--status", action="append", help="filter by status (repeatable)")
    lst.add_argument("--workflow")
    lst.add_argument("--limit", type=int, default=20)
    lst.add_argument("--after", help="cursor from a previous page")
    lst.set_defaults(fn=cmd_list)
    cancel = runs.add_parser("cancel", help="cancel a run")
    cancel.add_argument("run_id")
    cancel.set_defaults(fn=cmd_cancel)
    resume = runs.add_parser("resume", help="queue a failed, cancelled or timed-out run again from its checkpoints")
    resume.add_argument("run_id")
    resume.set_defaults(fn=cmd_resume)
    fork = runs.add_parser("fork", help="start a new run from another run's checkpoints")
    fork.add_argument("run_id")
    fork.add_argument("--from-step", type=int, required=True,
                      help="the first step the new run executes; earlier ones come from the original")
    fork.set_defaults(fn=cmd_fork)
    events = runs.add_parser("events", help="print a run's events")
    events.add_argument("run_id")
    events.add_argument("--follow", action="store_true", help="stream until the run finishes")
    events.set_defaults(fn=cmd_events)

    batches = sub.add_parser("batches", help="submit and inspect batches of runs (RL rollouts)").add_subparsers(
        dest="batches_command", required=True)
    bsubmit = batches.add_parser("submit", help="submit a JSONL file ('-' for stdin), one workflow input a line")
    bsubmit.add_argument("file")
    bsubmit.add_argument("--workflow", default="agent")
    bsubmit.add_argument("--return-tokens", action="store_true",
                         help="agent runs record token ids, logprobs and a loss mask for training")
    bsubmit.add_argument("--follow", action="store_true", help="print each run as it finishes")
    bsubmit.add_argument("--results", help="when all have finished, write the results (JSONL) here ('-': stdout)")
    bsubmit.set_defaults(fn=cmd_batch_submit)
    bget = batches.add_parser("get", help="show a batch: status and counts")
    bget.add_argument("batch_id")
    bget.set_defaults(fn=cmd_batch_get)
    bres = batches.add_parser("results", help="write a batch's results, JSONL in input order")
    bres.add_argument("batch_id")
    bres.add_argument("-o", "--output", default="-", help="file to write ('-': stdout)")
    bres.set_defaults(fn=cmd_batch_results)
    bcancel = batches.add_parser("cancel", help="cancel every unfinished run of a batch")
    bcancel.add_argument("batch_id")
    bcancel.set_defaults(fn=cmd_batch_cancel)
    bevents = batches.add_parser("events", help="print each run of a batch as it finishes, until all have")
    bevents.add_argument("batch_id")
    bevents.set_defaults(fn=cmd_batch_events)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
