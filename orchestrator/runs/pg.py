"""The store's hot path on PostgreSQL: one statement, one round trip, per operation.

Each statement below does in one data-modifying CTE what would otherwise be a transaction of
four to eight statements (BEGIN, a fenced UPDATE of the run, the event INSERTs, a step
upsert, a re-read, COMMIT), each a round trip from Python and a turn of SQLAlchemy's
machinery. A single statement is atomic on its own, so no transaction is opened around it.
They run on the asyncpg connection under SQLAlchemy's pooled one (``RunStore._raw``), whose
JSON codec SQLAlchemy registered: ``json`` parameters go in as JSON text, results come out
decoded.

Fencing is the same as everywhere in the store: the run's row is updated only where its
``epoch`` is the caller's, and every other part of the statement reads the rows that
UPDATE returned, so a stale owner's statement writes nothing and returns no row.
"""

from __future__ import annotations

import hashlib

from orchestrator.runs.states import ACTIVE

# The active states as SQL literals: they are the code's constants, and as literals the planner
# knows how few rows they select, so a generic plan reads a tenant's active runs by index
# (``ix_runs_tenant_status``) rather than every run of the tenant.
_ACTIVE = ", ".join(sorted(f"'{s.value}'" for s in ACTIVE))

# A batch of runs (``GroupCommit``), each inserted with its first event, ``run.queued``. The
# arrays are the runs' columns, in the order their callers came. Dropped, in this order: a run
# whose Idempotency-Key its tenant has used (in the table, or earlier in the batch: the caller
# looks the first one up and answers as a replay); then, with a limit ($12) on the tenant's
# active runs of tenant $13, each run that would exceed it, in turn
# (``before`` counts the tenant's active runs ahead of it). The caller holds the tenant's lock
# when there is a limit, so the count and the key check see every committed submission; without
# a limit no count is made, and a key that another batch inserts meanwhile is caught by ON
# CONFLICT and answered as a replay too. One row comes back per run: its id, ``before`` (NULL
# for a known key) and whether it was inserted.
CREATE_MANY = """
WITH b AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[],
                         $8::text[], $9::float8[], $10::float8[], $11::text[])
        WITH ORDINALITY AS b(id, tenant, workflow, input, metadata, priority, idempotency_key, request_hash,
                             timeout_seconds, created_at, queue, ord)
), fresh AS (
    SELECT DISTINCT ON (b.tenant, coalesce(b.idempotency_key, b.id)) b.* FROM b
    WHERE b.idempotency_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM runs x WHERE x.tenant = b.tenant AND x.idempotency_key = b.idempotency_key)
    ORDER BY b.tenant, coalesce(b.idempotency_key, b.id), b.ord
), ranked AS (
    SELECT f.*, CASE WHEN $12::int IS NULL THEN 0 ELSE
        (SELECT count(*) FROM runs WHERE tenant = $13 AND status IN (""" + _ACTIVE + """))
        + row_number() OVER (ORDER BY f.ord) - 1 END AS before
    FROM fresh f
), r AS (
    INSERT INTO runs (id, tenant, workflow, status, input, metadata, priority, idempotency_key,
                      request_hash, timeout_seconds, created_at, updated_at, attempt, epoch,
                      cancel_requested, last_seq, queue)
    SELECT id, tenant, workflow, 'queued', input::json, metadata::json, priority, idempotency_key,
           request_hash, timeout_seconds, created_at, created_at, 0, 0, false, 1, queue
    FROM ranked WHERE $12::int IS NULL OR before < $12::int
    ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id, workflow, created_at
), e AS (
    INSERT INTO run_events (run_id, seq, type, data, created_at)
    SELECT id, 1, 'run.queued', json_build_object('status', 'queued', 'workflow', workflow), created_at FROM r
)
SELECT b.id, k.before, r.id IS NOT NULL AS inserted
FROM b LEFT JOIN ranked k ON k.id = b.id LEFT JOIN r ON r.id = b.id ORDER BY b.ord
"""

