//! Experiments: a candidate pipeline run in shadow beside the baseline on label-selected
//! agents, measured window by window from the agents' volume reports, judged against success
//! criteria, then promoted (the candidate becomes the baseline, by a waved rollout) or rolled
//! back.
//!
//! [`definition`] parses and checks what an operator submits and builds the offers sent to the
//! agents; [`analysis`] turns reports into per-window KPIs and a verdict; [`engine`] drives the
//! states on the control plane's engine tick. Everything lives in the store, so a restarted
//! control plane resumes a running experiment where it was.

pub mod analysis;
pub mod definition;
pub mod engine;
pub mod render;

use serde::{Deserialize, Serialize};

/// The life of an experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExperimentState {
    /// Created, not started.
    Draft,
    /// Started: measuring the targets without the candidate before deploying it.
    Pending,
    /// The candidate's rollout is under way.
    Deploying,
    /// The candidate runs in shadow; windows are being measured.
    Running,
    /// The duration is over; the verdict is being computed and the candidate removed.
    Analyzing,
    Succeeded,
    Failed,
    Cancelled,
    /// The candidate became the targets' baseline.
    Promoted,
    /// The previous baseline is back (after a promotion), or the candidate was set aside.
    RolledBack,
}

impl ExperimentState {
    pub const ALL: [ExperimentState; 10] = [
        Self::Draft,
        Self::Pending,
        Self::Deploying,
        Self::Running,
        Self::Analyzing,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::Promoted,
        Self::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Pending => "pending",
            Self::Deploying => "deploying",
            Self::Running => "running",
            Self::Analyzing => "analyzing",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Promoted => "promoted",
            Self::RolledBack => "rolled_back",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// States the engine drives.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Self::Pending | Self::Deploying | Self::Running | Self::Analyzing
        )
    }

    pub fn can_become(self, next: Self) -> bool {
        use ExperimentState::*;
        matches!(
            (self, next),
            (Draft, Pending)
                | (Pending, Deploying)
                | (Deploying, Running)
                | (Running, Analyzing)
                | (Analyzing, Succeeded | Failed)
                // A deployment that fails, targets that never report, or a candidate replaced
                // on a target end the experiment early.
                | (Pending | Deploying | Running, Failed)
                | (Pending | Deploying | Running | Analyzing, Cancelled)
                | (Succeeded, Promoted)
                | (Succeeded | Failed | Promoted, RolledBack)
        )
    }

    /// What may follow, for error messages.
    pub fn next_states(self) -> Vec<&'static str> {
        Self::ALL
            .into_iter()
            .filter(|n| self.can_become(*n))
            .map(Self::as_str)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::ExperimentState::*;
    use super::*;

    #[test]
    fn states_round_trip_and_only_the_documented_transitions_are_allowed() {
        for state in ExperimentState::ALL {
            assert_eq!(ExperimentState::parse(state.as_str()), Some(state));
        }
        assert!(Draft.can_become(Pending));
        assert!(Running.can_become(Cancelled));
        assert!(Succeeded.can_become(Promoted));
        assert!(Promoted.can_become(RolledBack));
        assert!(!Draft.can_become(Running));
        assert!(!Failed.can_become(Promoted));
        assert!(!Cancelled.can_become(Pending));
        assert!(!Promoted.can_become(Promoted));
        assert!(!Draft.can_become(Cancelled));
        assert_eq!(Succeeded.next_states(), vec!["promoted", "rolled_back"]);
    }
}
