//! Test helpers shared by integration tests that need services.
#![allow(dead_code)]

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