# Claim up to $1 queued runs: highest priority, then oldest; rows another claimer holds are
# skipped. Runs of the queues in $5 (those with limits) are left to CLAIM_LIMITED.
_CLAIMED = """
    UPDATE runs r SET status = 'running', epoch = r.epoch + 1, lease_owner = $2,
        lease_expires_at = $3::float8 + $4::float8,
        attempt = r.attempt + 1, started_at = coalesce(r.started_at, $3), updated_at = $3,
        deadline_at = coalesce(r.deadline_at, r.timeout_seconds + $3), last_seq = r.last_seq + 1
    FROM c WHERE r.id = c.id AND r.status = 'queued'
    RETURNING r.*
), e AS (
    INSERT INTO run_events (run_id, seq, type, data, created_at)
    SELECT id, last_seq, 'run.started',
           json_build_object('status', 'running', 'attempt', attempt, 'worker', $2::text), $3
    FROM u
)
SELECT * FROM u ORDER BY priority DESC, id
"""

CLAIM = """
WITH c AS (
    SELECT id FROM runs WHERE status = 'queued' AND queue <> ALL($5::text[])
    ORDER BY priority DESC, id LIMIT $1 FOR UPDATE SKIP LOCKED
), u AS (""" + _CLAIMED

# Claim from the queues with limits ($5 names, $6 each one's concurrency, $7 its per-tenant
# concurrency; NULL: none), counting the runs of each queue and tenant that execute now
# ($8: the leased states). Within a queue, by priority, then round robin over tenants (a
# tenant's n-th queued run after every other tenant's (n-1)-th), then age: one tenant's burst
# does not hold the others back. The caller holds QUEUE_CLAIM_LOCK, so no other claimer counts
# the same free slots.
CLAIM_LIMITED = """
WITH lim AS (
    SELECT * FROM unnest($5::text[], $6::int[], $7::int[]) AS l(queue, conc, tconc)
), running AS (
    SELECT queue, tenant, count(*) AS n FROM runs
    WHERE status = ANY($8::text[]) AND queue = ANY($5::text[]) GROUP BY queue, tenant
), qrun AS (
    SELECT queue, sum(n) AS n FROM running GROUP BY queue
), cand AS (
    SELECT id, queue, tenant, priority,
           row_number() OVER (PARTITION BY queue, tenant ORDER BY priority DESC, id) AS tn
    FROM runs WHERE status = 'queued' AND queue = ANY($5::text[])
), fit AS (
    SELECT c.*, row_number() OVER (PARTITION BY c.queue ORDER BY c.priority DESC, c.tn, c.id) AS qn
    FROM cand c JOIN lim l ON l.queue = c.queue
    LEFT JOIN running x ON x.queue = c.queue AND x.tenant = c.tenant
    WHERE l.tconc IS NULL OR coalesce(x.n, 0) + c.tn <= l.tconc
), c AS (
    SELECT f.id FROM fit f JOIN lim l ON l.queue = f.queue LEFT JOIN qrun q ON q.queue = f.queue
    WHERE l.conc IS NULL OR coalesce(q.n, 0) + f.qn <= l.conc
    ORDER BY f.priority DESC, f.tn, f.id LIMIT $1
), u AS (""" + _CLAIMED

QUEUE_CLAIM_LOCK = 0x6F72636871  # "orchq": one claimer of the limited queues at a time

# Renew many leases at once: those whose epoch moved on come back missing (lost).
HEARTBEAT = """
WITH w AS (
    UPDATE workers SET heartbeat_at = $2::float8 WHERE id = $1
)
UPDATE runs SET lease_expires_at = $2::float8 + $3::float8
FROM unnest($4::text[], $5::int[]) AS v(id, epoch)
WHERE runs.id = v.id AND runs.epoch = v.epoch
RETURNING runs.id, runs.cancel_requested
"""

