//! Subordinate UID ranges (`/etc/subuid`, subuid(5)): the UIDs a user's rootless
//! containers run as (podman, buildah, apptainer). Connections made under those UIDs belong
//! to the user who owns the range. Parsed here from text; the file is read by `config`.

use std::fmt;

use thiserror::Error;

use super::users::UserDb;

/// How many aligned prefixes the kernel's table of ranges holds
/// (`rlagent_common::MAX_SUBUID_PREFIXES`): a range of 65,536 UIDs takes at most 17.
pub const MAX_PREFIXES: usize = rlagent_common::MAX_SUBUID_PREFIXES as usize;

/// `[bpf] subordinate_uids`: whom a connection under a subordinate UID is charged to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SubordinateUids {
    /// The user who owns the range (the default): a user's containers share the user's
    /// limits.
    #[default]
    Owner,
    /// The kernel UID itself, as any other UID.
    Separate,
}

impl SubordinateUids {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "owner" => Some(Self::Owner),
            "separate" => Some(Self::Separate),
            _ => None,
        }
    }
}

/// `count` UIDs from `first` on belong to `owner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SubordinateRange {
    pub first: u32,
    pub count: u32,
    pub owner: u32,
}

impl SubordinateRange {
    /// The last UID of the range.
    pub fn last(&self) -> u32 {
        self.first + (self.count - 1)
    }

    /// The range as aligned prefixes of the 32-bit UID space, `(prefix length, base)`,
    /// for a longest-prefix-match table: at most 62 of them.
    pub fn prefixes(&self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let (mut start, end) = (u64::from(self.first), u64::from(self.last()) + 1);
        while start < end {
            // The largest aligned block that starts at `start` and fits before `end`.
            let align = if start == 0 {
                32
            } else {
                start.trailing_zeros().min(32)
            };
            let mut size_log = align;
            while (1u64 << size_log) > end - start {
                size_log -= 1;
            }
            out.push((32 - size_log, start as u32));
            start += 1u64 << size_log;
        }
        out
    }
}

impl fmt::Display for SubordinateRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{} of uid {}", self.first, self.last(), self.owner)
    }
}

/// A subuid file that cannot be used; nothing of it applies.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SubuidError {
    #[error("line {line}: expected user:first:count (a user name or UID, then two whole numbers, count at least 1, the range within 0-4294967294)")]
    Malformed { line: usize },
    #[error("line {line}: the range {range} overlaps line {other}'s {other_range}")]
    Overlap {
        line: usize,
        range: SubordinateRange,
        other: usize,
        other_range: SubordinateRange,
    },
    #[error("the ranges take {prefixes} aligned prefixes, more than the {MAX_PREFIXES} the kernel's table holds")]
    TooMany { prefixes: usize },
    #[error("line {line}: uid {uid} owns a range that holds its own UID")]
    OwnRange { line: usize, uid: u32 },
    #[error("line {line}: a range may not hold UID 0 (root)")]
    Root { line: usize },
}

/// A parsed subuid file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Subuid {
    /// The ranges, sorted.
    pub ranges: Vec<SubordinateRange>,
    /// Lines whose user name could not be resolved (no such user, or the lookup failed:
    /// a directory service not up yet): (line, name, why). Their ranges are left out.
    pub unresolved: Vec<(usize, String, String)>,
}

/// Parses subuid(5) text: `user:first:count` a line (`#` comments and blank lines
/// skipped), names resolved through `users`. Ranges may not overlap; a range may not hold
/// its owner's own UID (that would make the owner its own subordinate), nor root's. A
/// name that does not resolve leaves its range out (see [`Subuid::unresolved`]) rather
/// than refusing the file.
pub fn parse(text: &str, users: &dyn UserDb) -> Result<Subuid, SubuidError> {
    let mut unresolved = Vec::new();
    let mut ranges: Vec<(SubordinateRange, usize)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let entry = raw.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = entry.split(':').collect();
        let [who, first, count] = fields.as_slice() else {
            return Err(SubuidError::Malformed { line });
        };
        let number = |s: &str| s.parse::<u32>().ok();
        let (Some(first), Some(count)) = (number(first), number(count)) else {
            return Err(SubuidError::Malformed { line });
        };
        // u32::MAX is (uid_t)-1, never a real UID.
        if count == 0 || u64::from(first) + u64::from(count) > u64::from(u32::MAX) {
            return Err(SubuidError::Malformed { line });
        }
        let owner = match number(who) {
            Some(uid) => uid,
            None if who.is_empty() => return Err(SubuidError::Malformed { line }),
            None => match users.uid(who) {
                Ok(Some(uid)) => uid,
                Ok(None) => {
                    unresolved.push((line, who.to_string(), "no such user".to_string()));
                    continue;
                }
                Err(e) => {
                    unresolved.push((line, who.to_string(), e.to_string()));
                    continue;
                }
            },
        };
        let range = SubordinateRange {
            first,
            count,
            owner,
        };
        if (range.first..=range.last()).contains(&owner) {
            return Err(SubuidError::OwnRange { line, uid: owner });
        }
        if range.first == 0 {
            return Err(SubuidError::Root { line });
        }
        ranges.push((range, line));
    }
    let prefixes: usize = ranges.iter().map(|(r, _)| r.prefixes().len()).sum();
    if prefixes > MAX_PREFIXES {
        return Err(SubuidError::TooMany { prefixes });
    }
    ranges.sort();
    for pair in ranges.windows(2) {
        let ((a, a_line), (b, b_line)) = (pair[0], pair[1]);
        if b.first <= a.last() {
            let ((range, line), (other_range, other)) = if a_line > b_line {
                ((a, a_line), (b, b_line))
            } else {
                ((b, b_line), (a, a_line))
            };
            return Err(SubuidError::Overlap {
                line,
                range,
                other,
                other_range,
            });
        }
    }
    Ok(Subuid {
        ranges: ranges.into_iter().map(|(r, _)| r).collect(),
        unresolved,
    })
}

