#!/usr/bin/env python3
"""Recompute bcp's hash chain from an exported log, from the README alone.

    bcp export --db data/bcp.redb --out data/log.jsonl
    pip install blake3 && python3 examples/verify_log.py data/log.jsonl

Exit 0 and "ok: N events, head hash H", or exit 1 naming the first bad seq.
"""
import json
import sys

from blake3 import blake3

prev, n = "0" * 64, 0  # the first event's prev_hash: 64 zeros
with open(sys.argv[1], "rb") as log:
    for n, line in enumerate(log, 1):
        line = line.rstrip(b"\r\n")
        env = json.loads(line)
        last = b',"hash":"' + env["hash"].encode() + b'"}'  # hash is the last field
        if env["seq"] != n or env["prev_hash"] != prev or not line.endswith(last):
            sys.exit(f"seq {n}: not linked to the event before (or hash not last)")
        unhashed = line[: -len(last)] + b"}"  # the stored bytes without the hash field
        if blake3(prev.encode() + unhashed).hexdigest() != env["hash"]:
            sys.exit(f"seq {n}: hash does not match the event")
        prev = env["hash"]
print(f"ok: {n} events, head hash {prev}")
