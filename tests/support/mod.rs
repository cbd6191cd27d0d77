//! The harness of the NATS integration tests: a real `nats-server`
//! (JetStream on, file store in a temp dir, a free loopback port), a real
//! `bcp serve` child process on a redb file in the same temp dir, and an
//! async-nats producer client. No mocks.
//!
//! Children are killed on drop. Readiness is polled with deadlines (never a
//! fixed sleep). When a test panics, the harness prints the tails of the
//! nats-server and bcp logs, which are captured into files in the temp dir.

/// The 3-node cluster of the group-mode tests (tests/onelog.rs).
#[allow(dead_code)]
pub mod cluster;
#[allow(dead_code)]
pub mod procs;

use async_nats::jetstream::{self, message::StreamMessage, stream};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub const STREAM: &str = "BCP_EVENTS";
/// How long a child may take to become ready, or to exit after SIGTERM.
pub const STARTUP: Duration = Duration::from_secs(30);
/// How long a reply may take; generous, the machine is small and shared.
pub const REPLY: Duration = Duration::from_secs(10);
/// How long the relay may take to catch up (includes NATS reconnect backoff).
pub const CATCH_UP: Duration = Duration::from_secs(60);
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A deadline for a polling loop: `tick` sleeps briefly, or panics with
/// `what` once the deadline has passed.
pub struct Deadline {
    until: Instant,
    timeout: Duration,
    what: String,
}

impl Deadline {
    pub fn new(what: impl Into<String>, timeout: Duration) -> Deadline {
        Deadline {
            until: Instant::now() + timeout,
            timeout,
            what: what.into(),
        }
    }

    pub async fn tick(&self) {
        assert!(
            Instant::now() < self.until,
            "timed out after {:?} waiting for {}",
            self.timeout,
            self.what
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The nats-server binary ([`procs::find_nats_server`]). Never skips: a
/// missing binary fails the test with how to install one.
pub fn nats_server_bin() -> PathBuf {
    procs::find_nats_server()
        .unwrap_or_else(|e| panic!("The NATS integration tests need a real nats-server: {e}"))
}

pub use procs::{free_port, tail};

fn append_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

fn kill_and_reap(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// SIGTERM `child` and wait (at most [`STARTUP`]) for it to exit.
pub async fn terminate(child: &mut Child, what: &str) -> ExitStatus {
    let pid = child.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill -TERM");
    assert!(sent.success(), "kill -TERM {pid} failed");
    wait_exit(child, what, STARTUP).await
}

/// Wait for a child to exit (polling), at most `timeout`.
async fn wait_exit(child: &mut Child, what: &str, timeout: Duration) -> ExitStatus {
    let deadline = Deadline::new(format!("{what} to exit"), timeout);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        deadline.tick().await;
    }
}

/// A `nats-server -js` child process.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    pub store: PathBuf,
    pub log: PathBuf,
}

impl Nats {
    /// Start on `port` with its JetStream store in `store`; returns once it
    /// accepts TCP connections.
    pub async fn start(port: u16, store: &Path, log: &Path) -> Nats {
        Nats::start_configured(port, store, log, "").await
    }

    /// [`Nats::start`] with `conf` as its configuration file's text (e.g.
    /// `max_payload: 8192`), written beside the store.
    pub async fn start_configured(port: u16, store: &Path, log: &Path, conf: &str) -> Nats {
        std::fs::create_dir_all(store).expect("create nats store dir");
        let conf_path = store.with_extension("conf");
        std::fs::write(&conf_path, conf).expect("write nats-server.conf");
        let out = append_log(log);
        let bin = nats_server_bin();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf_path)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut nats = Nats {
            child: Some(child),
            port,
            store: store.to_owned(),
            log: log.to_owned(),
        };
        let deadline = Deadline::new(format!("nats-server to listen on port {port}"), STARTUP);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let child = nats.child.as_mut().expect("child");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "nats-server exited with {status} before listening:\n{}",
                    tail(log, 40)
                );
            }
            deadline.tick().await;
        }
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its configuration replaced by `conf`, reloaded live
    /// (`nats-server --signal reload`).
    #[allow(dead_code)] // tests/onelog.rs's
    pub fn reconfigure(&self, conf: &str) {
        std::fs::write(self.store.with_extension("conf"), conf).expect("write nats-server.conf");
        let pid = self.child.as_ref().expect("nats-server running").id();
        let status = Command::new(nats_server_bin())
            .arg("--signal")
            .arg(format!("reload={pid}"))
            .status()
            .expect("nats-server --signal reload");
        assert!(status.success(), "reload of nats-server {pid}: {status}");
    }

    /// SIGKILL: no goodbye, as a crash.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// SIGSTOP (`true`) or SIGCONT: a frozen server still accepts TCP
    /// connections (the kernel's backlog) and never answers.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("nats-server running").id();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}: {status}");
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `bcp serve` child process.
pub struct Bcp {
    child: Option<Child>,
}

