//! Reading back what the standalone PVH image (`guest::pvh_image`) printed on COM1, under
//! whichever VMM ran it: `nvmm-bench-raw <kind> <n>`, then `n` lines of 8 hex digits (TSC cycles
//! of one iteration each), per kind, and finally `nvmm-bench-raw end`.

use super::guest::{Kind, IMAGE_TAG};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("no '{IMAGE_TAG} end' line: the guest did not finish (was it the --emit-guest image?)")]
    Unfinished,
    #[error("line {line}: {what}")]
    Bad { line: usize, what: String },
}

/// Samples reserved up front per block; the image prints far fewer per kind.
const MAX_PREALLOCATED: usize = 1 << 16;

/// The samples of each kind, in the order the image printed them.
pub fn parse(text: &str) -> Result<Vec<(Kind, Vec<u32>)>, Error> {
    let mut done: Vec<(Kind, Vec<u32>)> = Vec::new();
    // The block being read: its kind, how many samples it announced, and those read so far.
    let mut open: Option<(Kind, usize, Vec<u32>)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_matches(|c: char| c == '\r' || c.is_whitespace());
        let bad = |what: String| Error::Bad { line: i + 1, what };
        if let Some(rest) = line.strip_prefix(IMAGE_TAG).and_then(|r| r.strip_prefix(' ')) {
            if let Some((kind, want, got)) = &open {
                return Err(bad(format!("'{}' has {} of its {want} samples", kind.name(), got.len())));
            }
            let mut words = rest.split_whitespace();
            match (words.next(), words.next()) {
                (Some("end"), None) => return Ok(done),
                (Some(name), Some(n)) => {
                    let kind = Kind::ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| bad(format!("unknown kind '{name}'")))?;
                    let n: usize = n.parse().map_err(|_| bad(format!("bad sample count '{n}'")))?;
                    // The count comes from the file: reserve no more than a real run prints, and
                    // let a larger block grow as its lines actually arrive.
                    open = Some((kind, n, Vec::with_capacity(n.min(MAX_PREALLOCATED))));
                }
                _ => return Err(bad(format!("malformed header '{line}'"))),
            }
            continue;
        }
        // Outside a block, lines are the VMM's or firmware's own output.
        let Some((kind, want, got)) = open.as_mut() else { continue };
        if line.len() != 8 {
            return Err(bad(format!("expected 8 hex digits, got '{line}'")));
        }
        let v = u32::from_str_radix(line, 16).map_err(|_| bad(format!("expected 8 hex digits, got '{line}'")))?;
        got.push(v);
        if got.len() == *want {
            let (kind, _, got) = (*kind, *want, std::mem::take(got));
            done.push((kind, got));
            open = None;
        }
    }
    Err(Error::Unfinished)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_read_in_order() {
        let text = "qboot banner\r\nnvmm-bench-raw loop 2\r\n0000001a\r\n0000001c\r\nnvmm-bench-raw pio-user 1\n000186a0\nnvmm-bench-raw end\n";
        let got = parse(text).unwrap();
        assert_eq!(got, vec![(Kind::Loop, vec![26, 28]), (Kind::PioUser, vec![100_000])]);
    }

    #[test]
    fn damage_is_reported_with_its_line() {
        assert_eq!(parse("nvmm-bench-raw loop 2\n00000001\n").unwrap_err(), Error::Unfinished);
        let e = parse("nvmm-bench-raw loop 2\n00000001\nnvmm-bench-raw end\n").unwrap_err();
        assert_eq!(e, Error::Bad { line: 3, what: "'loop' has 1 of its 2 samples".into() });
        let e = parse("nvmm-bench-raw loop 1\n0000zz01\n").unwrap_err();
        assert!(matches!(e, Error::Bad { line: 2, .. }));
        let e = parse("nvmm-bench-raw warp 1\n").unwrap_err();
        assert_eq!(e.to_string(), "line 1: unknown kind 'warp'");
    }

    #[test]
    fn a_huge_announced_count_is_not_reserved_up_front() {
        let text = format!("nvmm-bench-raw loop {}\n00000001\n", usize::MAX);
        assert_eq!(parse(&text).unwrap_err(), Error::Unfinished);
    }
}
