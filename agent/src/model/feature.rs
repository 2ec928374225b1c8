//! What the kernel offers the agent (`rlctl status`): each feature, whether it is there,
//! and what its absence turns off.

use serde::{Deserialize, Serialize};

/// One kernel feature as probed at the agent's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFeature {
    /// A short name: `cgroup_sock_addr`, `helper:bpf_set_retval`, `psi_triggers`...
    pub name: String,
    pub state: FeatureState,
    /// The agent does not start without it.
    pub required: bool,
    /// What is off without it (for a feature this version does not use yet, that it is
    /// unused).
    pub without: String,
    /// Why the state is `unknown` (the probe's own error), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureState {
    Available,
    Missing,
    /// The probe itself failed; the programs' load is then what tells.
    Unknown,
}

impl KernelFeature {
    /// The first required feature that is missing, if any.
    pub fn first_missing_required(features: &[Self]) -> Option<&Self> {
        features
            .iter()
            .find(|f| f.required && f.state == FeatureState::Missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature(name: &str, state: FeatureState, required: bool) -> KernelFeature {
        KernelFeature {
            name: name.to_string(),
            state,
            required,
            without: String::new(),
            detail: None,
        }
    }

    #[test]
    fn only_a_required_feature_that_is_missing_stops_the_start() {
        let features = [
            feature("a", FeatureState::Missing, false),
            feature("b", FeatureState::Unknown, true),
            feature("c", FeatureState::Available, true),
        ];
        assert_eq!(KernelFeature::first_missing_required(&features), None);
        let features = [
            feature("a", FeatureState::Available, true),
            feature("d", FeatureState::Missing, true),
            feature("e", FeatureState::Missing, true),
        ];
        assert_eq!(
            KernelFeature::first_missing_required(&features).map(|f| f.name.as_str()),
            Some("d")
        );
    }

    #[test]
    fn a_feature_reads_back_from_its_json() {
        let f = KernelFeature {
            name: "psi_triggers".into(),
            state: FeatureState::Unknown,
            required: false,
            without: "unused".into(),
            detail: Some("EPERM".into()),
        };
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains("\"state\":\"unknown\""), "{json}");
        assert_eq!(serde_json::from_str::<KernelFeature>(&json).unwrap(), f);
    }
}
