//! Every value parser on its own: the first byte picks the parser, the rest is the value.
//! Quota fields, targets, durations, Alertmanager URLs and placement globs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rlagent::{
    kernel::placement::glob_match,
    model::{
        alert::AlertmanagerUrl,
        duration,
        quota::{Field, Quota},
        target::Target,
    },
};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match pick % 11 {
        n @ 0..=6 => {
            let field = Field::ALL[n as usize];
            let mut quota = Quota::default();
            if quota.set(field, text).is_ok() {
                // What was accepted prints in a form the parser reads back.
                let shown = quota.text(field).expect("a set field has text");
                let mut again = Quota::default();
                again.set(field, &shown).expect("the printed form parses");
                assert_eq!(again.text(field), Some(shown));
                let _ = quota.check();
            }
        }
        7 => {
            if let Ok(target) = text.parse::<Target>() {
                let shown = target.to_string();
                assert_eq!(shown.parse::<Target>().as_ref(), Ok(&target));
            }
        }
        8 => {
            let _ = duration::parse(text);
        }
        9 => {
            let _ = AlertmanagerUrl::parse(text);
        }
        _ => {
            let (pattern, name) = text.split_once('\n').unwrap_or((text, ""));
            let _ = glob_match(pattern, name);
        }
    }
});
