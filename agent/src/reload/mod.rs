//! What triggers a reload: SIGHUP, and a change of the config file's content.
//!
//! The file is polled rather than watched with inotify: Kubernetes updates a mounted
//! ConfigMap by swapping a symlink, which content polling sees and path watches often miss.

use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::signal::unix::{signal, Signal, SignalKind};

pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Sighup,
    FileChanged,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Trigger::Sighup => "SIGHUP",
            Trigger::FileChanged => "file change",
        })
    }
}

pub struct Watcher {
    path: PathBuf,
    last_digest: Option<[u8; 32]>,
    sighup: Signal,
    poll: tokio::time::Interval,
}

fn digest(path: &PathBuf) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|b| Sha256::digest(&b).into())
}

impl Watcher {
    pub fn new(path: PathBuf) -> std::io::Result<Self> {
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self {
            last_digest: digest(&path),
            path,
            sighup: signal(SignalKind::hangup())?,
            poll,
        })
    }

    /// Waits for the next reason to reload. A file that cannot be read is not a change: the
    /// reload it would trigger could only fail.
    pub async fn next(&mut self) -> Trigger {
        loop {
            tokio::select! {
                _ = self.sighup.recv() => {
                    self.last_digest = digest(&self.path).or(self.last_digest);
                    return Trigger::Sighup;
                }
                _ = self.poll.tick() => {
                    let current = digest(&self.path);
                    if current.is_some() && current != self.last_digest {
                        self.last_digest = current;
                        return Trigger::FileChanged;
                    }
                }
            }
        }
    }
}
