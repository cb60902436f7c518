//! Keeping secrets out of logs, errors and `Debug` output.

/// Whether a client setting (a librdkafka key such as `sasl.password`, or
/// a configuration key) holds a secret: its value is never printed.
pub fn is_secret_setting(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "jaas", "credential"]
        .iter()
        .any(|w| k.contains(w))
        || k.ends_with(".key")
        || k.contains(".key.")
        || k.ends_with("_key")
        || k.contains("oauthbearer.config")
}

/// `url` with any `user:password@` or `token@` part replaced by
/// `<redacted>@`, for logs and errors.
///
/// ```
/// use outboxkv::redact::redact_url;
/// assert_eq!(redact_url("nats://alice:pw@host:4222/x"), "nats://<redacted>@host:4222/x");
/// assert_eq!(redact_url("nats://host:4222"), "nats://host:4222");
/// ```
pub fn redact_url(url: &str) -> String {
    // A list of servers (`nats://a:pw@h1,nats://b:pw@h2`) has an authority
    // after each `://`; without a scheme the text starts with one.
    let mut parts = url.split("://");
    let first = parts.next().unwrap_or_default();
    let mut out = String::with_capacity(url.len());
    let mut schemes = 0;
    for part in parts {
        if schemes == 0 {
            // `u:pw@h1,nats://h2`: the text before the first scheme may
            // hold scheme-less servers of the list.
            let pieces: Vec<String> = first.split(',').map(redact_authority).collect();
            out.push_str(&pieces.join(","));
        }
        schemes += 1;
        out.push_str("://");
        out.push_str(&redact_authority(part));
    }
    if schemes == 0 {
        return redact_authority(first);
    }
    out
}

/// `text` up to its first `/`, `?` or `#` is an authority: its
/// credentials (up to the last `@` there) replaced.
fn redact_authority(text: &str) -> String {
    let end = text.find(['/', '?', '#']).unwrap_or(text.len());
    match text[..end].rfind('@') {
        Some(at) => format!("{REDACTED}{}", &text[at..]),
        None => text.to_string(),
    }
}

/// `text` with every secret in `secrets` (of 3 bytes or more) replaced by
/// `<redacted>`.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 3) {
        out = out.replace(secret.as_str(), REDACTED);
    }
    out
}

/// What is printed instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// `settings` for printing: the values of secret keys replaced.
pub fn redact_settings<'a>(
    settings: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Vec<(&'a str, &'a str)> {
    settings
        .into_iter()
        .map(|(k, v)| {
            if is_secret_setting(k) {
                (k.as_str(), REDACTED)
            } else {
                (k.as_str(), v.as_str())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_url_of_a_server_list_is_redacted() {
        assert_eq!(
            redact_url("nats://a:pw1@h1:4222,nats://b:pw2@h2:4222"),
            "nats://<redacted>@h1:4222,nats://<redacted>@h2:4222"
        );
        assert_eq!(
            redact_url("nats://u:p,w@h1,nats://h2"),
            "nats://<redacted>@h1,nats://h2"
        );
        assert_eq!(redact_url("tok@h:4222"), "<redacted>@h:4222");
        assert_eq!(redact_url("u:pw@h1,nats://h2"), "<redacted>@h1,nats://h2");
        assert_eq!(redact_url("h1:4222,h2:4222"), "h1:4222,h2:4222");
        assert_eq!(redact_url(""), "");
    }

    #[test]
    fn secret_keys() {
        for k in [
            "sasl.password",
            "ssl.key.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "sasl.jaas.config",
            "nats_token",
            "nats_password",
        ] {
            assert!(is_secret_setting(k), "{k}");
        }
        for k in [
            "security.protocol",
            "sasl.username",
            "linger.ms",
            "ssl.ca.location",
        ] {
            assert!(!is_secret_setting(k), "{k}");
        }
    }
}
