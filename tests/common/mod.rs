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

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nats.sh")
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
        let url = run_start(dir.path(), 0, &args)?;
        let port = url.rsplit(':').next().ok_or("no port in url")?.parse()?;
        Ok(NatsServer {
            dir,
            url,
            port,
            args,
        })
    }

    pub fn stop(&self) -> Result<(), Box<dyn std::error::Error>> {
        let status = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path())
            .status()?;
        if !status.success() {
            return Err(format!("scripts/nats.sh stop failed: {status}").into());
        }
        Ok(())
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&self) -> Result<(), Box<dyn std::error::Error>> {
        run_start(self.dir.path(), self.port, &self.args)?;
        Ok(())
    }
}

fn run_start(dir: &Path, port: u16, args: &[String]) -> Result<String, Box<dyn std::error::Error>> {
    let out = Command::new("bash")
        .arg(script())
        .arg("start")
        .arg(dir)
        .arg(port.to_string())
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "scripts/nats.sh start failed ({}): {}",
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
