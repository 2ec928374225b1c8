//! Manual pages for both binaries from their clap definitions: clap_mangen's sections,
//! then every command inline (clap_mangen's own subcommand section refers to a page per
//! command, `rlctl-set-quota(1)` and so on, which nobody installs), then the hand-written
//! sections (EXAMPLES, EXIT STATUS, FILES, SEE ALSO...).

use std::io::{self, Write};

/// Escapes text for roff: backslashes, hyphens (so they print as minus signs and
/// search finds them) and a control character at a line's start.
pub fn escape(text: &str) -> String {
    text.lines()
        .map(|line| {
            let escaped = line.replace('\\', "\\e").replace('-', "\\-");
            if escaped.starts_with('.') || escaped.starts_with('\'') {
                format!("\\&{escaped}")
            } else {
                escaped
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A hand-written section: its heading, then paragraphs of (term, text); an empty term
/// is a plain paragraph. Both are escaped here.
pub struct Section<'a> {
    pub heading: &'a str,
    pub items: &'a [(&'a str, &'a str)],
}

/// The page of `cmd` in manual `section` (1 or 8), with `extra` sections at the end.
pub fn render(
    cmd: clap::Command,
    section: &str,
    extra: &[Section<'_>],
    w: &mut dyn Write,
) -> io::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone()).section(section);
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    let commands: Vec<&clap::Command> =
        cmd.get_subcommands().filter(|s| !s.is_hide_set()).collect();
    if !commands.is_empty() {
        writeln!(w, ".SH COMMANDS")?;
        for sub in commands {
            let usage = sub.clone().render_usage().to_string();
            let usage = usage.trim_start_matches("Usage: ").trim();
            writeln!(w, ".TP\n\\fB{}\\fR", escape(usage))?;
            if let Some(about) = sub.get_long_about().or(sub.get_about()) {
                writeln!(w, "{}", escape(&about.to_string()))?;
            }
            for arg in sub
                .get_arguments()
                .filter(|a| !a.is_hide_set() && !a.is_global_set() && a.get_id() != "help")
            {
                let Some(long) = arg.get_long() else { continue };
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                writeln!(
                    w,
                    ".RS\n.TP\n\\fB\\-\\-{}\\fR\n{}\n.RE",
                    escape(long),
                    escape(&help)
                )?;
            }
        }
    }
    for s in extra {
        writeln!(w, ".SH {}", s.heading)?;
        for (term, text) in s.items {
            if term.is_empty() {
                writeln!(w, ".PP\n{}", escape(text))?;
            } else {
                writeln!(w, ".TP\n\\fB{}\\fR\n{}", escape(term), escape(text))?;
            }
        }
    }
    man.render_version_section(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_roff_would_read_as_markup() {
        assert_eq!(escape("--cpu 50%"), "\\-\\-cpu 50%");
        assert_eq!(
            escape(".hidden\n'x\nC:\\dir"),
            "\\&.hidden\n\\&'x\nC:\\edir"
        );
    }
}
