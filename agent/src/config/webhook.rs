//! `[penalty_webhook]`: the fleet's penalty decisions, delivered by Alertmanager's webhook
//! and authenticated by a bearer token read from a file only the agent may read.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use toml::Spanned;

use super::{raw::RawWebhook, ConfigError, Source};
use crate::model::duration;

/// The longest token read.
const MAX_TOKEN: u64 = 4096;

/// A secret that never shows in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Validated `[penalty_webhook]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    pub token: Secret,
    /// How long a fleet penalty holds without its alert being sent again.
    pub max_duration: Duration,
}

pub(super) fn validate(
    at: &Source,
    raw: &Option<Spanned<RawWebhook>>,
) -> Result<Option<WebhookConfig>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let line = at.line(raw.span());
    let r = raw.get_ref();
    let listen = r.listen.get_ref().parse::<SocketAddr>().map_err(|_| {
        at.invalid(
            at.line(r.listen.span()),
            "listen",
            r.listen.get_ref(),
            "expected an address and port such as 127.0.0.1:9466",
        )
    })?;
    let Some(token_file) = &r.token_file else {
        return Err(at.invalid(
            line,
            "token_file",
            "",
            "a webhook needs a token_file: a file only root may read holding the bearer token Alertmanager sends",
        ));
    };
    let file_line = at.line(token_file.span());
    let path = token_file.get_ref();
    let shown = path.display().to_string();
    let token =
        read_token(path).map_err(|why| at.invalid(file_line, "token_file", &shown, &why))?;
    let max_duration = match &r.max_duration {
        None => Duration::from_secs(3600),
        Some(v) => duration::parse(v.get_ref())
            .filter(|d| !d.is_zero() && *d <= crate::model::adapt::MAX_RULE_DURATION)
            .ok_or_else(|| {
                at.invalid(
                    at.line(v.span()),
                    "max_duration",
                    v.get_ref(),
                    "expected a duration above 0 and at most a year, such as 30m or 1h",
                )
            })?,
    };
    Ok(Some(WebhookConfig {
        listen,
        token_file: path.clone(),
        token: Secret(token),
        max_duration,
    }))
}

/// The token in `path`: a regular file of the agent's user (not a link), that no one else
/// may read or write, holding one non-empty line.
fn read_token(path: &std::path::Path) -> Result<String, String> {
    use std::{
        io::Read,
        os::unix::fs::{MetadataExt, OpenOptionsExt},
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("cannot open it: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!(
            "owned by uid {}, not by the agent's user: anyone who can write it could send penalties",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "mode {:o}: group or others may read or write it (chmod 600)",
            meta.mode() & 0o7777
        ));
    }
    let mut text = String::new();
    file.take(MAX_TOKEN + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let token = text.trim();
    if token.is_empty() || text.len() as u64 > MAX_TOKEN || token.contains(char::is_whitespace) {
        return Err(format!(
            "expected one token of 1 to {MAX_TOKEN} characters without spaces"
        ));
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use crate::{model::error_chain, testing::Users};

    fn parse(text: &str) -> Result<crate::config::Config, String> {
        crate::config::Config::parse(text, std::path::Path::new("t.toml"), &Users)
            .map_err(|e| error_chain(&e))
    }

    #[test]
    fn the_token_file_must_exist_and_be_the_agents_alone() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = |extra: &str| {
            format!(
                "[penalty_webhook]\nlisten = \"127.0.0.1:9466\"\ntoken_file = {:?}\n{extra}",
                token.display().to_string()
            )
        };
        let c = parse(&text("max_duration = \"30m\"")).unwrap();
        let w = c.penalty_webhook.unwrap();
        assert_eq!(w.token.expose(), "s3cret");
        assert_eq!(w.max_duration, std::time::Duration::from_secs(1800));
        assert!(
            !format!("{w:?}").contains("s3cret"),
            "the token never shows"
        );
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = parse(&text("")).unwrap_err();
        assert!(
            err.contains("line 3: token_file") && err.contains("mode 644"),
            "{err}"
        );
        let err = parse("[penalty_webhook]\nlisten = \"127.0.0.1:9466\"\n").unwrap_err();
        assert!(err.contains("a webhook needs a token_file"), "{err}");
        let err =
            parse("[penalty_webhook]\nlisten = \"anywhere\"\ntoken_file = \"/x\"\n").unwrap_err();
        assert!(err.contains("expected an address and port"), "{err}");
        std::fs::write(&token, "").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(parse(&text("")).unwrap_err().contains("expected one token"));
    }

    #[test]
    fn a_reload_keeps_the_address_bound_turns_a_removed_webhook_off_and_defers_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0k\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with = |port: u16| {
            parse(&format!(
                "[penalty_webhook]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = {:?}\n",
                token.display().to_string()
            ))
            .unwrap()
        };
        let without = parse("").unwrap();
        let running = with(9466);
        let mut moved = with(9467);
        assert_eq!(
            moved.keep_restart_settings(&running),
            ["[penalty_webhook] listen"]
        );
        assert_eq!(moved.penalty_webhook.unwrap().listen.port(), 9466);
        let mut removed = without.clone();
        assert!(removed.keep_restart_settings(&running).is_empty());
        assert!(removed.penalty_webhook.is_none(), "off at the reload");
        let mut added = with(9466);
        assert_eq!(
            added.keep_restart_settings(&without),
            ["[penalty_webhook] (added)"]
        );
        assert!(
            added.penalty_webhook.is_none(),
            "nothing listens until a restart"
        );
    }
}
