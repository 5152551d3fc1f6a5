//! What crosses the network, and the checks every byte of it passes before it is used.
//!
//! - [`frame`]: fixed-layout data frame headers (pages, zero-page runs, round markers).
//! - [`disk_frame`]: disk frame headers (bulk-copy chunks, mirrored writes, acks).
//! - [`message`]: length-prefixed, checksummed postcard messages for control channels.
//!
//! Rule for both: every length and address is checked against limits before anything is
//! allocated or written, and bad input becomes a [`WireError`], never a panic.

pub mod disk_frame;
pub mod frame;
pub mod message;

pub use disk_frame::{DiskFrame, ACK_OK};
pub use frame::{Frame, FrameHeader, FrameLimits, FRAME_HEADER_LEN};
pub use message::{read_message, write_message, MESSAGE_LEN_MAX};

/// Wire format version; bumped on any incompatible change.
pub const WIRE_VERSION: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {found:#010x} (expected {expected:#010x}): the peer is not speaking ferry's protocol")]
    BadMagic { expected: u32, found: u32 },
    #[error("unsupported wire version {found} (this build speaks {supported})")]
    BadVersion { found: u16, supported: u16 },
    #[error("header checksum mismatch (computed {computed:#018x}, frame says {claimed:#018x}): corrupt frame")]
    BadHeaderChecksum { computed: u64, claimed: u64 },
    #[error("payload checksum mismatch (computed {computed:#018x}, message says {claimed:#018x}): corrupt message")]
    BadPayloadChecksum { computed: u64, claimed: u64 },
    #[error("unknown frame kind {kind}")]
    UnknownKind { kind: u16 },
    #[error("frame of kind {kind} declares {len} payload bytes, expected {expected}")]
    BadLength {
        kind: &'static str,
        len: u64,
        expected: u64,
    },
    #[error("length {len} exceeds the limit of {limit} bytes")]
    TooLong { len: u64, limit: u64 },
    #[error("pages {first}..{first}+{count} fall outside guest memory of {pages} pages")]
    OutOfRange { first: u64, count: u64, pages: u64 },
    #[error("disk {disk} does not exist (the VM has {disks})")]
    NoSuchDisk { disk: u32, disks: u32 },
    #[error("disk offset {offset} or length {len} is not a multiple of the 4096-byte block")]
    DiskMisaligned { offset: u64, len: u32 },
    #[error("{len} bytes at offset {offset} fall outside disk {disk} of {size} bytes")]
    DiskOutOfRange {
        disk: u32,
        offset: u64,
        len: u32,
        size: u64,
    },
    #[error("connection closed in the middle of a {what} ({got} of {want} bytes)")]
    Truncated {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("message could not be decoded: {reason}")]
    Decode { reason: String },
    #[error("message could not be encoded: {reason}")]
    Encode { reason: String },
    #[error("i/o error while {op}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
}

impl WireError {
    /// True when the peer closed the connection cleanly at a message boundary.
    pub fn is_clean_eof(&self) -> bool {
        matches!(self, WireError::Truncated { got: 0, .. })
    }
}

/// Reads exactly `buf.len()` bytes, reporting a short read as [`WireError::Truncated`].
pub fn read_exact_or_truncated(
    r: &mut impl std::io::Read,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(WireError::Truncated {
                    what,
                    got,
                    want: buf.len(),
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(WireError::Io { op: what, source }),
        }
    }
    Ok(())
}
