//! Vocabulary shared by every layer: quotas and their units, targets, durations, alert
//! rule types, measured usage, untrusted text escaped for display. No I/O here.

pub mod adapt;
pub mod alert;
pub mod duration;
pub mod event;
pub mod feature;
pub mod layout;
pub mod quota;
pub mod reason;
pub mod subuid;
pub mod target;
pub mod text;
pub mod units;
pub mod usage;
pub mod users;

/// An error and its causes joined with ": ". Our errors never repeat their source in their
/// own message (aya's convention), so this is the whole story exactly once.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
