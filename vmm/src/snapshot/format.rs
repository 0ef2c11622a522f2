//! The state file's framing: what makes a file an nvmm snapshot of this format, whole and intact.
//!
//! ```text
//! offset 0   8 bytes   magic "NVMMSNAP"
//!        8   4 bytes   format version, little-endian
//!       12   8 bytes   length N of the payload, little-endian
//!       20   N bytes   payload: the state as JSON (plain serde structs)
//!     20+N   4 bytes   CRC-32 (IEEE) of everything before it, little-endian
//! ```
//!
//! Anything else is refused before the payload is parsed: another magic, another version, a
//! length that does not match the file, a checksum that does not match its bytes.

pub const MAGIC: &[u8; 8] = b"NVMMSNAP";
/// Bumped whenever the payload's meaning changes; nvmm reads only its own.
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8;
const CRC_LEN: usize = 4;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not an nvmm snapshot state file (no NVMMSNAP magic)")]
    Magic,
    #[error("snapshot format version {0}, and this nvmm reads only version {VERSION}")]
    Version(u32),
    #[error("state file truncated: {len} bytes, the header says {expected}")]
    Truncated { len: usize, expected: u64 },
    #[error("state file has {0} bytes after its end")]
    Trailing(u64),
    #[error("state file corrupted: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum { found: u32, expected: u32 },
}

/// The state file's bytes for `payload`.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The payload of a state file, once magic, version, length and checksum are right.
pub fn decode(file: &[u8]) -> Result<&[u8], FormatError> {
    if file.len() < MAGIC.len() || &file[..MAGIC.len()] != MAGIC {
        return Err(FormatError::Magic);
    }
    let truncated = |expected| FormatError::Truncated { len: file.len(), expected };
    let header = file.get(..HEADER_LEN).ok_or(truncated(HEADER_LEN as u64 + CRC_LEN as u64))?;
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[12..20]);
    let len = u64::from_le_bytes(len);
    let expected = (HEADER_LEN as u64).saturating_add(len).saturating_add(CRC_LEN as u64);
    if (file.len() as u64) < expected {
        return Err(truncated(expected));
    }
    if (file.len() as u64) > expected {
        return Err(FormatError::Trailing(file.len() as u64 - expected));
    }
    let body_end = file.len() - CRC_LEN;
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&file[body_end..]);
    let (found, expected) = (crc32fast::hash(&file[..body_end]), u32::from_le_bytes(crc));
    if found != expected {
        return Err(FormatError::Checksum { found, expected });
    }
    Ok(&file[HEADER_LEN..body_end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = encode(b"{\"a\":1}");
        assert_eq!(&f[..8], MAGIC);
        assert_eq!(decode(&f).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn every_damage_is_named() {
        let f = encode(b"payload");
        assert_eq!(decode(b"ELF\x7f....").unwrap_err(), FormatError::Magic);
        assert_eq!(decode(b"").unwrap_err(), FormatError::Magic);
        assert!(matches!(decode(&f[..f.len() - 1]), Err(FormatError::Truncated { .. })));
        assert!(matches!(decode(&f[..10]), Err(FormatError::Truncated { .. })));
        let mut longer = f.clone();
        longer.push(0);
        assert_eq!(decode(&longer).unwrap_err(), FormatError::Trailing(1));
        let mut flipped = f.clone();
        flipped[22] ^= 1;
        assert!(matches!(decode(&flipped), Err(FormatError::Checksum { .. })));
        let mut v2 = f;
        v2[8] = 2;
        assert_eq!(decode(&v2).unwrap_err(), FormatError::Version(2));
        assert_eq!(FormatError::Version(2).to_string(), "snapshot format version 2, and this nvmm reads only version 1");
    }
}
