//! What the agent's callers can be told went wrong, and how a refusal reads to a client.

use super::reconcile::AgentError;
use crate::{
    config::ConfigError,
    desired::{state::StateError, DesiredError},
    kernel::KernelError,
    model::target::TargetError,
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Boxed: a config error carries the file, line, field and value.
    #[error(transparent)]
    Config(Box<ConfigError>),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Desired(#[from] DesiredError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("{what} failed inside the agent ({message}); what was in force before was re-applied")]
    Panicked { what: &'static str, message: String },
    #[error(
        "alert {alertname:?}: target {target} is not a user:<uid|name> (penalties are per user)"
    )]
    FleetTarget { alertname: String, target: String },
    #[error(transparent)]
    Fleet(#[from] crate::observe::adapt::fleet::FleetError),
}

impl From<ConfigError> for AppError {
    fn from(e: ConfigError) -> Self {
        Self::Config(Box::new(e))
    }
}

/// How a refusal reads to a client: its input was wrong, something it named does not
/// exist, or applying failed (and the previous state is in force).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Invalid,
    NotFound,
    Failed,
}

impl AppError {
    pub fn refusal(&self) -> Refusal {
        use crate::kernel::cgroup::CgroupError;
        let desired = |e: &DesiredError| match e {
            DesiredError::State(StateError::Quota { .. } | StateError::Target(_))
            | DesiredError::TooManyUidCaps { .. }
            | DesiredError::TooManyGroups { .. } => Refusal::Invalid,
            DesiredError::State(_) => Refusal::Failed,
        };
        let kernel = |e: &KernelError| match e {
            KernelError::Cgroup(CgroupError::NoSuchCgroup { .. }) => Refusal::NotFound,
            _ => Refusal::Failed,
        };
        match self {
            Self::Config(_)
            | Self::Target(_)
            | Self::FleetTarget { .. }
            | Self::Fleet(_)
            | Self::Agent(AgentError::NotMovable { .. }) => Refusal::Invalid,
            Self::Desired(e) | Self::Agent(AgentError::Desired(e)) => desired(e),
            Self::Kernel(e) | Self::Agent(AgentError::Kernel(e)) => kernel(e),
            Self::Agent(AgentError::UnknownGroup { .. } | AgentError::NoSuchCgroup { .. }) => {
                Refusal::NotFound
            }
            Self::State(_) | Self::Agent(AgentError::State(_)) | Self::Panicked { .. } => {
                Refusal::Failed
            }
        }
    }
}

/// The text of a panic's payload.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}

#[cfg(test)]
mod error_tests {
    use std::{io, path::PathBuf};

    use crate::{
        config::ConfigError,
        desired::state::StateError,
        kernel::{bpf::BpfError, cgroup::CgroupError, placement::PlacementError},
        model::error_chain,
    };

    /// Our errors name what failed and leave the cause to `source()`: the chain then says
    /// each thing once.
    #[test]
    fn errors_do_not_repeat_their_source() {
        let io = || io::Error::from_raw_os_error(libc::EACCES);
        let path = PathBuf::from("/x/cpu.max");
        let errors: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(ConfigError::Read {
                path: path.clone(),
                source: io(),
            }),
            Box::new(StateError::Write {
                path: path.clone(),
                source: io(),
            }),
            Box::new(CgroupError::Write {
                path: path.clone(),
                value: "max".into(),
                source: io(),
            }),
            Box::new(BpfError::Io {
                what: "opening",
                path: path.clone(),
                source: io(),
            }),
            Box::new(PlacementError::Move {
                pid: 7,
                comm: "sh".into(),
                cgroup: path.clone(),
                source: CgroupError::Write {
                    path,
                    value: "7".into(),
                    source: io(),
                },
            }),
        ];
        for e in errors {
            let chain = error_chain(e.as_ref());
            assert_eq!(chain.matches("Permission denied").count(), 1, "{chain}");
            assert!(!e.to_string().contains("Permission denied"), "{e}");
        }
    }
}
