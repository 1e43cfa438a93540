//! The state machines of jobs, attempts and workers (docs/service.md).
//!
//! Every state change in the system is checked here, against one table per machine, before the
//! store writes it. The store writes each job transition together with its `job_events` row in
//! one transaction, so the event log is the exact history of the table's edges.

use segtrain_proto::v1 as pb;
use std::fmt;

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal {machine} transition {from} -> {to}")]
pub struct IllegalTransition {
    pub machine: &'static str,
    pub from: &'static str,
    pub to: &'static str,
}

macro_rules! state_enum {
    ($(#[$doc:meta])* $name:ident, $machine:literal { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name stored in PostgreSQL and printed by the CLI.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

state_enum!(
    /// Lifecycle of a job (docs/service.md).
    JobState, "job" {
        Queued = "QUEUED",
        Scheduled = "SCHEDULED",
        Running = "RUNNING",
        Succeeded = "SUCCEEDED",
        Failed = "FAILED",
        Canceled = "CANCELED",
        Restarting = "RESTARTING",
        Canceling = "CANCELING",
    }
);

state_enum!(
    /// Lifecycle of one attempt (one gang of ranks) of a job.
    AttemptState, "attempt" {
        Pending = "PENDING",
        Rendezvous = "RENDEZVOUS",
        Running = "RUNNING",
        Succeeded = "SUCCEEDED",
        Failed = "FAILED",
        Lost = "LOST",
        Canceled = "CANCELED",
        // Asked to stop with a checkpoint: a worker was preempted, or an elastic job grows back.
        // Not terminal: its ranks are stopping.
        Stopping = "STOPPING",
        // A worker was preempted; every rank stopped (with a checkpoint of that iteration).
        Preempted = "PREEMPTED",
        // Stopped with a checkpoint so the job restarts at another world size.
        Resized = "RESIZED",
    }
);

state_enum!(
    /// State of a worker daemon (one GPU).
    WorkerState, "worker" {
        Idle = "IDLE",
        Busy = "BUSY",
        Lost = "LOST",
        Draining = "DRAINING",
    }
);

/// The job transition table: every legal edge, and nothing else.
///
/// Cancel always wins: from any live state there is an edge towards CANCELED (directly when no
/// trainer can be running, via CANCELING when trainers must be stopped first), and CANCELING
/// leads nowhere but CANCELED. Terminal states have no outgoing edges.
const JOB_TRANSITIONS: &[(JobState, JobState)] = {
    use JobState::*;
    &[
        (Queued, Scheduled),
        (Queued, Canceled),
        (Scheduled, Running),
        (Scheduled, Restarting),
        (Scheduled, Failed),
        (Scheduled, Canceling),
        (Running, Succeeded),
        (Running, Failed),
        (Running, Restarting),
        (Running, Canceling),
        (Restarting, Queued),
        (Restarting, Failed),
        (Restarting, Canceled),
        (Canceling, Canceled),
    ]
};

const ATTEMPT_TRANSITIONS: &[(AttemptState, AttemptState)] = {
    use AttemptState::*;
    &[
        (Pending, Rendezvous),
        // No rendezvous to wait for: a world-size-1 attempt, or every rank reported started
        // before rank 0's endpoint was recorded (rank 0 may start before it publishes).
        (Pending, Running),
        (Pending, Failed),
        (Pending, Lost),
        (Pending, Canceled),
        (Rendezvous, Running),
        (Rendezvous, Failed),
        (Rendezvous, Lost),
        (Rendezvous, Canceled),
        (Running, Succeeded),
        (Running, Failed),
        (Running, Lost),
        (Running, Canceled),
        // A preempted rank stops the others; a shrunk elastic job is stopped to grow back.
        (Pending, Stopping),
        (Rendezvous, Stopping),
        (Running, Stopping),
        (Stopping, Succeeded),
        (Stopping, Preempted),
        (Stopping, Resized),
        (Stopping, Failed),
        (Stopping, Lost),
        (Stopping, Canceled),
    ]
};

const WORKER_TRANSITIONS: &[(WorkerState, WorkerState)] = {
    use WorkerState::*;
    &[
        (Idle, Busy),
        (Idle, Lost),
        (Idle, Draining),
        (Busy, Idle),
        (Busy, Lost),
        (Busy, Draining),
        (Lost, Idle),
        (Draining, Idle),
        (Draining, Busy),
        (Draining, Lost),
    ]
};

impl JobState {
    /// The state every new job starts in.
    pub const INITIAL: JobState = JobState::Queued;

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Canceled
        )
    }

    /// Checks one edge against the table.
    pub fn check_transition(self, to: JobState) -> Result<(), IllegalTransition> {
        check(JOB_TRANSITIONS, "job", self, to, JobState::as_str)
    }

    /// Where a cancel request takes a job in this state: straight to CANCELED when no trainer can
    /// be running, to CANCELING when trainers must be stopped first; `None` when the job is
    /// already canceling or finished.
    pub fn cancel_target(self) -> Option<JobState> {
        match self {
            JobState::Queued | JobState::Restarting => Some(JobState::Canceled),
            JobState::Scheduled | JobState::Running => Some(JobState::Canceling),
            JobState::Canceling | JobState::Succeeded | JobState::Failed | JobState::Canceled => {
                None
            }
        }
    }

    pub fn to_proto(self) -> pb::JobState {
        match self {
            JobState::Queued => pb::JobState::Queued,
            JobState::Scheduled => pb::JobState::Scheduled,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Canceled => pb::JobState::Canceled,
            JobState::Restarting => pb::JobState::Restarting,
            JobState::Canceling => pb::JobState::Canceling,
        }
    }

    pub fn from_proto(s: pb::JobState) -> Option<JobState> {
        JobState::ALL.iter().copied().find(|j| j.to_proto() == s)
    }
}

impl AttemptState {
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            AttemptState::Pending
                | AttemptState::Rendezvous
                | AttemptState::Running
                | AttemptState::Stopping
        )
    }

    /// Whether its ranks should run (a stopping attempt's are being stopped).
    pub fn wants_ranks(self) -> bool {
        matches!(
            self,
            AttemptState::Pending | AttemptState::Rendezvous | AttemptState::Running
        )
    }

    pub fn to_proto(self) -> pb::AttemptState {
        match self {
            AttemptState::Pending => pb::AttemptState::Pending,
            AttemptState::Rendezvous => pb::AttemptState::Rendezvous,
            AttemptState::Running => pb::AttemptState::Running,
            AttemptState::Succeeded => pb::AttemptState::Succeeded,
            AttemptState::Failed => pb::AttemptState::Failed,
            AttemptState::Lost => pb::AttemptState::Lost,
            AttemptState::Canceled => pb::AttemptState::Canceled,
            AttemptState::Stopping => pb::AttemptState::Stopping,
            AttemptState::Preempted => pb::AttemptState::Preempted,
            AttemptState::Resized => pb::AttemptState::Resized,
        }
    }

    pub fn check_transition(self, to: AttemptState) -> Result<(), IllegalTransition> {
        check(
            ATTEMPT_TRANSITIONS,
            "attempt",
            self,
            to,
            AttemptState::as_str,
        )
    }
}

