//! [`NatsConnection`]: where a NATS server is and how to log in, shared by
//! the sink ([`NatsOptions`](crate::sink::nats::NatsOptions)) and the inbox
//! reader ([`NatsReaderOptions`](crate::inbox::nats::NatsReaderOptions)).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::ConnectErrorKind;

use crate::error::{Error, Result};
use crate::redact::{redact_url, scrub};

/// The server address and credentials of a NATS connection.
///
/// Defaults: no credentials, no TLS unless the URL asks for it (`tls://`)
/// or a root CA is set.
///
/// ```
/// use outboxkv::broker::nats::NatsConnection;
/// let conn = NatsConnection::new("nats://127.0.0.1:4222").token("s3cret-token");
/// assert!(!format!("{conn:?}").contains("s3cret-token"));
/// ```
#[derive(Clone)]
#[must_use]
pub struct NatsConnection {
    pub(crate) url: String,
    user: Option<(String, String)>,
    token: Option<String>,
    credentials: Option<PathBuf>,
    root_ca: Option<PathBuf>,
}

/// Secrets are never printed: the password, the token, and any
/// credentials in the URL show as `<redacted>`.
impl std::fmt::Debug for NatsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConnection")
            .field("url", &redact_url(&self.url))
            .field("user", &self.user.as_ref().map(|(u, _)| (u, "<redacted>")))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("credentials", &self.credentials)
            .field("root_ca", &self.root_ca)
            .finish()
    }
}

impl NatsConnection {
    /// The server at `url` (e.g. `nats://127.0.0.1:4222`).
    pub fn new(url: impl Into<String>) -> NatsConnection {
        NatsConnection {
            url: url.into(),
            user: None,
            token: None,
            credentials: None,
            root_ca: None,
        }
    }

    /// Authenticate with user and password.
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }

    /// Authenticate with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Authenticate with a credentials (`.creds`) file.
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials = Some(path.into());
        self
    }

    /// Trust this root CA (PEM) and require TLS.
    pub fn root_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.root_ca = Some(path.into());
        self
    }

    /// The URL with any credentials in it redacted, for messages.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// The secret strings of this connection, to scrub from error texts.
    pub(crate) fn secrets(&self) -> Vec<String> {
        let mut s: Vec<String> = Vec::new();
        if let Some((_, p)) = &self.user {
            s.push(p.clone());
        }
        if let Some(t) = &self.token {
            s.push(t.clone());
        }
        if let Some((_, rest)) = self.url.split_once("://")
            && let Some((creds, _)) = rest.rsplit_once('@')
        {
            s.push(creds.to_string());
            s.extend(creds.split(':').map(str::to_string));
        }
        s.retain(|x| x.len() >= 3);
        s
    }

    /// An [`Error::Broker`] from `role` (`nats` for the sink, `nats inbox`
    /// for the reader), with every secret scrubbed from `message`.
    pub(crate) fn error(&self, role: &str, message: &str) -> Error {
        Error::Broker {
            sink: role.into(),
            message: scrub(message, &self.secrets()),
        }
    }

    /// Connects as client `name`.
    ///
    /// Attempts run without the client's own background retries (a client
    /// that retries in the background returns at once, and each failed
    /// `connect` would leave one behind): refused credentials, a bad
    /// address or bad TLS fail at once with a message starting `refused:`;
    /// a server that is not up yet is tried again for up to 10 s, then the
    /// message starts `unreachable:`. Secrets never appear in it.
    pub(crate) async fn connect(&self, name: &str, role: &str) -> Result<async_nats::Client> {
        let url = redact_url(&self.url);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                self.connect_options(name).await?.connect(self.url.as_str()),
            )
            .await;
            match attempt {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        ConnectErrorKind::AuthorizationViolation
                            | ConnectErrorKind::Authentication
                            | ConnectErrorKind::ServerParse
                            | ConnectErrorKind::Tls
                    ) =>
                {
                    return Err(self.error(role, &format!("refused: connect to {url}: {e}")));
                }
                Ok(Err(e)) if tokio::time::Instant::now() >= deadline => {
                    return Err(self.error(role, &format!("unreachable: connect to {url}: {e}")));
                }
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(
                        self.error(role, &format!("unreachable: connecting to {url} timed out"))
                    );
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    async fn connect_options(&self, name: &str) -> Result<async_nats::ConnectOptions> {
        let mut connect = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5));
        if let Some((u, p)) = &self.user {
            connect = connect.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &self.token {
            connect = connect.token(t.clone());
        }
        if let Some(c) = &self.credentials {
            connect = connect
                .credentials_file(c)
                .await
                .map_err(|e| Error::io("read NATS credentials", c, e))?;
        }
        if let Some(ca) = &self.root_ca {
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(connect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let c = NatsConnection::new("nats://alice:s3cret-pw@127.0.0.1:4222")
            .user_and_password("bob", "hunter22")
            .token("tok-en-123");
        let dbg = format!("{c:?}");
        for secret in ["s3cret-pw", "hunter22", "tok-en-123"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
        assert!(dbg.contains("127.0.0.1:4222"), "{dbg}");
        let e = c.error("nats", "auth failed for alice:s3cret-pw token tok-en-123");
        let text = e.to_string();
        assert!(
            !text.contains("s3cret-pw") && !text.contains("tok-en-123"),
            "{text}"
        );
    }
}
