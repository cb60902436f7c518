//! Test helpers shared by the integration tests: the result type, small
//! commit helpers, and the services (nats-server, Kafka, the CloudEvents
//! SDK, promtool) the broker tests start through `scripts/`.
#![allow(dead_code)]

/// A field of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`, ...; 0 when it
/// cannot be read).
pub fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets the kernel's peak-RSS mark of this process (`clear_refs` 5), so
/// that `VmHWM` then reports the peak from here on.
pub fn reset_peak_rss() -> std::io::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
}

/// What every test returns: `?` on any error fails it with the error.
pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Commits one event per `i` in `range` (type `t.changed`, key `k`,
/// payload `[i]`), each in its own transaction.
pub fn emit_each(store: &outboxkv::Store, range: std::ops::Range<u8>) -> outboxkv::Result<()> {
    for i in range {
        store.write(|tx| tx.emit(outboxkv::Event::bytes("t.changed", "k", vec![i])))?;
    }
    Ok(())
}

use std::path::{Path, PathBuf};
use std::process::Command;

/// A nats-server started through `scripts/nats.sh`, stopped on drop.
/// Fails (does not skip) when the script or nats-server is missing.
pub struct NatsServer {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub port: u16,
    args: Vec<String>,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

impl NatsServer {
    pub fn start(extra_args: &[&str]) -> Result<NatsServer, Box<dyn std::error::Error>> {
        let args = extra_args.iter().map(|s| s.to_string()).collect();
        Self::start_in(tempfile::tempdir()?, args)
    }

    /// Starts a server on `port` (which a test picked and something waits on).
    pub fn start_on_port(port: u16) -> Result<NatsServer, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let url = run_start("nats.sh", dir.path(), &[port.to_string()], &[])?;
        Ok(NatsServer {
            dir,
            url,
            port,
            args: Vec::new(),
        })
    }

    /// Starts a server with `config` (nats-server configuration syntax,
    /// e.g. `max_payload: 4096`) written to a file in its folder.
    pub fn start_with_config(config: &str) -> Result<NatsServer, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("server.conf");
        std::fs::write(&conf, config)?;
        let args = vec!["-c".to_string(), conf.to_string_lossy().into_owned()];
        Self::start_in(dir, args)
    }

    fn start_in(
        dir: tempfile::TempDir,
        args: Vec<String>,
    ) -> Result<NatsServer, Box<dyn std::error::Error>> {
        let url = run_start("nats.sh", dir.path(), &["0".into()], &args)?;
        let port = url.rsplit(':').next().ok_or("no port in url")?.parse()?;
        Ok(NatsServer {
            dir,
            url,
            port,
            args,
        })
    }

    pub fn stop(&self) -> Result<(), Box<dyn std::error::Error>> {
        run_stop("nats.sh", self.dir.path())
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&self) -> Result<(), Box<dyn std::error::Error>> {
        run_start(
            "nats.sh",
            self.dir.path(),
            &[self.port.to_string()],
            &self.args,
        )?;
        Ok(())
    }
}

fn run_stop(name: &str, dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let status = Command::new("bash")
        .arg(script(name))
        .arg("stop")
        .arg(dir)
        .status()?;
    if !status.success() {
        return Err(format!("scripts/{name} stop failed: {status}").into());
    }
    Ok(())
}

fn run_start(
    name: &str,
    dir: &Path,
    ports: &[String],
    args: &[String],
) -> Result<String, Box<dyn std::error::Error>> {
    run_start_env(name, dir, ports, args, &[])
}