impl WorkerState {
    pub fn check_transition(self, to: WorkerState) -> Result<(), IllegalTransition> {
        check(WORKER_TRANSITIONS, "worker", self, to, WorkerState::as_str)
    }

    pub fn to_proto(self) -> pb::WorkerState {
        match self {
            WorkerState::Idle => pb::WorkerState::Idle,
            WorkerState::Busy => pb::WorkerState::Busy,
            WorkerState::Lost => pb::WorkerState::Lost,
            WorkerState::Draining => pb::WorkerState::Draining,
        }
    }
}

fn check<S: Copy + PartialEq>(
    table: &[(S, S)],
    machine: &'static str,
    from: S,
    to: S,
    name: fn(S) -> &'static str,
) -> Result<(), IllegalTransition> {
    if table.contains(&(from, to)) {
        Ok(())
    } else {
        Err(IllegalTransition {
            machine,
            from: name(from),
            to: name(to),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_job_states_have_no_outgoing_edges() {
        for &from in JobState::ALL.iter().filter(|s| s.is_terminal()) {
            for &to in JobState::ALL {
                assert!(from.check_transition(to).is_err(), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn every_live_job_state_can_reach_canceled() {
        for &s in JobState::ALL.iter().filter(|s| !s.is_terminal()) {
            // Follow cancel targets; CANCELING itself goes to CANCELED.
            let next = s.cancel_target().unwrap_or(JobState::Canceled);
            assert!(s.check_transition(next).is_ok(), "{s} -> {next}");
            if next == JobState::Canceling {
                assert!(next.check_transition(JobState::Canceled).is_ok());
            }
        }
    }

    #[test]
    fn canceling_only_leads_to_canceled() {
        for &to in JobState::ALL {
            let ok = JobState::Canceling.check_transition(to).is_ok();
            assert_eq!(ok, to == JobState::Canceled, "CANCELING -> {to}");
        }
    }

    #[test]
    fn self_loops_are_illegal() {
        for &s in JobState::ALL {
            assert!(s.check_transition(s).is_err());
        }
        for &s in AttemptState::ALL {
            assert!(s.check_transition(s).is_err());
        }
        for &s in WorkerState::ALL {
            assert!(s.check_transition(s).is_err());
        }
    }

    #[test]
    fn names_round_trip() {
        for &s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
            assert_eq!(JobState::from_proto(s.to_proto()), Some(s));
        }
        for &s in AttemptState::ALL {
            assert_eq!(AttemptState::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobState::parse("queued"), None);
    }

    #[test]
    fn terminal_attempt_states_are_final() {
        for &from in AttemptState::ALL.iter().filter(|s| s.is_terminal()) {
            for &to in AttemptState::ALL {
                assert!(from.check_transition(to).is_err());
            }
        }
    }
}
