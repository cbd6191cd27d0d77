//! The `bcp` binary: parse arguments, set up logging, run, map the outcome
//! to DESIGN.md §4's exit codes.

mod cli;

/// mimalloc instead of glibc malloc: under load, glibc's malloc/free took
/// about 14 % of `bcp serve`'s CPU (perf, bench/RESULTS.md), spread over
/// NATS message buffers, serde and redb's page buffers. Built without
/// transparent huge pages (`no_thp`): mimalloc asks for them by default,
/// and each first touch of a fresh 2 MiB page, zeroed whole by the kernel,
/// stalled the writer or the commit thread for milliseconds (perf: up to
/// 456 ms of `clear_page_erms` on the writer in 24 s); p99 at 25 % load
/// went from 11-22 ms to 5-6 ms without them (bench/RESULTS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // An empty BCP_* variable (`BCP_NATS_URL= bcp jobs`) counts as unset,
    // as for most tools: clap would take the empty value (and connect to
    // "" or open a store at "").
    for (name, value) in std::env::vars_os() {
        if value.is_empty() && name.to_str().is_some_and(|n| n.starts_with("BCP_")) {
            // SAFETY: at the start of main, before any other thread exists.
            unsafe { std::env::remove_var(name) };
        }
    }
    // NATS_URL is the NATS ecosystem's variable (the nats CLI, nats-py):
    // honoured where BCP_NATS_URL is not set.
    if std::env::var_os("BCP_NATS_URL").is_none()
        && let Some(url) = std::env::var_os("NATS_URL").filter(|u| !u.is_empty())
    {
        // SAFETY: at the start of main, before any other thread exists.
        unsafe { std::env::set_var("BCP_NATS_URL", url) };
    }
    let cli = cli::Cli::parse();
    let default_level = if matches!(cli.command, cli::Cmd::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only for a person at a terminal, never into a log file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (stderr a closed pipe) is lost,
        // never fatal: by default the subscriber reports it with eprintln!,
        // which panics on that same stderr and took bcp serve down.
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    match cli.log_format {
        cli::LogFormat::Text => builder.init(),
        // `message` at the top level of each line, beside the fields.
        cli::LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    match cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        // stdout's reader left (`bcp jobs | head`): it had what it wanted.
        Err(e) if stdout_gone(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bcp: {}", message(&e));
            let code = if e.is::<cli::Usage>() {
                cli::EXIT_USAGE
            } else if e.is::<cli::Unavailable>() {
                cli::EXIT_UNAVAILABLE
            } else {
                cli::EXIT_REJECTED
            };
            ExitCode::from(code)
        }
    }
}

/// Whether `e` is a write to a pipe whose reader left, and that pipe is
/// stdout (not a socket: NATS errors keep their exit code). The CLI writes
/// its output with `out!`/`outln!` (src/cli.rs), which return the error
/// that `println!` would panic with. SIGPIPE stays ignored (Rust's
/// default): a NATS socket that breaks must end in exit 3, not a signal.
fn stdout_gone(e: &anyhow::Error) -> bool {
    let broken_pipe = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if !broken_pipe {
        return false;
    }
    let mut stdout = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd and no timeout: poll only reports on it.
    let polled = unsafe { libc::poll(&mut stdout, 1, 0) };
    polled == 1 && stdout.revents & libc::POLLERR != 0
}

/// An error and its causes, each said once: many errors already include
/// their source's text ("…: magic number mismatch"), and the chain would
/// repeat it.
fn message(e: &anyhow::Error) -> String {
    let mut said = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !said.contains(&cause) {
            said = format!("{said}: {cause}");
        }
    }
    said
}
