//! What `make run` started, written where the operator's tools find it (`.gateway/run.json`):
//! the plans.json it was started with (what `make reload` reloads), the admin Redis URL (what
//! `plan-limits` uses when `REDIS_URL` is not set) and Envoy's admin port.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub plans: PathBuf,
    pub redis_url: String,
    pub admin_port: u16,
}

/// Where `make run` keeps it (`PLAN_LIMITS_RUN_RECORD` elsewhere, for a test's gateway).
pub fn path() -> PathBuf {
    std::env::var_os("PLAN_LIMITS_RUN_RECORD")
        .map(PathBuf::from)
        .unwrap_or_else(|| plan_limits_services::repo_root().join(".gateway/run.json"))
}

impl RunRecord {
    pub fn write(&self, to: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(to, text).map_err(|e| format!("{}: {e}", to.display()))
    }

    /// The record at `from`, if a gateway wrote one.
    pub fn read(from: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(from).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The Redis URL with its password hidden, to say which Redis is used.
    pub fn redis_shown(&self) -> String {
        match self.redis_url.split_once('@') {
            Some((credentials, host)) => {
                let user = credentials.rsplit_once(':').map_or(credentials, |(u, _)| u);
                format!("{user}:***@{host}")
            }
            None => self.redis_url.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_never_shows_the_password() {
        let dir = plan_limits_services::process::scratch_dir("run-record");
        let record = RunRecord {
            plans: "/x/plans.json".into(),
            redis_url: "redis://plan-limits-admin:s3cret@127.0.0.1:16379/".into(),
            admin_port: 9901,
        };
        let at = dir.join("run.json");
        record.write(&at).unwrap();
        assert_eq!(RunRecord::read(&at), Some(record.clone()));
        assert_eq!(
            record.redis_shown(),
            "redis://plan-limits-admin:***@127.0.0.1:16379/"
        );
        assert_eq!(RunRecord::read(&dir.join("none.json")), None);
    }
}