impl Bcp {
    fn spawn(db: &Path, nats_url: &str, log: &Path, extra: &[String]) -> Bcp {
        let out = append_log(log);
        let child = procs::serve_command(Path::new(env!("CARGO_BIN_EXE_bcp")), db, nats_url)
            .args(extra)
            .stdout(out.try_clone().expect("clone log handle"))
            .stderr(out)
            .spawn()
            .expect("start bcp serve");
        Bcp { child: Some(child) }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("bcp serve is running")
    }

    /// SIGTERM, then wait for the drain to finish.
    async fn terminate(&mut self) -> ExitStatus {
        let status = terminate(self.child(), "bcp serve (SIGTERM)").await;
        self.child = None;
        status
    }
}

impl Drop for Bcp {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// One test's world: a temp dir with the nats store, the redb file and the
/// logs; a nats-server; `bcp serve`; a producer client.
pub struct Harness {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    bcp: Option<Bcp>,
    /// Extra `bcp serve` arguments, used at every (re)start.
    pub serve_args: Vec<String>,
    pub nats: Nats,
    dir: TempDir,
}

impl Harness {
    /// A nats-server and a ready `bcp serve`.
    pub async fn start() -> Harness {
        Harness::start_with(&[]).await
    }

    /// As [`Harness::start`], with extra `bcp serve` arguments (kept for
    /// every restart), e.g. `["--sweep-interval", "1"]`.
    pub async fn start_with(serve_args: &[&str]) -> Harness {
        Harness::start_configured("", serve_args).await
    }

    /// As [`Harness::start_with`], the nats-server configured by `nats_conf`.
    pub async fn start_configured(nats_conf: &str, serve_args: &[&str]) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("bcp-nats-test")
            .tempdir()
            .expect("temp dir");
        let nats = Nats::start_configured(
            free_port(),
            &dir.path().join("nats-a"),
            &dir.path().join("nats.log"),
            nats_conf,
        )
        .await;
        let client = connect(&nats.url()).await;
        let mut h = Harness {
            js: jetstream::new(client.clone()),
            client,
            bcp: None,
            serve_args: serve_args.iter().map(|a| (*a).to_owned()).collect(),
            nats,
            dir,
        };
        h.start_bcp().await;
        h
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn db(&self) -> PathBuf {
        self.path("bcp.redb")
    }

    fn bcp_log(&self) -> PathBuf {
        self.path("bcp.log")
    }

    /// Start `bcp serve` on the db and the current nats-server; returns once
    /// it answers a query and its command intake answers (a `bad_request`
    /// probe, which appends nothing).
    pub async fn start_bcp(&mut self) {
        self.spawn_bcp();
        let deadline = Deadline::new("bcp serve to answer queries and commands", STARTUP);
        loop {
            let child = self.bcp.as_mut().expect("bcp").child();
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("bcp serve exited with {status} while starting");
            }
            let short = Duration::from_secs(1);
            let query = self.try_request("bcp.query._admin.jobs", b"{}".to_vec(), short);
            let probe = self.try_request("bcp.cmd.ready.start", b"{}".to_vec(), short);
            let (query, probe) = tokio::join!(query, probe);
            if let (Ok(q), Ok(p)) = (query, probe)
                && q["ok"] == json!(true)
                && q["jobs"].is_array()
                && p["error"]["code"] == json!("bad_request")
            {
                return;
            }
            deadline.tick().await;
        }
    }

    /// Wait for `bcp serve` to exit by itself (a refusal at start).
    #[allow(dead_code)] // tests/onelog.rs's
    pub async fn bcp_exit(&mut self) -> ExitStatus {
        let mut bcp = self.bcp.take().expect("bcp serve is running");
        let child = bcp.child.as_mut().expect("bcp serve child");
        wait_exit(child, "bcp serve", STARTUP).await
    }

    /// SIGTERM `bcp serve` and wait for it to drain and exit.
    pub async fn stop_bcp(&mut self) -> ExitStatus {
        let mut bcp = self.bcp.take().expect("bcp serve is running");
        bcp.terminate().await
    }

