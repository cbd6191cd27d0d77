//! A 3-node JetStream cluster on loopback (each nats-server with its
//! `server_name`, `jetstream { store_dir }` and a `cluster` block routing to
//! the other two) and `bcp serve --group` nodes on it, each on its own redb
//! file. Children are killed on drop; when a test panics, the tails of every
//! log are printed.

use super::{Deadline, STARTUP, append_log, free_port, kill_and_reap, tail};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

pub const GROUP: &str = "g1";

struct Server {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
    /// The configuration but for the test's extra text.
    base: String,
    log: PathBuf,
}

pub struct Cluster {
    servers: Vec<Server>,
    /// `bcp serve` per node name, while running.
    pub nodes: Vec<(String, Option<Child>)>,
    /// Each node's files: `<stem>.redb`, `<stem>.log` (the node's name,
    /// but for a node added under a name already taken).
    stems: Vec<String>,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    dir: TempDir,
}

impl Cluster {
    /// Three nats-servers forming one JetStream cluster (ready: the
    /// JetStream API answers), and `bcp` nodes `b1..=bN` of group [`GROUP`].
    pub async fn start(nodes: usize) -> Cluster {
        Cluster::start_with(nodes, "").await
    }

    /// As [`start`](Cluster::start), each server's configuration ending
    /// with `extra` (an `authorization` block, say).
    pub async fn start_with(nodes: usize, extra: &str) -> Cluster {
        Cluster::start_configured(nodes, "", extra).await
    }

    /// As [`start_with`](Cluster::start_with), with `jetstream` (say a
    /// `limits` block) inside each server's `jetstream` block.
    pub async fn start_configured(nodes: usize, jetstream: &str, extra: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("bcp-cluster-test")
            .tempdir()
            .expect("temp dir");
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for i in 0..route_ports.len() {
            let (name, port) = (format!("n{}", i + 1), free_port());
            let store = dir.path().join(format!("js-{name}"));
            let mut s = Server {
                child: None,
                port,
                conf: dir.path().join(format!("{name}.conf")),
                base: format!(
                    "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\"\n{jetstream} }}\n{}",
                    store.display(),
                    super::procs::cluster_block(&name, "bcp-test", i, &route_ports)
                ),
                log: dir.path().join(format!("{name}.log")),
            };
            s.configure(extra);
            s.spawn();
            servers.push(s);
        }
        let client = super::connect(&format!("nats://127.0.0.1:{}", servers[0].port)).await;
        let js = async_nats::jetstream::new(client.clone());
        let mut c = Cluster {
            servers,
            nodes: (1..=nodes).map(|i| (format!("b{i}"), None)).collect(),
            stems: (1..=nodes).map(|i| format!("b{i}")).collect(),
            client,
            js,
            dir,
        };
        c.wait_jetstream().await;
        for i in 0..nodes {
            c.spawn_node(i);
        }
        c
    }

