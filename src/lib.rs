//! bcp: an event-sourced control plane for backup jobs.
//!
//! Where to start reading: [`domain`] holds the pure core (`decide` and
//! `evolve` over the job state machine of DOMAIN.md); [`store`] appends what
//! the core decides to the redb log in one durable transaction per batch;
//! [`service`] is the only async code (NATS intake, the single writer, the
//! outbox relay to JetStream, queries); [`audit`] folds the same pure code over
//! the stored log for replay and verification. Arrows point inward: the edges
//! depend on the core, never the reverse.

pub mod audit;
pub mod domain;
pub mod schema;
pub mod service;
pub mod store;

#[cfg(test)]
mod architecture {
    //! The pure core stays pure: no I/O, clock or randomness in `domain/`
    //! (ARCHITECTURE.md, invariant 1).

    #[test]
    fn domain_does_no_io_reads_no_clock_draws_no_randomness() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let forbidden = [
            "redb::",
            "async_nats::",
            "tokio::",
            "std::fs",
            "std::net",
            "std::io",
            "std::env",
            "SystemTime",
            "Instant::now",
            "Utc::now",
            "Local::now",
            "now_v7",
            "new_v4",
            "rand::",
        ];
        let mut checked = 0;
        for dir in ["domain"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap();
                // Tests beside the code may use what they like.
                let code = text.split("#[cfg(test)]").next().unwrap();
                for word in forbidden {
                    assert!(
                        !code.contains(word),
                        "{} uses {word}: the core must stay pure",
                        path.display()
                    );
                }
                checked += 1;
            }
        }
        assert!(checked >= 10, "found only {checked} files");
    }
}