    /// Replace the nats-server (SIGKILL the old one first) with one on
    /// `port` using `store`, and reconnect the producer client.
    pub async fn restart_nats(&mut self, port: u16, store: &Path) {
        self.nats.kill();
        self.nats = Nats::start(port, store, &self.path("nats.log")).await;
        self.client = connect(&self.nats.url()).await;
        self.js = jetstream::new(self.client.clone());
    }

    /// One request; `Err` on timeout, no responders or a non-JSON reply.
    pub async fn try_request(
        &self,
        subject: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Value, String> {
        let msg = tokio::time::timeout(
            timeout,
            self.client.request(subject.to_owned(), body.into()),
        )
        .await
        .map_err(|_| format!("no reply on {subject} within {timeout:?}"))?
        .map_err(|e| format!("request on {subject}: {e}"))?;
        serde_json::from_slice(&msg.payload).map_err(|e| {
            format!(
                "reply on {subject} is not JSON ({e}): {}",
                String::from_utf8_lossy(&msg.payload)
            )
        })
    }

    pub async fn request_bytes(&self, subject: &str, body: Vec<u8>) -> Value {
        self.try_request(subject, body, REPLY)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn request(&self, subject: &str, body: &Value) -> Value {
        self.request_bytes(subject, serde_json::to_vec(body).expect("json"))
            .await
    }

    /// A command on `bcp.cmd.<project>.<verb>`.
    pub async fn cmd(&self, project: &str, verb: &str, body: &Value) -> Value {
        self.request(&format!("bcp.cmd.{project}.{verb}"), body)
            .await
    }

    /// Send a command until it is answered `ok:true` (the same body, so the
    /// same `command_id`: a retry is safe). For use across NATS outages.
    pub async fn cmd_until_ok(&self, project: &str, verb: &str, body: &Value) -> Value {
        let subject = format!("bcp.cmd.{project}.{verb}");
        let bytes = serde_json::to_vec(body).expect("json");
        let deadline = Deadline::new(format!("an ok reply on {subject}"), CATCH_UP);
        loop {
            match self
                .try_request(&subject, bytes.clone(), Duration::from_secs(2))
                .await
            {
                Ok(r) if r["ok"] == json!(true) => return r,
                Ok(r) => assert_eq!(
                    r["error"]["code"],
                    json!("unavailable"),
                    "{subject} refused for good: {r}"
                ),
                Err(_) => {}
            }
            deadline.tick().await;
        }
    }

    /// A query on `bcp.query._admin.<kind>` (an operator's view: every
    /// project).
    pub async fn query(&self, kind: &str, body: &Value) -> Value {
        self.request(&format!("bcp.query._admin.{kind}"), body)
            .await
    }

    /// The job VIEW of `bcp.query.job`, asserting the query succeeded.
    pub async fn job(&self, job_id: uuid::Uuid) -> Value {
        let r = self.query("job", &json!({ "job_id": job_id })).await;
        assert_eq!(r["ok"], json!(true), "query job {job_id}: {r}");
        r["job"].clone()
    }

    /// The `history` array of `bcp.query.history`, asserting success.
    pub async fn history(&self, job_id: uuid::Uuid) -> Vec<Value> {
        let r = self.query("history", &json!({ "job_id": job_id })).await;
        assert_eq!(r["ok"], json!(true), "query history {job_id}: {r}");
        assert_eq!(r["job_id"], json!(job_id));
        r["history"].as_array().expect("history array").clone()
    }

    /// The `snapshots` array of `bcp.query.snapshots` (the job's catalog in
    /// time order), asserting success.
    pub async fn snapshots(&self, job_id: uuid::Uuid) -> Vec<Value> {
        let r = self.query("snapshots", &json!({ "job_id": job_id })).await;
        assert_eq!(r["ok"], json!(true), "query snapshots {job_id}: {r}");
        assert_eq!(r["job_id"], json!(job_id), "{r}");
        r["snapshots"].as_array().expect("snapshots array").clone()
    }

    /// The stream's info, or None while it does not exist.
    pub async fn stream_info(&self) -> Option<stream::Info> {
        let stream = self.js.get_stream(STREAM).await.ok()?;
        stream.get_info().await.ok()
    }

    /// Poll until the stream's last sequence is `seq`; panics if it goes
    /// past it or does not get there in time.
    pub async fn wait_stream_last_seq(&self, seq: u64) -> stream::Info {
        let deadline = Deadline::new(
            format!("stream {STREAM} to reach last sequence {seq}"),
            CATCH_UP,
        );
        loop {
            if let Some(info) = self.stream_info().await {
                let last = info.state.last_sequence;
                assert!(
                    last <= seq,
                    "stream holds last sequence {last}, beyond bcp's head {seq}"
                );
                if last == seq {
                    return info;
                }
            }
            deadline.tick().await;
        }
    }

    /// Every message of the stream, by sequence from 1 to its last.
    pub async fn stream_messages(&self) -> Vec<StreamMessage> {
        let stream = self.js.get_stream(STREAM).await.expect("get stream");
        let last = stream.cached_info().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let m = stream
                .get_raw_message(seq)
                .await
                .unwrap_or_else(|e| panic!("get stream message {seq}: {e}"));
            out.push(m);
        }
        out
    }

    /// Wait for the relay to publish through `head`, then check the whole
    /// stream against the contract (see [`check_stream`]); returns the
    /// envelopes in seq order.
    pub async fn caught_up_stream(&self, head: u64) -> Vec<Value> {
        let info = self.wait_stream_last_seq(head).await;
        assert_eq!(info.state.messages, head, "stream message count");
        if head > 0 {
            assert_eq!(info.state.first_sequence, 1, "stream first sequence");
        }
        check_stream(&self.stream_messages().await, head)
    }

    /// SIGTERM `bcp serve` (exit 0), then `bcp audit verify --db` on the
    /// stopped store: exit 0 and `ok: <head> events verified, head seq <head>`.
    pub async fn stop_and_verify(&mut self, head: u64) {
        let status = self.stop_bcp().await;
        assert_eq!(status.code(), Some(0), "bcp serve exit status on SIGTERM");
        let out = bcp_cli(&[
            "audit",
            "verify",
            "--db",
            self.db().to_str().expect("utf-8 path"),
        ])
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "bcp audit verify: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.starts_with("ok:"), "audit verify said: {stdout}");
        assert!(
            stdout.starts_with(&format!("ok: {head} events verified, head seq {head} ")),
            "audit verify said: {stdout}"
        );
    }
}

/// Crashes and long streams, for the fault harness (tests/faults.rs); not
/// every test binary uses them.
#[allow(dead_code)]
impl Harness {
    /// SIGKILL `bcp serve` (kill -9: no drain, as a crash or power loss of
    /// the process) and reap it.
    pub fn kill_bcp(&mut self) {
        let mut bcp = self.bcp.take().expect("bcp serve is running");
        kill_and_reap(&mut bcp.child);
    }

