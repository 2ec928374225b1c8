//! Every value parser on its own: the first byte picks the parser, the rest is the value.
//! Below 0x80 it picks a quota field, every one of `Field::ALL` (so a new field is fuzzed
//! without a change here); from 0x80 up targets, durations, Alertmanager URLs and
//! placement globs, whose seeds keep their meaning when a field is added.
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
    if pick < 0x80 {
        let field = Field::ALL[usize::from(pick) % Field::ALL.len()];
        let mut quota = Quota::default();
        if quota.set(field, text).is_ok() {
            // What was accepted prints in a form the parser reads back.
            let shown = quota.text(field).expect("a set field has text");
            let mut again = Quota::default();
            again.set(field, &shown).expect("the printed form parses");
            assert_eq!(again.text(field), Some(shown));
            let _ = quota.check();
        }
        return;
    }
    match (pick - 0x80) % 4 {
        0 => {
            if let Ok(target) = text.parse::<Target>() {
                let shown = target.to_string();
                assert_eq!(shown.parse::<Target>().as_ref(), Ok(&target));
            }
        }
        1 => {
            let _ = duration::parse(text);
        }
        2 => {
            let _ = AlertmanagerUrl::parse(text);
        }
        _ => {
            let (pattern, name) = text.split_once('\n').unwrap_or((text, ""));
            let _ = glob_match(pattern, name);
        }
    }
});