# A batch of an execution's writes: events (those whose op_key is already in the log are
# dropped, so the sequence stays gap-free), step checkpoints (upserted) and, with a status in
# $8, the run's outcome. Returns the new ``last_seq``, how many events were written and which
# of the given ones (1-based positions), or no row when the lease is lost.
WRITE = """
WITH v AS (
    SELECT * FROM unnest($3::text[], $4::text[], $5::float8[], $6::text[])
        WITH ORDINALITY AS v(type, data, created_at, op_key, ord)
    WHERE v.op_key IS NULL
       OR NOT EXISTS (SELECT 1 FROM run_events x WHERE x.run_id = $1 AND x.op_key = v.op_key)
), n AS (
    SELECT count(*)::int AS k, coalesce(array_agg(ord::int ORDER BY ord), '{}') AS written FROM v
), r AS (
    UPDATE runs SET last_seq = last_seq + (SELECT k FROM n), updated_at = $7,
        status = coalesce($8::text, status),
        output = CASE WHEN $8::text IS NULL THEN output ELSE $9::json END,
        error = CASE WHEN $8::text IS NULL THEN error ELSE $10::json END,
        finished_at = CASE WHEN $8::text IS NULL THEN finished_at ELSE $7 END,
        lease_owner = CASE WHEN $8::text IS NULL THEN lease_owner END,
        lease_expires_at = CASE WHEN $8::text IS NULL THEN lease_expires_at END
    WHERE id = $1 AND epoch = $2
    RETURNING last_seq
), e AS (
    INSERT INTO run_events (run_id, seq, type, data, created_at, op_key)
    SELECT $1, r.last_seq - n.k + (row_number() OVER (ORDER BY v.ord))::int, v.type, v.data::json,
           v.created_at, v.op_key
    FROM r, n, v
), s AS (
    INSERT INTO run_steps (run_id, step_id, name, status, output, error, attempt, started_at, finished_at)
    SELECT $1, w.step_id, w.name, w.status, w.output::json, w.error::json, w.attempt, w.started_at, w.finished_at
    FROM r, unnest($11::int[], $12::text[], $13::text[], $14::text[], $15::text[], $16::int[],
                   $17::float8[], $18::float8[])
        AS w(step_id, name, status, output, error, attempt, started_at, finished_at)
    ON CONFLICT (run_id, step_id) DO UPDATE SET
        name = excluded.name, status = excluded.status, output = excluded.output, error = excluded.error,
        attempt = excluded.attempt, started_at = excluded.started_at, finished_at = excluded.finished_at
)
SELECT r.last_seq, n.k, n.written FROM r, n
"""

# Liveness: a worker holds this session lock on a connection of its own while it lives. The
# server drops it the moment that session ends (the process died, its host went away and the
# socket was reset, an admin terminated it), which is how other workers learn the owner of a
# run is gone long before its lease would expire.
LIVENESS_LOCK_SPACE = 0x6F726368  # "orch"
LIVENESS_LOCK = f"SELECT pg_advisory_lock({LIVENESS_LOCK_SPACE}, hashtext($1))"

# Workers registered as holding the lock whose lock is free are marked dead, and the leases of
# their runs end now, so that the next recovery pass takes the runs over.
EXPIRE_DEAD_OWNERS = f"""
WITH dead AS (
    UPDATE workers w SET status = 'dead'
    WHERE w.status = 'active' AND w.liveness_lock AND w.id <> $1
      AND NOT EXISTS (
          SELECT 1 FROM pg_locks l
          WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {LIVENESS_LOCK_SPACE}
            AND l.objid = hashtext(w.id)::oid AND l.objsubid = 2
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
    RETURNING w.id
)
UPDATE runs SET lease_expires_at = 0
FROM dead WHERE runs.lease_owner = dead.id AND runs.status = ANY($2::text[])
RETURNING runs.id
"""

GET = "SELECT * FROM runs WHERE id = $1"
GET_FOR_TENANT = "SELECT * FROM runs WHERE id = $1 AND tenant = $2"


def tenant_lock_key(tenant: str) -> int:
    """The tenant's advisory lock key: 64 bits of a hash, stable across processes and versions."""
    return int.from_bytes(hashlib.sha256(b"orch-tenant:" + tenant.encode()).digest()[:8], "big", signed=True)


def tenant_lock_sql(tenant: str) -> str:
    """BEGIN and take the tenant's advisory lock, in one simple-protocol round trip.

    The key is computed here, so the statement carries only an integer literal.
    """
    return f"BEGIN; SELECT pg_advisory_xact_lock({tenant_lock_key(tenant)})"
