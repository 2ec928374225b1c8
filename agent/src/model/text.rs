//! Text from outside the agent (a process name, a path, a name in a request, config text)
//! as it is safe to show: in a log line, in a table row, on an operator's terminal.
//!
//! A process names itself (prctl PR_SET_NAME) and a tenant names its cgroups and files, so
//! such text may hold a newline (a forged second log line, which journald reads with the
//! priority prefix it finds there), a carriage return or a terminal escape (a cleared
//! screen, a rewritten row). Every place that shows such text shows [`escaped`] text.

use std::{fmt, os::unix::ffi::OsStrExt, path::Path};

/// `text` with every control character (C0, DEL and C1), every character that reorders or
/// breaks a line on a terminal (bidi controls, U+2028, U+2029) and every byte that is not
/// valid UTF-8 written as `\xNN` (one per byte), and a backslash as `\\`; everything else
/// as it is. The result never holds a control byte, and it reads back unambiguously.
/// Width and alignment (`{:<16}`) apply to the escaped text.
#[derive(Clone, Copy)]
pub struct Escaped<'a>(&'a [u8]);

/// `text` as it is safe to show (see [`Escaped`]).
pub fn escaped<T: AsRef<[u8]> + ?Sized>(text: &T) -> Escaped<'_> {
    Escaped(text.as_ref())
}

/// A path as it is safe to show (see [`Escaped`]); its bytes need not be UTF-8.
pub fn escaped_path(path: &Path) -> Escaped<'_> {
    Escaped(path.as_os_str().as_bytes())
}

/// True for the characters [`Escaped`] writes as bytes.
fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || matches!(c, '\u{2028}' | '\u{2029}')
}

impl Escaped<'_> {
    /// The escaped text.
    pub fn to_text(&self) -> String {
        use fmt::Write as _;
        let mut out = String::with_capacity(self.0.len());
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c == '\\' {
                    out.push_str("\\\\");
                } else if must_escape(c) {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                } else {
                    out.push(c);
                }
            }
            for b in chunk.invalid() {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
        out
    }
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.to_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{ffi::OsStr, path::PathBuf};

    #[test]
    fn control_bytes_become_hex_and_backslashes_double() {
        let comm = "\x1b[2J\r\n<0>FAKE\x7f\t\\x1b";
        let shown = escaped(comm).to_string();
        assert_eq!(shown, "\\x1b[2J\\x0d\\x0a<0>FAKE\\x7f\\x09\\\\x1b");
        assert!(!shown.bytes().any(|b| b.is_ascii_control()));
    }

    #[test]
    fn printable_text_is_left_as_it_is() {
        for text in ["curl", "stress-ng: worker", "ünïcode ✓", "user:1001", ""] {
            assert_eq!(escaped(text).to_string(), text);
        }
    }

    #[test]
    fn invalid_utf8_and_c1_and_bidi_controls_are_bytes() {
        assert_eq!(escaped(b"a\xffb\xc3").to_string(), "a\\xffb\\xc3");
        // CSI as one C1 character: some terminals act on it like ESC [.
        assert_eq!(escaped("\u{9b}2J").to_string(), "\\xc2\\x9b2J");
        // RIGHT-TO-LEFT OVERRIDE and LINE SEPARATOR.
        assert_eq!(
            escaped("a\u{202e}b\u{2028}").to_string(),
            "a\\xe2\\x80\\xaeb\\xe2\\x80\\xa8"
        );
    }

    #[test]
    fn paths_need_not_be_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let path = PathBuf::from(OsStr::from_bytes(b"/sys/fs/cgroup/x\n\xfey"));
        assert_eq!(
            escaped_path(&path).to_string(),
            "/sys/fs/cgroup/x\\x0a\\xfey"
        );
    }

    #[test]
    fn width_applies_to_the_escaped_text() {
        assert_eq!(format!("[{:<6}]", escaped("a\nb")), "[a\\x0ab]");
        assert_eq!(format!("[{:<8}]", escaped("a\nb")), "[a\\x0ab  ]");
    }
}
