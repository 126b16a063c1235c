//! Disk images guests boot from: imported once into the manager's image
//! pool, then used read-only as the backing file of each guest's first disk.

use serde::{Deserialize, Serialize};

use crate::ByteSize;

/// A registered image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Image {
    pub name: String,
    /// Where the pool keeps it (hosts must see this path: shared storage).
    pub path: String,
    /// `qcow2`.
    pub format: String,
    /// The disk size the image presents to a guest.
    pub virtual_size: ByteSize,
    /// Bytes the file takes in the pool.
    pub file_size: ByteSize,
    pub imported_at: String,
}

/// What a qcow2 header says, as far as drove cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub virtual_size: u64,
    pub has_backing_file: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageFormatError {
    #[error("not a qcow2 image (no QFI\\xfb magic at its start)")]
    NotQcow2,
    #[error("qcow2 version {0} is not supported (2 or 3)")]
    Version(u32),
    #[error("the file is too short to hold a qcow2 header")]
    Truncated,
}

/// Parse the first bytes of a file as a qcow2 header (big-endian fields:
/// magic, version, backing file offset at 8, virtual size at 24).
pub fn parse_qcow2_header(bytes: &[u8]) -> Result<Qcow2Header, ImageFormatError> {
    let be32 = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let be64 =
        |at: usize| bytes.get(at..at + 8).map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
    if bytes.len() >= 4 && &bytes[..4] != b"QFI\xfb" {
        return Err(ImageFormatError::NotQcow2);
    }
    let version = be32(4).ok_or(ImageFormatError::Truncated)?;
    if !(2..=3).contains(&version) {
        return Err(ImageFormatError::Version(version));
    }
    let backing = be64(8).ok_or(ImageFormatError::Truncated)?;
    let virtual_size = be64(24).ok_or(ImageFormatError::Truncated)?;
    Ok(Qcow2Header { version, virtual_size, has_backing_file: backing != 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, backing: u64, size: u64) -> Vec<u8> {
        let mut h = b"QFI\xfb".to_vec();
        h.extend(version.to_be_bytes());
        h.extend(backing.to_be_bytes());
        h.extend(0u32.to_be_bytes());
        h.extend(0u32.to_be_bytes());
        h.extend(size.to_be_bytes());
        h.extend([0u8; 72]);
        h
    }

    #[test]
    fn reads_qcow2_headers_and_refuses_other_files() {
        let h = parse_qcow2_header(&header(3, 0, 1 << 30)).expect("valid header");
        assert_eq!(h, Qcow2Header { version: 3, virtual_size: 1 << 30, has_backing_file: false });
        assert!(parse_qcow2_header(&header(3, 512, 1 << 20)).expect("valid").has_backing_file);
        assert_eq!(parse_qcow2_header(b"\x7fELF and so on, not an image"), Err(ImageFormatError::NotQcow2));
        assert_eq!(parse_qcow2_header(&header(1, 0, 1)), Err(ImageFormatError::Version(1)));
        assert_eq!(parse_qcow2_header(b"QFI\xfb\0\0"), Err(ImageFormatError::Truncated));
    }
}
