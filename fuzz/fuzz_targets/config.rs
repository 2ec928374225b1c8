//! The whole config parser: TOML, every section's validator, quotas, targets, durations.
//! Any input must give a config or an error, never a panic.
#![no_main]

use std::{io, path::Path};

use libfuzzer_sys::fuzz_target;
use rlagent::{config::Config, model::users::UserDb};

struct Users;

impl UserDb for Users {
    fn uid(&self, name: &str) -> io::Result<Option<u32>> {
        Ok((name == "root").then_some(0))
    }
    fn gid(&self, name: &str) -> io::Result<Option<u32>> {
        Ok((name == "root").then_some(0))
    }
    fn groups_of(&self, uid: u32) -> io::Result<Vec<u32>> {
        Ok(if uid == 0 { vec![0] } else { Vec::new() })
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, Path::new("fuzz.toml"), &Users);
    }
});
