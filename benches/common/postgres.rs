//! A throwaway PostgreSQL server for the benchmarks (scripts/postgres.sh),
//! on 127.0.0.1, stopped when dropped.

use std::path::Path;
use std::process::Command;

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A PostgreSQL server from scripts/postgres.sh, stopped on drop.
pub struct Postgres {
    /// The folder of its data (`data/`), log and socket.
    pub dir: tempfile::TempDir,
    /// A libpq connection string: `host=127.0.0.1 port=N user=postgres`.
    pub conn: String,
}

impl Postgres {
    pub fn start() -> AnyResult<Postgres> {
        let dir = tempfile::tempdir()?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(dir.path())
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "scripts/postgres.sh start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let conn = String::from_utf8(out.stdout)?.trim().to_string();
        Ok(Postgres { dir, conn })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh");
        let _ = Command::new("bash")
            .arg(&script)
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}
