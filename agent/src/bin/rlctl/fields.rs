//! The quota options of `set-quota` and `clear-quota`: one per [`Field`], made from
//! [`Field::ALL`], so a new field gets its options (and needs its help line below, or the
//! match stops compiling).

use std::collections::BTreeMap;

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use rlagent::model::quota::Field;

/// The value forms a field takes, as `set-quota --help` shows them.
fn help(field: Field) -> &'static str {
    match field {
        Field::Cpu => "CPU as a percentage of one CPU (50%, 250%) or max",
        Field::Memory => "memory.max: 512M, 2G, ... or max",
        Field::MemoryHigh => "memory.high: 512M, 2G, ... or max",
        Field::Pids => "pids.max or max",
        Field::Conns => "Live connections (of a UID, or of a group's processes together) or max",
        Field::ConnRate => "New connections per second or minute (20/s, 30/min) or max",
        Field::ConnBurst => "Connection burst (with --conn-rate; default: the rate's count)",
        Field::Mode => {
            "enforce, or monitor: connection limits only count and report what they would deny"
        }
    }
}

/// A field's option: `memory-high` for `memory_high`.
pub fn flag(field: Field) -> String {
    field.name().replace('_', "-")
}

/// Every field's option, as a usage message lists them: `--cpu --memory ...`.
pub fn flags() -> String {
    Field::ALL
        .iter()
        .map(|f| format!("--{}", flag(*f)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `set-quota`'s values, in the config file's forms.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QuotaArgs(pub BTreeMap<Field, String>);

impl FromArgMatches for QuotaArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self(
            Field::ALL
                .into_iter()
                .filter_map(|f| Some((f, matches.get_one::<String>(f.name())?.clone())))
                .collect(),
        ))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for QuotaArgs {
    fn augment_args(cmd: Command) -> Command {
        Field::ALL.into_iter().enumerate().fold(cmd, |cmd, (i, f)| {
            cmd.arg(
                Arg::new(f.name())
                    .long(flag(f))
                    .value_name("VALUE")
                    .help(help(f))
                    .display_order(10 + i),
            )
        })
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// `clear-quota`'s fields, or `--all`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClearArgs {
    pub fields: Vec<Field>,
    pub all: bool,
}

impl FromArgMatches for ClearArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self {
            fields: Field::ALL
                .into_iter()
                .filter(|f| matches.get_flag(f.name()))
                .collect(),
            all: matches.get_flag("all"),
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for ClearArgs {
    fn augment_args(cmd: Command) -> Command {
        let cmd = Field::ALL.into_iter().enumerate().fold(cmd, |cmd, (i, f)| {
            cmd.arg(
                Arg::new(f.name())
                    .long(flag(f))
                    .action(ArgAction::SetTrue)
                    .help(format!("Clear {}", f.name()))
                    .display_order(10 + i),
            )
        });
        cmd.arg(
            Arg::new("all")
                .long("all")
                .action(ArgAction::SetTrue)
                .conflicts_with_all(Field::ALL.map(Field::name))
                .help("Every field")
                .display_order(10 + Field::ALL.len()),
        )
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: Args + FromArgMatches>(args: &[&str]) -> Result<T, clap::Error> {
        let cmd = T::augment_args(Command::new("t").no_binary_name(true));
        T::from_arg_matches(&cmd.try_get_matches_from(args)?)
    }

    #[test]
    fn every_field_has_its_option_in_both_commands() {
        for field in Field::ALL {
            let option = format!("--{}", flag(field));
            let set: QuotaArgs = parse(&[&option, "7"]).unwrap();
            assert_eq!(
                set.0,
                BTreeMap::from([(field, "7".to_string())]),
                "{option}"
            );
            let clear: ClearArgs = parse(&[&option]).unwrap();
            assert_eq!(clear.fields, vec![field], "{option}");
            assert!(
                parse::<ClearArgs>(&[&option, "--all"]).is_err(),
                "--all conflicts with {option}"
            );
        }
        assert_eq!(flag(Field::MemoryHigh), "memory-high");
        let all: ClearArgs = parse(&["--all"]).unwrap();
        assert_eq!((all.fields.len(), all.all), (0, true));
        assert_eq!(parse::<QuotaArgs>(&[]).unwrap(), QuotaArgs::default());
    }
}