fn run_start_env(
    name: &str,
    dir: &Path,
    ports: &[String],
    args: &[String],
    env: &[(&str, &str)],
) -> Result<String, Box<dyn std::error::Error>> {
    let out = Command::new("bash")
        .arg(script(name))
        .arg("start")
        .arg(dir)
        .args(ports)
        .args(args)
        .envs(env.iter().copied())
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "scripts/{name} start failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A single-node Apache Kafka broker (KRaft) started through
/// `scripts/kafka.sh`, stopped on drop. Fails (does not skip) when the script,
/// Java or the Kafka download is missing.
pub struct KafkaBroker {
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`
    pub bootstrap: String,
    /// Client settings a test reader needs (SASL credentials).
    pub client: Vec<(String, String)>,
}

impl KafkaBroker {
    /// Starts a broker; `properties` (`key=value`) are added to its
    /// server.properties.
    pub fn start(properties: &[&str]) -> Result<KafkaBroker, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let props: Vec<String> = properties.iter().map(|s| s.to_string()).collect();
        let bootstrap = run_start("kafka.sh", dir.path(), &["0".into(), "0".into()], &props)?;
        Ok(KafkaBroker {
            dir,
            bootstrap,
            client: Vec::new(),
        })
    }

    /// Starts a broker whose listener takes SASL/PLAIN logins only: `users`
    /// are `(user, password)`; readers log in as the first.
    pub fn start_sasl_plain(
        users: &[(&str, &str)],
    ) -> Result<KafkaBroker, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let list: Vec<String> = users.iter().map(|(u, p)| format!("{u}:{p}")).collect();
        let list = list.join(",");
        let bootstrap = run_start_env(
            "kafka.sh",
            dir.path(),
            &["0".into(), "0".into()],
            &[],
            &[("OUTBOXKV_KAFKA_SASL_PLAIN", &list)],
        )?;
        let (user, password) = users.first().ok_or("no SASL user")?;
        let client = [
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "PLAIN"),
            ("sasl.username", user),
            ("sasl.password", password),
        ];
        Ok(KafkaBroker {
            dir,
            bootstrap,
            client: client
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    /// Starts a broker that authorizes with ACLs over SASL/PLAIN: user
    /// `admin` (a super user, password `admin-secret`) and `users`, who may
    /// do nothing until [`KafkaBroker::allow`] grants it. Readers log in as
    /// admin.
    pub fn start_with_acls(
        users: &[(&str, &str)],
    ) -> Result<KafkaBroker, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut list = vec!["admin:admin-secret".to_string()];
        list.extend(users.iter().map(|(u, p)| format!("{u}:{p}")));
        let list = list.join(",");
        let bootstrap = run_start_env(
            "kafka.sh",
            dir.path(),
            &["0".into(), "0".into()],
            &[],
            &[
                ("OUTBOXKV_KAFKA_SASL_PLAIN", &list),
                ("OUTBOXKV_KAFKA_ACL", "1"),
            ],
        )?;
        let client = [
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "PLAIN"),
            ("sasl.username", "admin"),
            ("sasl.password", "admin-secret"),
        ];
        Ok(KafkaBroker {
            dir,
            bootstrap,
            client: client
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    /// Allows `principal` (`User:name`) `operation` on `topic` (as admin).
    pub fn allow(
        &self,
        principal: &str,
        operation: &str,
        topic: &str,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let out = Command::new("bash")
            .arg(script("kafka.sh"))
            .args(["acl"])
            .arg(self.dir.path())
            .args(["admin-secret", principal, operation, topic])
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "kafka.sh acl failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(())
    }

    /// Stops the broker (a clean shutdown).
    pub fn stop(&self) -> Result<(), Box<dyn std::error::Error>> {
        run_stop("kafka.sh", self.dir.path())
    }

    /// Starts the broker again, same ports, same data.
    pub fn restart(&self) -> Result<(), Box<dyn std::error::Error>> {
        run_start("kafka.sh", self.dir.path(), &[], &[])?;
        Ok(())
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// `len` bytes that do not compress (xorshift from `seed`), so that tests
/// writing them get real data blocks in RocksDB's files.
pub fn incompressible(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Parses `messages` (see scripts/ce_check.py for their shape) with the
/// official CloudEvents SDK for Python; one result per message. Fails (does
/// not skip) when the SDK cannot be set up.
pub fn cloudevents_parse(
    messages: &[serde_json::Value],
) -> Result<Vec<serde_json::Value>, Box<dyn std::error::Error>> {
    use std::io::Write;
    let out = Command::new("bash")
        .arg(script("cloudevents.sh"))
        .arg("python")
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "scripts/cloudevents.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let python = String::from_utf8(out.stdout)?.trim().to_string();
    let mut child = Command::new(python)
        .arg(script("ce_check.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut input = String::new();
    for m in messages {
        input.push_str(&m.to_string());
        input.push('\n');
    }
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    writer.join().map_err(|_| "writer panicked")??;
    if !out.status.success() {
        return Err(format!("ce_check.py failed: {}", out.status).into());
    }
    let results: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    if results.len() != messages.len() {
        return Err(format!("{} results for {} messages", results.len(), messages.len()).into());
    }
    Ok(results)
}

/// Runs `promtool check metrics` (Debian's `prometheus` package) on `text`;
/// returns what it printed. Fails (does not skip) without promtool.
pub fn promtool_check(text: &str) -> Result<(bool, String), Box<dyn std::error::Error>> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool (Debian package prometheus) is needed: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), printed))
}
