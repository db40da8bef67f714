//! Rollout and deployment states, with the one transition function that says which changes
//! are valid.
//!
//! A rollout is `running` while its waves go out, `succeeded` when every wave acked APPLIED,
//! `rolling_back` while changed nodes get their previous config back, then `failed` (after an
//! automatic rollback) or `rolled_back` (after a manual one).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Succeeded,
    RollingBack,
    Failed,
    RolledBack,
}

impl RolloutState {
    pub const ALL: [RolloutState; 5] = [
        RolloutState::Running,
        RolloutState::Succeeded,
        RolloutState::RollingBack,
        RolloutState::Failed,
        RolloutState::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Succeeded => "succeeded",
            RolloutState::RollingBack => "rolling_back",
            RolloutState::Failed => "failed",
            RolloutState::RolledBack => "rolled_back",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether the engine still has work for a rollout in this state.
    pub fn is_active(self) -> bool {
        matches!(self, RolloutState::Running | RolloutState::RollingBack)
    }

    pub fn is_terminal(self) -> bool {
        !self.is_active() && self != RolloutState::Succeeded
    }

    /// The one place that says which state changes are valid.
    pub fn can_become(self, next: RolloutState) -> bool {
        use RolloutState::*;
        matches!(
            (self, next),
            (Running, Succeeded)
                | (Running, RollingBack)
                | (Succeeded, RollingBack)
                | (RollingBack, Failed)
                | (RollingBack, RolledBack)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Its wave has not started.
    Pending,
    /// Offered; waiting for APPLIED or FAILED.
    Applying,
    Applied,
    /// The agent rejected the offer and kept its config.
    Failed,
    /// Not offered: the rollout stopped first, or a later rollout owns the node.
    Skipped,
    /// Its previous config is being offered back.
    RollingBack,
    RolledBack,
    /// The agent rejected its previous config; it keeps running what it has.
    RollbackFailed,
}

impl DeploymentState {
    pub const ALL: [DeploymentState; 8] = [
        DeploymentState::Pending,
        DeploymentState::Applying,
        DeploymentState::Applied,
        DeploymentState::Failed,
        DeploymentState::Skipped,
        DeploymentState::RollingBack,
        DeploymentState::RolledBack,
        DeploymentState::RollbackFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentState::Pending => "pending",
            DeploymentState::Applying => "applying",
            DeploymentState::Applied => "applied",
            DeploymentState::Failed => "failed",
            DeploymentState::Skipped => "skipped",
            DeploymentState::RollingBack => "rolling_back",
            DeploymentState::RolledBack => "rolled_back",
            DeploymentState::RollbackFailed => "rollback_failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn can_become(self, next: DeploymentState) -> bool {
        use DeploymentState::*;
        matches!(
            (self, next),
            (Pending, Applying)
                | (Pending, Skipped)
                | (Applying, Applied)
                | (Applying, Failed)
                | (Applying, RollingBack)
                | (Applied, RollingBack)
                | (Applied, Skipped)
                | (RollingBack, RolledBack)
                | (RollingBack, RollbackFailed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_transitions_for_every_pair() {
        use RolloutState::*;
        let valid = [
            (Running, Succeeded),
            (Running, RollingBack),
            (Succeeded, RollingBack),
            (RollingBack, Failed),
            (RollingBack, RolledBack),
        ];
        for from in RolloutState::ALL {
            for to in RolloutState::ALL {
                assert_eq!(
                    from.can_become(to),
                    valid.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
            assert_eq!(RolloutState::parse(from.as_str()), Some(from));
        }
        assert!(Failed.is_terminal() && RolledBack.is_terminal());
        assert!(!Succeeded.is_terminal() && !Succeeded.is_active());
    }

    #[test]
    fn deployment_transitions_for_every_pair() {
        use DeploymentState::*;
        let valid = [
            (Pending, Applying),
            (Pending, Skipped),
            (Applying, Applied),
            (Applying, Failed),
            (Applying, RollingBack),
            (Applied, RollingBack),
            (Applied, Skipped),
            (RollingBack, RolledBack),
            (RollingBack, RollbackFailed),
        ];
        for from in DeploymentState::ALL {
            for to in DeploymentState::ALL {
                assert_eq!(
                    from.can_become(to),
                    valid.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
            assert_eq!(DeploymentState::parse(from.as_str()), Some(from));
        }
    }
}