/// The owner of `uid` when it lies in one of `ranges` (sorted, as [`parse`] returns them).
pub fn owner_of(ranges: &[SubordinateRange], uid: u32) -> Option<u32> {
    let i = ranges.partition_point(|r| r.last() < uid);
    ranges.get(i).filter(|r| r.first <= uid).map(|r| r.owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Users;
    impl UserDb for Users {
        fn uid(&self, name: &str) -> std::io::Result<Option<u32>> {
            Ok(match name {
                "alice" => Some(1001),
                "bob" => Some(1002),
                _ => None,
            })
        }
        fn gid(&self, _: &str) -> std::io::Result<Option<u32>> {
            Ok(None)
        }
        fn groups_of(&self, _: u32) -> std::io::Result<Vec<u32>> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn a_subuid_file_reads_as_sorted_ranges_with_names_resolved() {
        let text = "# comment\n\nbob:165536:65536\nalice:100000:65536\n1003:231072:10\nnobody-yet:300000:10\n";
        let Subuid { ranges, unresolved } = parse(text, &Users).unwrap();
        assert_eq!(
            unresolved,
            vec![(6, "nobody-yet".to_string(), "no such user".to_string())],
            "an unknown name leaves its range out"
        );
        assert_eq!(
            ranges,
            vec![
                SubordinateRange {
                    first: 100000,
                    count: 65536,
                    owner: 1001
                },
                SubordinateRange {
                    first: 165536,
                    count: 65536,
                    owner: 1002
                },
                SubordinateRange {
                    first: 231072,
                    count: 10,
                    owner: 1003
                },
            ]
        );
        assert_eq!(owner_of(&ranges, 100000), Some(1001));
        assert_eq!(owner_of(&ranges, 165535), Some(1001));
        assert_eq!(owner_of(&ranges, 165536), Some(1002));
        assert_eq!(owner_of(&ranges, 231081), Some(1003));
        assert_eq!(owner_of(&ranges, 231082), None);
        assert_eq!(owner_of(&ranges, 99999), None);
        assert_eq!(owner_of(&ranges, 1001), None);
    }

    #[test]
    fn bad_lines_are_named_without_their_text() {
        for (text, want) in [
            ("alice:100000\n", SubuidError::Malformed { line: 1 }),
            ("\nalice:x:65536\n", SubuidError::Malformed { line: 2 }),
            ("alice:100000:0\n", SubuidError::Malformed { line: 1 }),
            ("alice:4294967295:1\n", SubuidError::Malformed { line: 1 }),
            (":100000:10\n", SubuidError::Malformed { line: 1 }),
            (
                "alice:1000:10\n",
                SubuidError::OwnRange { line: 1, uid: 1001 },
            ),
            ("alice:0:10\n", SubuidError::Root { line: 1 }),
        ] {
            assert_eq!(parse(text, &Users), Err(want), "{text:?}");
        }

        // 6,000 ranges as adduser makes them (65,536 each from 100,000 up: 12 prefixes
        // each) take more prefixes than the table holds; 5,000 fit.
        let many = |n: u32| -> String {
            (0..n)
                .map(|i| format!("{}:{}:65536\n", 20_000 + i, 100_000 + i * 65_536))
                .collect()
        };
        assert!(matches!(
            parse(&many(6000), &Users),
            Err(SubuidError::TooMany { prefixes: 72_000 })
        ));
        assert_eq!(parse(&many(5000), &Users).map(|s| s.ranges.len()), Ok(5000));
    }

    #[test]
    fn overlapping_ranges_are_refused_with_both_lines() {
        let e = parse("alice:100000:65536\nbob:165535:10\n", &Users).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: the range 165535-165544 of uid 1002 overlaps line 1's 100000-165535 of uid 1001"
        );
    }

    #[test]
    fn a_range_becomes_the_fewest_aligned_prefixes_that_cover_it_exactly() {
        let check = |first: u32, count: u32| {
            let range = SubordinateRange {
                first,
                count,
                owner: 1,
            };
            let prefixes = range.prefixes();
            assert!(prefixes.len() <= 62, "{range}: {}", prefixes.len());
            let mut next = u64::from(first);
            for (len, base) in &prefixes {
                assert_eq!(u64::from(*base), next, "{range}: contiguous");
                let size = 1u64 << (32 - len);
                assert_eq!(u64::from(*base) % size, 0, "{range}: aligned");
                next += size;
            }
            assert_eq!(next, u64::from(first) + u64::from(count), "{range}: exact");
        };
        check(100000, 65536);
        check(0, 1);
        check(65536, 65536);
        check(1, u32::MAX - 1);
        check(4294901760, 65535);
        assert_eq!(
            SubordinateRange {
                first: 65536,
                count: 65536,
                owner: 1
            }
            .prefixes(),
            vec![(16, 65536)]
        );
    }
}