    /// Start `bcp serve` without waiting for it to be ready (to crash it
    /// again while it opens and checks its store).
    pub fn spawn_bcp(&mut self) {
        assert!(self.bcp.is_none(), "bcp serve is already running");
        let log = self.bcp_log();
        self.bcp = Some(Bcp::spawn(
            &self.db(),
            &self.nats.url(),
            &log,
            &self.serve_args,
        ));
    }

    /// Everything `bcp serve` logged so far (every run of it in this test).
    pub fn bcp_log_text(&self) -> String {
        std::fs::read_to_string(self.bcp_log()).unwrap_or_default()
    }

    /// Whether a `bcp serve` child is running (started and not stopped).
    pub fn bcp_running(&self) -> bool {
        self.bcp.is_some()
    }

    /// Every message of the stream from 1 to its last sequence, read with
    /// an ordered consumer (one pass, fast for long streams; the same
    /// subject, headers and payload as [`Harness::stream_messages`]).
    pub async fn stream_messages_ordered(&self) -> Vec<StreamMessage> {
        use async_nats::jetstream::consumer::pull::OrderedConfig;
        use futures::StreamExt;
        let mut stream = self.js.get_stream(STREAM).await.expect("get stream");
        let last = stream
            .info()
            .await
            .expect("stream info")
            .state
            .last_sequence;
        let mut out = Vec::with_capacity(last as usize);
        if last == 0 {
            return out;
        }
        let consumer = stream
            .create_consumer(OrderedConfig::default())
            .await
            .expect("ordered consumer");
        let mut messages = consumer.messages().await.expect("consumer messages");
        while (out.len() as u64) < last {
            let m = tokio::time::timeout(REPLY, messages.next())
                .await
                .unwrap_or_else(|_| panic!("no stream message after {} of {last}", out.len()))
                .expect("the ordered consumer ended")
                .expect("read a stream message");
            let info = m.info().expect("message info");
            let (sequence, time) = (info.stream_sequence, info.published);
            out.push(StreamMessage {
                subject: m.subject.clone(),
                sequence,
                headers: m.headers.clone().unwrap_or_default(),
                payload: m.payload.clone(),
                time,
            });
        }
        out
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- bcp serve log ({}) -----\n{}",
                self.bcp_log().display(),
                tail(&self.bcp_log(), 200)
            );
            eprintln!(
                "----- nats-server log ({}) -----\n{}",
                self.nats.log.display(),
                tail(&self.nats.log, 60)
            );
        }
        // Children die before the temp dir goes: bcp first, then nats.
        self.bcp = None;
    }
}

