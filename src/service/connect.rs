//! How bcp authenticates to NATS: user/password, token, nkey seed, creds
//! file, and TLS (CA, client certificate and key). One description, used by
//! `bcp serve` and every CLI command that talks to NATS.

use async_nats::ConnectOptions;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct NatsAuth {
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// An nkey seed (`SU…`).
    pub nkey_seed: Option<String>,
    pub creds_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_required: bool,
    /// Where replies come back (`_INBOX` by default): a producer with its
    /// own prefix can be allowed to subscribe only there.
    pub inbox_prefix: Option<String>,
}

impl NatsAuth {
    /// Connect options carrying these credentials.
    pub async fn options(&self) -> std::io::Result<ConnectOptions> {
        let mut o = ConnectOptions::new().connection_timeout(Duration::from_secs(5));
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            o = o.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &self.token {
            o = o.token(t.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            o = o.nkey(seed.clone());
        }
        if let Some(path) = &self.creds_file {
            o = o.credentials_file(path).await?;
        }
        if let Some(ca) = &self.tls_ca {
            o = o.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls_required || self.tls_ca.is_some() || self.tls_cert.is_some() {
            o = o.require_tls(true);
        }
        if let Some(prefix) = &self.inbox_prefix {
            o = o.custom_inbox_prefix(prefix.clone());
        }
        Ok(o)
    }
}