    /// Every server's client URL, comma-separated.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn db(&self, node: usize) -> PathBuf {
        self.path(&format!("{}.redb", self.stems[node]))
    }

    fn node_log(&self, node: usize) -> PathBuf {
        self.path(&format!("{}.log", self.stems[node]))
    }

    pub fn node_log_text(&self, node: usize) -> String {
        std::fs::read_to_string(self.node_log(node)).unwrap_or_default()
    }

    /// Until the JetStream API answers without error (a meta leader exists).
    async fn wait_jetstream(&self) {
        let deadline = Deadline::new("the JetStream cluster to answer $JS.API.INFO", STARTUP);
        loop {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                self.client.request("$JS.API.INFO", "".into()),
            )
            .await;
            if let Ok(Ok(m)) = r
                && let Ok(v) = serde_json::from_slice::<Value>(&m.payload)
                && v.get("error").is_none()
            {
                return;
            }
            deadline.tick().await;
        }
    }

    /// Add a node named `name` (not started) whose files are `<stem>.*`;
    /// its index.
    pub fn add_node(&mut self, name: &str, stem: &str) -> usize {
        self.nodes.push((name.to_owned(), None));
        self.stems.push(stem.to_owned());
        self.nodes.len() - 1
    }

    /// Start node `i` (`bcp serve --group`), not waiting for it.
    pub fn spawn_node(&mut self, i: usize) {
        self.spawn_node_as(i, None);
    }

    /// Start node `i` as [`spawn_node`](Cluster::spawn_node), connecting
    /// as `user` (name and password of a user of the servers'
    /// `authorization`).
    pub fn spawn_node_as(&mut self, i: usize, user: Option<(&str, &str)>) {
        assert!(self.nodes[i].1.is_none(), "node {i} is running");
        let out = append_log(&self.node_log(i));
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_bcp"));
        let mut command = super::procs::serve_command(bin, &self.db(i), &self.urls());
        if let Some((user, password)) = user {
            command
                .env("BCP_NATS_USER", user)
                .env("BCP_NATS_PASSWORD", password);
        }
        let child = command
            .args(["--group", GROUP, "--node", &self.nodes[i].0])
            .args(["--stream-replicas", "3", "--stream-check-interval", "2"])
            .stdout(out.try_clone().expect("clone log handle"))
            .stderr(out)
            .spawn()
            .expect("start bcp serve --group");
        self.nodes[i].1 = Some(child);
    }

    /// kill -9 node `i`; its log gets a line `<time> KILLED` first (the
    /// end of any term it was leading).
    pub fn kill_node(&mut self, i: usize) {
        use std::io::Write;
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let _ = writeln!(append_log(&self.node_log(i)), "{now} KILLED");
        kill_and_reap(&mut self.nodes[i].1);
    }

    /// A producer's own connection, to every server of the cluster.
    pub async fn producer(&self) -> async_nats::Client {
        let urls: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.port))
            .collect();
        async_nats::ConnectOptions::new()
            .connect(urls)
            .await
            .expect("connect a producer")
    }

    /// Wait for node `i` to exit by itself (a refusal); its exit code.
    pub async fn exited(&mut self, i: usize) -> Option<i32> {
        let deadline = Deadline::new(format!("node {i} to exit"), Duration::from_secs(30));
        loop {
            let child = self.nodes[i].1.as_mut().expect("node started");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.nodes[i].1 = None;
                return status.code();
            }
            deadline.tick().await;
        }
    }

    /// SIGTERM node `i` and wait for it to drain; its exit code.
    pub async fn stop_node(&mut self, i: usize) -> Option<i32> {
        let mut child = self.nodes[i].1.take().expect("node running");
        super::terminate(&mut child, "bcp serve --group (SIGTERM)")
            .await
            .code()
    }

    pub fn kill_server(&mut self, i: usize) {
        kill_and_reap(&mut self.servers[i].child);
    }

    pub fn restart_server(&mut self, i: usize) {
        self.servers[i].spawn();
    }

    /// Every server's configuration ending with `extra` instead, reloaded
    /// live (`nats-server --signal reload`).
    pub fn reconfigure(&mut self, extra: &str) {
        for s in &mut self.servers {
            s.configure(extra);
            let pid = s.child.as_ref().expect("server running").id();
            let status = Command::new(super::nats_server_bin())
                .arg("--signal")
                .arg(format!("reload={pid}"))
                .status()
                .expect("nats-server --signal reload");
            assert!(status.success(), "reload of {}: {status}", s.conf.display());
        }
    }

    /// Every node's `bcp.status` reply that comes within half a second.
    pub async fn statuses(&self) -> Vec<Value> {
        use futures::StreamExt;
        let inbox = self.client.new_inbox();
        let Ok(mut sub) = self.client.subscribe(inbox.clone()).await else {
            return vec![];
        };
        if self
            .client
            .publish_with_reply("bcp.status", inbox, "{}".into())
            .await
            .is_err()
        {
            return vec![];
        }
        let mut out = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(m)) = tokio::time::timeout_at(until, sub.next()).await {
            if m.status.is_none() {
                out.push(serde_json::from_slice(&m.payload).expect("status JSON"));
            }
        }
        out
    }

    /// Wait until exactly one node says it leads and `running` nodes
    /// answer; the leader's node index.
    pub async fn leader(&self, running: usize) -> usize {
        let deadline = Deadline::new("one leader among the bcp nodes", STARTUP);
        loop {
            let s = self.statuses().await;
            let leaders: Vec<&Value> = s.iter().filter(|v| v["role"] == json!("leader")).collect();
            if s.len() == running && leaders.len() == 1 {
                let name = leaders[0]["node"].as_str().expect("node");
                let db = leaders[0]["db"].as_str().expect("db");
                return (0..self.nodes.len())
                    .find(|&i| self.nodes[i].0 == name && self.db(i).to_str() == Some(db))
                    .expect("a known node");
            }
            deadline.tick().await;
        }
    }

    /// Wait until every running node reports head `seq`.
    pub async fn all_at(&self, running: usize, seq: u64) -> Vec<Value> {
        let deadline = Deadline::new(format!("every node at head {seq}"), Duration::from_secs(60));
        loop {
            let s = self.statuses().await;
            if s.len() == running && s.iter().all(|v| v["head_seq"] == json!(seq)) {
                return s;
            }
            deadline.tick().await;
        }
    }
}

impl Server {
    fn configure(&self, extra: &str) {
        std::fs::write(&self.conf, format!("{}\n{extra}\n", self.base)).expect("write nats config");
    }

    fn spawn(&mut self) {
        let out = append_log(&self.log);
        let bin = super::nats_server_bin();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        self.child = Some(child);
        let deadline = std::time::Instant::now() + STARTUP;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server {} did not listen:\n{}",
                self.conf.display(),
                tail(&self.log, 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                eprintln!(
                    "----- {} log -----\n{}",
                    self.nodes[i].0,
                    tail(&self.node_log(i), 80)
                );
            }
            for s in &self.servers {
                eprintln!("----- {} -----\n{}", s.log.display(), tail(&s.log, 20));
            }
        }
        for (_, child) in &mut self.nodes {
            kill_and_reap(child);
        }
        for s in &mut self.servers {
            kill_and_reap(&mut s.child);
        }
    }
}