/// A producer client; the server is known to be listening.
pub async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .name("bcp nats test")
        .request_timeout(Some(REPLY))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// Run the `bcp` binary with `args`; its output and exit status.
pub async fn bcp_cli(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_bcp"))
        .args(args)
        .env_remove("BCP_NATS_URL")
        .env_remove("BCP_DB")
        .env_remove("BCP_PROJECT")
        .env_remove("BCP_ACTOR")
        .env_remove("BCP_LOG_FORMAT")
        .env_remove("BCP_STREAM")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run bcp")
}

/// Run the `bcp` binary with `args`: (exit code, stdout, stderr).
pub async fn bcp_cli_text(args: &[&str]) -> (Option<i32>, String, String) {
    let out = bcp_cli(args).await;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run the `bcp` binary with `args`, assert exit 0, and return its stdout.
pub async fn bcp_cli_ok(args: &[&str]) -> String {
    let (code, out, err) = bcp_cli_text(args).await;
    assert_eq!(code, Some(0), "bcp {}: {out}{err}", args.join(" "));
    out
}

/// Run `bcp ... --format json` (the args must ask for JSON), assert exit 0,
/// and parse its stdout.
pub async fn bcp_cli_json(args: &[&str]) -> Value {
    let out = bcp_cli_ok(args).await;
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("bcp {} printed no JSON ({e}): {out}", args.join(" ")))
}

fn header<'m>(m: &'m StreamMessage, name: &str) -> &'m str {
    m.headers
        .get(name)
        .unwrap_or_else(|| panic!("stream message {} lacks header {name}", m.sequence))
        .as_str()
}

/// Check every message of the stream against the contract and return the
/// envelopes: exactly `head` messages, stream sequence == envelope seq ==
/// `Bcp-Seq`, gapless from 1; `Nats-Msg-Id` == `event_id`, each once; the
/// subject `bcp.evt.<project>.<job or region>.<type>`; `prev_hash` links to
/// the previous `hash` from the genesis hash, and each `hash` is the
/// envelope's own (recomputed).
pub fn check_stream(msgs: &[StreamMessage], head: u64) -> Vec<Value> {
    assert_eq!(
        msgs.len() as u64,
        head,
        "stream holds {} messages",
        msgs.len()
    );
    let mut prev_hash = GENESIS_HASH.to_owned();
    let mut ids = HashSet::new();
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(
            m.sequence, seq,
            "stream sequence {} at position {seq}",
            m.sequence
        );
        let env: Value = serde_json::from_slice(&m.payload)
            .unwrap_or_else(|e| panic!("stream message {seq} is not JSON: {e}"));
        assert_eq!(
            env["seq"],
            json!(seq),
            "envelope seq of stream message {seq}"
        );
        assert_eq!(header(m, "Bcp-Seq"), seq.to_string(), "Bcp-Seq of {seq}");
        let event_id = env["event_id"].as_str().expect("event_id");
        assert_eq!(header(m, "Nats-Msg-Id"), event_id, "Nats-Msg-Id of {seq}");
        assert!(ids.insert(event_id.to_owned()), "event_id {event_id} twice");
        let ty = env["type"].as_str().expect("type");
        let key = if ty == "RegionConfigured" {
            assert_eq!(env["project_id"], json!("_admin"));
            assert_eq!(env["job_id"], Value::Null);
            env["data"]["region"].as_str().expect("data.region")
        } else {
            env["job_id"].as_str().expect("job_id")
        };
        let project = env["project_id"].as_str().expect("project_id");
        assert_eq!(
            m.subject.as_str(),
            format!("bcp.evt.{project}.{key}.{ty}"),
            "subject of stream message {seq}"
        );
        assert_eq!(env["prev_hash"], json!(prev_hash), "prev_hash of {seq}");
        let typed: bcp::domain::Envelope =
            serde_json::from_slice(&m.payload).expect("a bcp envelope");
        let hash = env["hash"].as_str().expect("hash");
        assert_eq!(typed.compute_hash(), hash, "hash of {seq}");
        prev_hash = hash.to_owned();
        out.push(env);
    }
    out
}
