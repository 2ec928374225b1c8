//! Logging: to stderr, filtered by `RLAGENT_LOG` (default `info`). Under journald (stderr
//! is the stream named by `$JOURNAL_STREAM`), each line starts with its syslog priority
//! (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), so `journalctl -p warning` sees
//! warnings as warnings, and carries no timestamp of its own (journald adds one).
//!
//! Every field and message is shown [`escaped`]: a process name, a path or a config
//! value with a newline must not make a second line (journald would take its `<0>` for
//! the priority), nor a terminal escape reach the reader's screen.

use std::{fmt, os::fd::AsFd};

use rlagent::model::text::escaped;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    field::MakeExt,
    fmt::{
        format::{debug_fn, Writer},
        FmtContext, FormatEvent, FormatFields,
    },
    registry::LookupSpan,
    EnvFilter,
};

/// True when stderr is the journal stream systemd connected (`JOURNAL_STREAM=dev:ino`).
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse() == Ok(stat.st_dev) && ino.parse() == Ok(stat.st_ino)
}

/// Prefixes each line with its syslog priority, then formats it as `inner` does.
struct Priority<F>(F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Fields as `name=value` and the message as it is, each [`escaped`]: the one place log
/// text is made safe, so no field is escaped twice or forgotten.
fn escaped_fields() -> impl for<'w> FormatFields<'w> + 'static {
    debug_fn(|writer, field, value| {
        let text = format!("{value:?}");
        if field.name() == "message" {
            write!(writer, "{}", escaped(&text))
        } else {
            write!(writer, "{}={}", field.name(), escaped(&text))
        }
    })
    .delimited(" ")
}

pub fn init() {
    let filter = EnvFilter::try_from_env("RLAGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .fmt_fields(escaped_fields())
        .with_env_filter(filter);
    if stderr_is_journal() {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_level(false)
            .with_ansi(false);
        builder.event_format(Priority(format)).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a subscriber with our field format writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_field_or_message_cannot_start_a_line() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .fmt_fields(escaped_fields())
            .with_ansi(false)
            .without_time()
            .finish();
        let comm = "\x1b[2J\n<0>FAKE";
        let path = "/tmp/a\rb";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(comm = %comm, pid = 7, "connect() denied");
            tracing::warn!("cannot read {path}");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].ends_with(r"connect() denied comm=\x1b[2J\x0a<0>FAKE pid=7"),
            "{text}"
        );
        assert!(lines[1].ends_with(r"cannot read /tmp/a\x0db"), "{text}");
        assert!(
            !text.bytes().any(|b| b.is_ascii_control() && b != b'\n'),
            "{text:?}"
        );
    }
}
