//! [`KafkaConnection`]: the bootstrap servers and the client settings
//! (security, credentials, tuning) shared by the sink
//! ([`KafkaOptions`](crate::sink::kafka::KafkaOptions)) and the inbox reader
//! ([`KafkaReaderOptions`](crate::inbox::kafka::KafkaReaderOptions)).

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;

/// The brokers and librdkafka settings of a Kafka client.
///
/// Settings set here pass through to librdkafka as they are, except the
/// few the sink or the reader own (each documents its own). Default: none.
///
/// ```
/// use outboxkv::broker::kafka::KafkaConnection;
/// let conn = KafkaConnection::new("127.0.0.1:9092")
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.password", "hunter22");
/// assert!(!format!("{conn:?}").contains("hunter22"));
/// ```
#[derive(Clone)]
#[must_use]
pub struct KafkaConnection {
    pub(crate) bootstrap: String,
    pub(crate) settings: BTreeMap<String, String>,
}

/// Secret settings (`sasl.password`, `ssl.key.password`, ...) show as
/// `<redacted>`.
impl std::fmt::Debug for KafkaConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConnection")
            .field("bootstrap", &self.bootstrap)
            .field("settings", &crate::redact::redact_settings(&self.settings))
            .finish()
    }
}

impl KafkaConnection {
    /// The brokers at `bootstrap` (`host:port[,host:port...]`).
    pub fn new(bootstrap: impl Into<String>) -> KafkaConnection {
        KafkaConnection {
            bootstrap: bootstrap.into(),
            settings: BTreeMap::new(),
        }
    }

    /// Sets a librdkafka configuration property.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.insert(key.into(), value.into());
        self
    }

    /// The bootstrap servers.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// A librdkafka configuration with every setting and the bootstrap
    /// servers.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.settings {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }
}

/// The values of the secret settings of `config` (see
/// [`is_secret_setting`](crate::redact::is_secret_setting)), to scrub from
/// what librdkafka reports, and the parts of each (split at spaces, `=`,
/// `,`, `;` and `:`, of 4 bytes or more): librdkafka may quote a setting
/// from some point on (`Unrecognized sasl.oauthbearer.config beginning
/// at: ...`).
pub(crate) fn secrets_of(config: &ClientConfig) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in config.config_map().iter() {
        if !crate::redact::is_secret_setting(k) {
            continue;
        }
        let v = v.to_string();
        out.extend(
            v.split([' ', '=', ',', ';', ':'])
                .filter(|p| p.len() >= 4 && *p != v)
                .map(str::to_string),
        );
        out.push(v);
    }
    // Longest first, so that a part does not break up a whole value.
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out
}

/// A librdkafka error as text for an error or a log, without the value of
/// a setting librdkafka refused (its own message carries it, and it may be
/// a secret: a misspelt `sasl.password` is an unknown property whose value
/// is the password), and with `secrets` scrubbed from the rest.
pub(crate) fn client_error(e: &KafkaError, secrets: &[String]) -> String {
    let text = match e {
        KafkaError::ClientConfig(_, description, key, _) => {
            format!("client configuration: {description} (setting {key:?}; its value is not shown)")
        }
        other => other.to_string(),
    };
    crate::redact::scrub(&text, secrets)
}

/// librdkafka's report of a client error (`ClientContext::error`), with
/// `secrets` scrubbed: some reports quote settings (a malformed
/// `sasl.oauthbearer.config` is echoed back).
pub(crate) fn client_report(error: &KafkaError, reason: &str, secrets: &[String]) -> String {
    crate::redact::scrub(&format!("{error}: {reason}"), secrets)
}

#[cfg(test)]
mod tests {
    use rdkafka::consumer::BaseConsumer;

    use super::*;

    #[test]
    fn a_refused_setting_value_stays_out_of_the_error() {
        let conn = KafkaConnection::new("127.0.0.1:9").set("sasl.passwd", "hunter22");
        let Err(e) = conn.client_config().create::<BaseConsumer>() else {
            panic!("an unknown property is refused");
        };
        // librdkafka's own text names the value; ours does not.
        assert!(e.to_string().contains("hunter22"), "{e}");
        let text = client_error(&e, &[]);
        assert!(!text.contains("hunter22"), "{text}");
        assert!(text.contains("sasl.passwd"), "{text}");
        // Reports quoting a secret setting's value are scrubbed.
        let conn = KafkaConnection::new("127.0.0.1:9")
            .set("sasl.oauthbearer.config", "principal=sekrit-jwt");
        let secrets = secrets_of(&conn.client_config());
        let report = client_report(
            &KafkaError::ClientCreation("x".into()),
            "Unrecognized sasl.oauthbearer.config beginning at: sekrit-jwt",
            &secrets,
        );
        assert!(!report.contains("sekrit-jwt"), "{report}");
    }
}
