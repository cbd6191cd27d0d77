#!/usr/bin/env bash
# The README's walk-through (Usage, Snapshots, Regions), in order, against a
# fresh `just run`: every command here stands in the README as it is here,
# and the tests run this script against a real server, so neither can drift.
#
#   just run                      # in one terminal
#   bash examples/tour.sh         # in another (BCP_NATS_URL or NATS_URL picks the server)
set -euo pipefail
bcp() { "${BCP:-./target/release/bcp}" "$@"; }
step() { printf '\n$ %s\n' "$*"; "$@"; }

# --- Usage
JOB=0192f0c4-0000-7000-8000-000000000001
step bcp send create --project demo --job $JOB --kind replica_set --name rs0 --actor alice
step bcp send start --project demo --job $JOB
step bcp send stop --project demo --job $JOB --expected-version 2 --actor carol
step bcp send start --project demo --job $JOB --body '{"actor":"bob"}'
step bcp jobs
step bcp job $JOB --project demo
step bcp history $JOB --project demo
step bcp status
step bcp send configure-region --project _admin --region us --body '{"snapshot_store":"s3-us","oplog_store":"oplog-us","sync_store":"sync-us"}'

# --- Snapshots, schedules and retention
SNAP=0192f0c4-0000-7000-8000-0000000000a1
SNAP_TAKEN=$(date -u +%Y-%m-%dT%H:%M:%SZ)
step bcp send change-schedule --project demo --job $JOB --schedule '{"snapshot_interval_hours":6,"daily_retention_days":7}'
step bcp send record-snapshot --project demo --job $JOB --snapshot-id $SNAP --taken-at $SNAP_TAKEN --size-bytes 1048576
step bcp snapshots $JOB --project demo
step bcp send set-snapshot-expiry --project demo --job $JOB --snapshot-id $SNAP --do-not-delete
step bcp send expire-snapshots --project demo --now 2099-01-01T00:00:00Z
step bcp send change-schedule --project demo --job $JOB --schedule '{"weekly_retention_weeks":4}'

# --- Regions
JOB2=0192f0c4-0000-7000-8000-000000000002
step bcp send configure-region --project _admin --region eu --body '{"snapshot_store":"s3-eu","oplog_store":"oplog-eu"}'
step bcp send create --project demo --job $JOB2 --kind replica_set --name rs1 --region eu
step bcp send start --project demo --job $JOB2
step bcp job $JOB2 --project demo
step bcp send configure-region --project _admin --region eu --body '{"sync_store":"sync-eu"}'
step bcp jobs --region eu --state Active
