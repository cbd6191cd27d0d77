#!/usr/bin/env python3
"""A bcp producer in Python, written from schemas/ and the README alone.

It drives one backup job through its life over NATS request/reply:
create, start, record a snapshot, retry a command (same command_id: the
original reply comes back with "duplicate": true), query the job and its
catalog, stop, and read the job's history. Every reply is checked; the
script exits 1 on anything unexpected.

    pip install nats-py
    python3 examples/producer.py --url nats://127.0.0.1:4222 --project demo
"""

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone

import nats


class Rejected(Exception):
    pass


def uuid7():
    """A fresh UUIDv7 (RFC 9562): time-ordered, so bcp appends each id next
    to the one before instead of on a random page (README, "Ids: send
    UUIDv7"). Python 3.14 has uuid.uuid7(); this is the same layout."""
    if hasattr(uuid, "uuid7"):
        return uuid.uuid7()
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a, rand_b = rand >> 68, rand & ((1 << 62) - 1)
    return uuid.UUID(int=(ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)


async def command(nc, project, verb, body, timeout=5.0):
    """Send one command; every body carries a fresh command_id unless given."""
    body = {"command_id": str(uuid7()), **body}
    msg = await nc.request(f"bcp.cmd.{project}.{verb}", json.dumps(body).encode(), timeout=timeout)
    reply = json.loads(msg.data)
    return body, reply


async def query(nc, project, kind, body):
    """Reads are scoped by project, as commands are: bcp.query.<project>.<kind>."""
    msg = await nc.request(f"bcp.query.{project}.{kind}", json.dumps(body).encode(), timeout=5.0)
    reply = json.loads(msg.data)
    if not reply["ok"]:
        raise Rejected(f"query {kind}: {reply['error']}")
    return reply


def expect_ok(verb, reply):
    if not reply["ok"]:
        raise Rejected(f"{verb} rejected: {reply['error']['code']}: {reply['error']['message']}")
    print(f"{verb:16} ok  version={reply.get('version')} events={[e['type'] for e in reply['events']]}")


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="nats://127.0.0.1:4222")
    ap.add_argument("--project", default="demo")
    ap.add_argument("--user", help="NATS user (with --password)")
    ap.add_argument("--password")
    ap.add_argument("--inbox-prefix", default="_INBOX", help="where replies come back")
    args = ap.parse_args()

    auth = {"user": args.user, "password": args.password} if args.user else {}
    nc = await nats.connect(args.url, inbox_prefix=args.inbox_prefix.encode(), **auth)
    job_id = str(uuid7())
    p = args.project

    _, r = await command(nc, p, "create", {
        "job_id": job_id,
        "actor": "producer.py",
        "deployment": {"kind": "replica_set", "name": "rs0"},
        "schedule": {"snapshot_interval_hours": 6, "daily_retention_days": 7},
    })
    expect_ok("create", r)

    start_body, r = await command(nc, p, "start", {"job_id": job_id, "expected_version": 1})
    expect_ok("start", r)

    # A retry with the same command_id: the first reply, marked duplicate.
    _, again = await command(nc, p, "start", start_body)
    if not (again["duplicate"] and again["events"] == r["events"]):
        raise Rejected(f"retry was not deduplicated: {again}")
    print(f"{'start (retry)':16} ok  duplicate={again['duplicate']}")

    # Starting an Active job is refused, with a code to branch on.
    _, refused = await command(nc, p, "start", {"job_id": job_id})
    if refused["ok"] or refused["error"]["code"] != "invalid_transition":
        raise Rejected(f"expected invalid_transition, got {refused}")
    print(f"{'start (again)':16} refused {refused['error']['code']}: {refused['error']['message']}")

    snapshot_id = str(uuid7())
    taken_at = datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    _, r = await command(nc, p, "record-snapshot", {
        "job_id": job_id, "snapshot_id": snapshot_id, "taken_at": taken_at, "size_bytes": 1 << 20,
    })
    expect_ok("record-snapshot", r)

    job = (await query(nc, p, "job", {"job_id": job_id}))["job"]
    print(f"{'job':16} state={job['state']} phase={job['phase']} snapshots={job['snapshot_count']}")
    if (job["state"], job["phase"], job["snapshot_count"]) != ("Active", "incremental", 1):
        raise Rejected(f"unexpected job view {job}")

    snaps = (await query(nc, p, "snapshots", {"job_id": job_id}))["snapshots"]
    print(f"{'snapshots':16} {[(s['snapshot_id'], s['classes'], s['expires_at']) for s in snaps]}")
    if [s["snapshot_id"] for s in snaps] != [snapshot_id]:
        raise Rejected(f"unexpected catalog {snaps}")

    _, r = await command(nc, p, "stop", {"job_id": job_id, "actor": "producer.py"})
    expect_ok("stop", r)

    history = (await query(nc, p, "history", {"job_id": job_id}))["history"]
    for h in history:
        change = f"REJECTED {h['code']}" if h["rejected"] else f"{h['from']} -> {h['to']}"
        print(f"  seq {h['seq']:>4} {h['verb']:16} {h['type']:18} {change}")

    await nc.drain()
    print(f"job {job_id} done")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except (Rejected, nats.errors.Error, asyncio.TimeoutError) as e:
        print(f"producer.py: {e}", file=sys.stderr)
        sys.exit(1)
