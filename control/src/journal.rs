//! The ownership journal: an append-only, checksummed log of the ownership decisions an
//! agent takes, in `DATA_DIR/journal`. Recovery after a crash reads it to learn which VMs
//! this agent owns, which it handed over, and which incoming copies wait for a decision.
//!
//! ```text
//! file header (16 bytes)
//! 0                8         10         12         16
//! | magic FRYJOURN | version | reserved | reserved |
//! then records, back to back
//! 0             4                   12
//! | payload len | xxh3-64(payload)  | payload (postcard `Record`) …
//! ```
//! All integers little-endian; reserved fields are zero. A payload is 1..=[`PAYLOAD_LEN_MAX`]
//! bytes and must be exactly what this build encodes for the record it decodes to.
//!
//! Durability: [`Journal::append`] issues one write and an `fdatasync` before it returns, so
//! a decision is taken exactly when its append returns `Ok`. A crash in the middle of an
//! append leaves at most one damaged record at the end of the file (a *torn tail*), which
//! [`Journal::open`] cuts away. Damage anywhere else is corruption and is refused: the
//! journal decides who runs a VM, and a guess could run it twice.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ferry_dataplane::file_lock::lock_exclusive;
use ferry_dataplane::hash::xxh3_64;
use serde::{Deserialize, Serialize};
use tracing::warn;

/// "FRYJOURN".
pub const JOURNAL_MAGIC: [u8; 8] = *b"FRYJOURN";
/// Bumped on any incompatible change to the file header, the framing or [`Record`].
pub const JOURNAL_FORMAT_VERSION: u16 = 1;
/// Size of the file header.
pub const HEADER_LEN: usize = 16;
/// Size of a record's frame header (length and checksum).
pub const RECORD_HEADER_LEN: usize = 12;
/// Largest record payload. Real records are well under 1 KiB (VM names are at most 255
/// bytes, agent addresses are `host:port`); the bound keeps a damaged length field from
/// making anyone read or hash megabytes.
pub const PAYLOAD_LEN_MAX: usize = 64 << 10;

/// One ownership decision. Epochs count completed migrations of a VM: a VM created on an
/// agent has epoch 1, and each hand-over makes it epoch + 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// This agent hosts `vm` at `epoch` (a VM created here has epoch 1).
    Hosted { vm: String, epoch: u64 },
    /// Source: an outgoing migration of `vm` (owned here at `epoch`) started.
    OutgoingStarted {
        vm: String,
        epoch: u64,
        session: u64,
        to: String,
    },
    /// Source: migration `session` will never commit (failed back, or answered Aborted to a
    /// query).
    OutgoingAborted {
        vm: String,
        epoch: u64,
        session: u64,
    },
    /// Source: THE COMMIT POINT. `vm` belongs to the agent at `to` from `epoch` (the old
    /// epoch + 1).
    HandedOver {
        vm: String,
        epoch: u64,
        session: u64,
        to: String,
    },
    /// Source: the destination confirmed ownership; the local copy is gone.
    Released {
        vm: String,
        epoch: u64,
        session: u64,
    },
    /// Destination: an incoming migration started (files exist, nothing owned). `from` is
    /// the source agent's address for outcome queries.
    IncomingStarted {
        vm: String,
        epoch: u64,
        session: u64,
        from: String,
    },
    /// Destination: lock-step proven, device state loaded and recoverable; waiting for the
    /// decision.
    Prepared {
        vm: String,
        epoch: u64,
        session: u64,
        from: String,
    },
    /// Destination: the source committed; this agent owns `vm` at `epoch`.
    Owned {
        vm: String,
        epoch: u64,
        session: u64,
    },
    /// Destination: the incoming copy was discarded (the source kept the VM).
    Discarded {
        vm: String,
        epoch: u64,
        session: u64,
    },
    /// `vm` was destroyed on this agent.
    Destroyed { vm: String, epoch: u64 },
}

impl Record {
    /// The VM the decision is about.
    pub fn vm(&self) -> &str {
        match self {
            Record::Hosted { vm, .. }
            | Record::OutgoingStarted { vm, .. }
            | Record::OutgoingAborted { vm, .. }
            | Record::HandedOver { vm, .. }
            | Record::Released { vm, .. }
            | Record::IncomingStarted { vm, .. }
            | Record::Prepared { vm, .. }
            | Record::Owned { vm, .. }
            | Record::Discarded { vm, .. }
            | Record::Destroyed { vm, .. } => vm,
        }
    }

    /// The epoch the record names (for the migration records, see each variant).
    pub fn epoch(&self) -> u64 {
        match *self {
            Record::Hosted { epoch, .. }
            | Record::OutgoingStarted { epoch, .. }
            | Record::OutgoingAborted { epoch, .. }
            | Record::HandedOver { epoch, .. }
            | Record::Released { epoch, .. }
            | Record::IncomingStarted { epoch, .. }
            | Record::Prepared { epoch, .. }
            | Record::Owned { epoch, .. }
            | Record::Discarded { epoch, .. }
            | Record::Destroyed { epoch, .. } => epoch,
        }
    }

    /// The migration session the record belongs to; `None` for records outside one.
    pub fn session(&self) -> Option<u64> {
        match *self {
            Record::Hosted { .. } | Record::Destroyed { .. } => None,
            Record::OutgoingStarted { session, .. }
            | Record::OutgoingAborted { session, .. }
            | Record::HandedOver { session, .. }
            | Record::Released { session, .. }
            | Record::IncomingStarted { session, .. }
            | Record::Prepared { session, .. }
            | Record::Owned { session, .. }
            | Record::Discarded { session, .. } => Some(session),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("i/o error while {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the journal is corrupt at byte {offset}: {reason} (refusing to guess who owns what: inspect or restore the file)")]
    Corrupt { offset: u64, reason: String },
    #[error("not a ferry journal, or one this build cannot read: {reason}")]
    BadHeader { reason: String },
    #[error("a record of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("a record could not be encoded: {reason}")]
    Encode { reason: String },
    #[error("the journal {} is open in another process (is another agent using this data directory?)", path.display())]
    Locked { path: PathBuf },
    #[error("the journal {} is unusable: a failed append could not be rolled back, so its end is unknown (restart the agent)", path.display())]
    Poisoned { path: PathBuf },
}

/// What [`Journal::open`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// Every record, oldest first.
    pub records: Vec<Record>,
    /// Bytes of a torn last record that were cut away (0 for a clean file).
    pub torn_tail_bytes: u64,
}

/// What [`decode`] found in a journal's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Every intact record, oldest first.
    pub records: Vec<Record>,
    /// Bytes of header and intact records: where the next record goes.
    pub valid_len: usize,
    /// Bytes after `valid_len`: a torn last record (0 for a clean file).
    pub torn_tail_bytes: usize,
}

/// An open journal. Appends from several threads are serialised.
pub struct Journal {
    path: PathBuf,
    state: Mutex<FileState>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

struct FileState {
    /// Read-write, `flock`ed for the life of the handle.
    file: File,
    /// Bytes of header and records: where the next append writes.
    len: u64,
    /// A failed append could not be undone: the file's end is unknown.
    poisoned: bool,
}

impl Journal {
    /// Opens or creates `path` (creating: header written, file and parent dir fsynced).
    /// Returns the records. A torn tail (an incomplete or bad LAST record, as a crash during
    /// append leaves) is truncated away with a warning and reported in
    /// [`Opened::torn_tail_bytes`]; a bad record followed by an intact one is corruption: an
    /// error (never guess ownership). The file stays locked (`flock`) while the journal is
    /// open, so two agents cannot share a data directory.
    pub fn open(path: &Path) -> Result<(Journal, Opened), JournalError> {
        let io_err = |op, source| JournalError::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let mut file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => create(path)?,
            Err(e) => return Err(io_err("opening the journal", e)),
        };
        lock(&file, path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| io_err("reading the journal", e))?;
        let decoded = decode(&bytes)?;
        if decoded.torn_tail_bytes > 0 {
            warn!(
                path = %path.display(),
                torn_tail_bytes = decoded.torn_tail_bytes,
                valid_bytes = decoded.valid_len,
                "the journal ends in a torn record (a crash during an append); cutting it away"
            );
            file.set_len(decoded.valid_len as u64)
                .map_err(|e| io_err("truncating the torn tail of", e))?;
            file.sync_data()
                .map_err(|e| io_err("syncing the truncated", e))?;
        }
        let journal = Journal {
            path: path.to_path_buf(),
            state: Mutex::new(FileState {
                file,
                len: decoded.valid_len as u64,
                poisoned: false,
            }),
        };
        let opened = Opened {
            records: decoded.records,
            torn_tail_bytes: decoded.torn_tail_bytes as u64,
        };
        Ok((journal, opened))
    }

    /// Appends one record: one write, then `fdatasync`, before returning. A failed append
    /// leaves the file as it was (it is truncated back to its previous length) and returns
    /// an error: the caller must treat the decision as not taken. If even that rollback
    /// fails, the journal refuses every later append ([`JournalError::Poisoned`]).
    pub fn append(&self, record: &Record) -> Result<(), JournalError> {
        let frame = encode_record(record)?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        if let Some(source) = fail_injected() {
            // Nothing was written: the file is as it was.
            return Err(self.io_err("appending a record to", source));
        }
        let at = state.len;
        let written = state
            .file
            .write_all_at(&frame, at)
            .map_err(|e| self.io_err("appending a record to", e))
            .and_then(|()| {
                state
                    .file
                    .sync_data()
                    .map_err(|e| self.io_err("syncing a record appended to", e))
            });
        match written {
            Ok(()) => {
                state.len = at + frame.len() as u64;
                Ok(())
            }
            Err(err) => {
                // Part of the record (or all of it, unsynced) may be in the file: cut it
                // off and make the cut durable, or the record might count after a restart.
                let rolled_back = state.file.set_len(at).and_then(|()| state.file.sync_data());
                if let Err(rollback) = rolled_back {
                    warn!(
                        path = %self.path.display(),
                        error = %rollback,
                        "could not roll back a failed journal append; refusing further appends"
                    );
                    state.poisoned = true;
                }
                Err(err)
            }
        }
    }

    /// Rewrites the journal to exactly `records` (a temporary file beside it, fsync,
    /// rename, fsync of the directory), so that a crash leaves either the old or the new
    /// journal, never a mix. Used to compact it at start-up. On success the journal's end is
    /// known again, so a journal poisoned by a failed rollback accepts appends again.
    pub fn rewrite(&self, records: &[Record]) -> Result<(), JournalError> {
        let mut bytes = encode_header().to_vec();
        for record in records {
            bytes.extend_from_slice(&encode_record(record)?);
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let file = replace_atomically(&self.path, &bytes)?;
        // The new file is locked (before the rename) and replaces the old handle, whose
        // inode is now unlinked.
        *state = FileState {
            file,
            len: bytes.len() as u64,
            poisoned: false,
        };
        Ok(())
    }

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_err(&self, op: &'static str, source: io::Error) -> JournalError {
        JournalError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }
}

/// Failure injection point for appends (a full disk, an I/O error): `Some` makes the append
/// fail before anything is written. No failpoint is wired in yet.
fn fail_injected() -> Option<io::Error> {
    None
}

/// Creates a journal holding only the header, atomically (temporary file and rename), so
/// that `path` never exists without a complete header.
fn create(path: &Path) -> Result<File, JournalError> {
    replace_atomically(path, &encode_header())
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it over `path` and
/// syncs the directory. Returns the new file, open read-write and locked (before the
/// rename, so no other process can lock it first).
fn replace_atomically(path: &Path, bytes: &[u8]) -> Result<File, JournalError> {
    let tmp = temp_path(path);
    let io_err = |op, p: &Path, source| JournalError::Io {
        op,
        path: p.to_path_buf(),
        source,
    };
    let write = || -> Result<File, JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_err("creating", &tmp, e))?;
        lock(&file, &tmp)?;
        file.write_all_at(bytes, 0)
            .map_err(|e| io_err("writing", &tmp, e))?;
        file.sync_all().map_err(|e| io_err("syncing", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err("renaming the new journal to", path, e))?;
        Ok(file)
    };
    let file = write().inspect_err(|_| {
        // The old journal (if any) is untouched; do not leave a half-written file behind.
        let _ = std::fs::remove_file(&tmp);
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing the directory", dir, e))?;
    Ok(file)
}

/// `journal` → `journal.new`, in the same directory (so the rename is atomic).
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    path.with_file_name(name)
}

/// Takes the journal's exclusive `flock` (waiting a moment for a forked child to drop it).
fn lock(file: &File, path: &Path) -> Result<(), JournalError> {
    lock_exclusive(file).map_err(|err| match err.kind() {
        io::ErrorKind::WouldBlock => JournalError::Locked {
            path: path.to_path_buf(),
        },
        _ => JournalError::Io {
            op: "locking",
            path: path.to_path_buf(),
            source: err,
        },
    })
}

/// The file header of a journal of this format.
pub fn encode_header() -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&JOURNAL_MAGIC);
    header[8..10].copy_from_slice(&JOURNAL_FORMAT_VERSION.to_le_bytes());
    header
}

/// One record as it goes into the file: frame header and payload.
pub fn encode_record(record: &Record) -> Result<Vec<u8>, JournalError> {
    let payload = postcard::to_stdvec(record).map_err(|e| JournalError::Encode {
        reason: e.to_string(),
    })?;
    if payload.len() > PAYLOAD_LEN_MAX {
        return Err(JournalError::TooLarge {
            len: payload.len(),
            limit: PAYLOAD_LEN_MAX,
        });
    }
    let mut frame = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&xxh3_64(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Decodes a whole journal file. Pure (used by [`Journal::open`] and the fuzzer): never
/// panics, and allocates only for records it decoded from the input.
///
/// The first damaged frame ends the journal if no intact frame (sane length, matching
/// checksum) starts anywhere after it: that is a torn tail, reported in
/// [`Decoded::torn_tail_bytes`]. Otherwise the damage is in the middle and the result is
/// [`JournalError::Corrupt`]. So is an intact frame whose payload is not a record exactly
/// as this build encodes it: an append that completed is never thrown away.
pub fn decode(bytes: &[u8]) -> Result<Decoded, JournalError> {
    check_header(bytes)?;
    let mut records = Vec::new();
    let mut offset = HEADER_LEN;
    while offset < bytes.len() {
        let (payload, next) = match frame_at(bytes, offset) {
            Ok(frame) => frame,
            Err(damage) => {
                // Scanning every later offset is quadratic only in the worst case of a
                // damaged file; a torn tail is at most one record long.
                if let Some(intact) =
                    (offset + 1..bytes.len()).find(|&at| frame_at(bytes, at).is_ok())
                {
                    return Err(JournalError::Corrupt {
                        offset: offset as u64,
                        reason: format!("{damage}, yet an intact record follows at byte {intact}"),
                    });
                }
                return Ok(Decoded {
                    records,
                    valid_len: offset,
                    torn_tail_bytes: bytes.len() - offset,
                });
            }
        };
        let record = decode_payload(payload).map_err(|reason| JournalError::Corrupt {
            offset: offset as u64,
            reason,
        })?;
        records.push(record);
        offset = next;
    }
    Ok(Decoded {
        records,
        valid_len: offset,
        torn_tail_bytes: 0,
    })
}

fn check_header(bytes: &[u8]) -> Result<(), JournalError> {
    let bad = |reason: String| Err(JournalError::BadHeader { reason });
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return bad(format!(
            "{} bytes is shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        ));
    };
    if header[..8] != JOURNAL_MAGIC {
        return bad(format!(
            "bad magic {:02x?}, expected {:?}",
            &header[..8],
            String::from_utf8_lossy(&JOURNAL_MAGIC)
        ));
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != JOURNAL_FORMAT_VERSION {
        return bad(format!(
            "format version {version} is not supported (this build reads version {JOURNAL_FORMAT_VERSION})"
        ));
    }
    if header[10..].iter().any(|&b| b != 0) {
        return bad("reserved header bytes are not zero".to_string());
    }
    Ok(())
}

/// The payload of the frame at `offset` and where the next frame starts, if the frame is
/// complete, its length sane and its checksum right.
fn frame_at(bytes: &[u8], offset: usize) -> Result<(&[u8], usize), &'static str> {
    let rest = &bytes[offset.min(bytes.len())..];
    let Some(head) = rest.get(..RECORD_HEADER_LEN) else {
        return Err("the record header is incomplete");
    };
    let mut len = [0u8; 4];
    len.copy_from_slice(&head[..4]);
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > PAYLOAD_LEN_MAX {
        return Err("the record length is out of range");
    }
    let Some(payload) = rest.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + len) else {
        return Err("the record is incomplete");
    };
    let mut claimed = [0u8; 8];
    claimed.copy_from_slice(&head[4..]);
    if xxh3_64(payload) != u64::from_le_bytes(claimed) {
        return Err("the record checksum does not match");
    }
    Ok((payload, offset + RECORD_HEADER_LEN + len))
}

/// Decodes an intact payload, which must be exactly one record in this build's encoding
/// (postcard accepts over-long varints; a journal that does not re-encode to itself was not
/// written by us).
fn decode_payload(payload: &[u8]) -> Result<Record, String> {
    let (record, rest): (Record, _) = postcard::take_from_bytes(payload).map_err(|e| {
        format!("an intact record does not decode ({e}): written by a newer ferry?")
    })?;
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes follow the record in its payload",
            rest.len()
        ));
    }
    match postcard::to_stdvec(&record) {
        Ok(canonical) if canonical == payload => Ok(record),
        _ => Err("an intact record is not encoded canonically".to_string()),
    }
}

/// The latest record per VM name, in name order (what recovery looks at).
pub fn latest_by_vm(records: &[Record]) -> BTreeMap<String, Record> {
    let mut latest = BTreeMap::new();
    for record in records {
        latest.insert(record.vm().to_string(), record.clone());
    }
    latest
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One record of every kind, with names and addresses of realistic sizes.
    fn every_kind() -> Vec<Record> {
        let vm = |s: &str| s.to_string();
        vec![
            Record::Hosted {
                vm: vm("vm-a"),
                epoch: 1,
            },
            Record::OutgoingStarted {
                vm: vm("vm-a"),
                epoch: 1,
                session: 0xdead_beef_0123_4567,
                to: "10.0.0.2:7000".into(),
            },
            Record::OutgoingAborted {
                vm: vm("vm-a"),
                epoch: 1,
                session: 0xdead_beef_0123_4567,
            },
            Record::HandedOver {
                vm: vm("vm-a"),
                epoch: 2,
                session: u64::MAX,
                to: "[fe80::1]:7000".into(),
            },
            Record::Released {
                vm: vm("vm-a"),
                epoch: 2,
                session: u64::MAX,
            },
            Record::IncomingStarted {
                vm: "x".repeat(255),
                epoch: 7,
                session: 1,
                from: "host-b:7000".into(),
            },
            Record::Prepared {
                vm: "x".repeat(255),
                epoch: 7,
                session: 1,
                from: "host-b:7000".into(),
            },
            Record::Owned {
                vm: "x".repeat(255),
                epoch: 7,
                session: 1,
            },
            Record::Discarded {
                vm: vm("vm-b"),
                epoch: 3,
                session: 9,
            },
            Record::Destroyed {
                vm: vm("vm-b"),
                epoch: u64::MAX,
            },
        ]
    }

    fn file_of(records: &[Record]) -> Vec<u8> {
        let mut bytes = encode_header().to_vec();
        for r in records {
            bytes.extend_from_slice(&encode_record(r).unwrap());
        }
        bytes
    }

    /// A record frame with a hand-made payload (checksum right).
    fn frame_of_payload(payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&xxh3_64(payload).to_le_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn journal_in(dir: &Path) -> PathBuf {
        dir.join("journal")
    }

    #[test]
    fn every_variant_round_trips_and_names_its_fields() {
        let records = every_kind();
        let bytes = file_of(&records);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.records, records);
        assert_eq!(decoded.valid_len, bytes.len());
        assert_eq!(decoded.torn_tail_bytes, 0);
        // Accessors.
        assert_eq!(records[3].vm(), "vm-a");
        assert_eq!(records[3].epoch(), 2);
        assert_eq!(records[3].session(), Some(u64::MAX));
        assert_eq!(records[0].session(), None);
        assert_eq!(records[9].session(), None);
        assert_eq!(records[9].epoch(), u64::MAX);
        assert_eq!(records[5].vm().len(), 255);
        // Header layout.
        assert_eq!(&bytes[..8], b"FRYJOURN");
        assert_eq!(&bytes[8..10], &1u16.to_le_bytes());
        assert_eq!(&bytes[10..16], &[0; 6]);
        // Frame layout of the first record.
        let first = encode_record(&records[0]).unwrap();
        let len = u32::from_le_bytes(first[..4].try_into().unwrap()) as usize;
        assert_eq!(first.len(), RECORD_HEADER_LEN + len);
        assert_eq!(
            u64::from_le_bytes(first[4..12].try_into().unwrap()),
            xxh3_64(&first[12..])
        );
    }

    #[test]
    fn an_empty_journal_is_just_the_header() {
        let decoded = decode(&encode_header()).unwrap();
        assert!(decoded.records.is_empty());
        assert_eq!(decoded.valid_len, HEADER_LEN);
    }

    #[test]
    fn append_then_reopen_sees_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_in(dir.path());
        let (journal, opened) = Journal::open(&path).unwrap();
        assert!(opened.records.is_empty());
        assert_eq!(opened.torn_tail_bytes, 0);
        assert_eq!(journal.path(), path);
        assert_eq!(std::fs::read(&path).unwrap(), encode_header());
        assert!(!temp_path(&path).exists());
        for r in every_kind() {
            journal.append(&r).unwrap();
        }
        drop(journal);
        assert_eq!(std::fs::read(&path).unwrap(), file_of(&every_kind()));
        let (journal, opened) = Journal::open(&path).unwrap();
        assert_eq!(opened.records, every_kind());
        // Appends after a reopen go after the old records.
        let extra = Record::Hosted {
            vm: "vm-c".into(),
            epoch: 1,
        };
        journal.append(&extra).unwrap();
        drop(journal);
        let (_journal, opened) = Journal::open(&path).unwrap();
        let mut want = every_kind();
        want.push(extra);
        assert_eq!(opened.records, want);
    }

    #[test]
    fn appends_from_many_threads_all_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_in(dir.path());
        let (journal, _) = Journal::open(&path).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let journal = &journal;
                s.spawn(move || {
                    for epoch in 1..=25 {
                        journal
                            .append(&Record::Hosted {
                                vm: format!("vm-{t}"),
                                epoch,
                            })
                            .unwrap();
                    }
                });
            }
        });
        drop(journal);
        let (_journal, opened) = Journal::open(&path).unwrap();
        assert_eq!(opened.records.len(), 100);
        for t in 0..4 {
            let epochs: Vec<u64> = opened
                .records
                .iter()
                .filter(|r| r.vm() == format!("vm-{t}"))
                .map(Record::epoch)
                .collect();
            assert_eq!(epochs, (1..=25).collect::<Vec<_>>(), "thread {t}");
        }
    }

    #[test]
    fn a_second_open_of_the_same_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_in(dir.path());
        let (journal, _) = Journal::open(&path).unwrap();
        assert!(matches!(
            Journal::open(&path),
            Err(JournalError::Locked { path: p }) if p == path
        ));
        drop(journal);
        Journal::open(&path).unwrap();
    }

    #[test]
    fn a_torn_last_record_is_cut_at_every_length_and_earlier_records_kept() {
        let records = every_kind();
        let whole = file_of(&records);
        let last_start = file_of(&records[..records.len() - 1]).len();
        let dir = tempfile::tempdir().unwrap();
        let path = journal_in(dir.path());
        for cut in last_start + 1..whole.len() {
            let torn = &whole[..cut];
            let decoded = decode(torn).unwrap();
            assert_eq!(decoded.records, records[..records.len() - 1], "cut {cut}");
            assert_eq!(decoded.valid_len, last_start);
            assert_eq!(decoded.torn_tail_bytes, cut - last_start);
            // The same through open: the file is truncated, and appends continue from there.
            std::fs::write(&path, torn).unwrap();
            let (journal, opened) = Journal::open(&path).unwrap();
            assert_eq!(opened.records, decoded.records);
            assert_eq!(opened.torn_tail_bytes, (cut - last_start) as u64);
            assert_eq!(std::fs::read(&path).unwrap(), whole[..last_start]);
            journal.append(records.last().unwrap()).unwrap();
            drop(journal);
            assert_eq!(std::fs::read(&path).unwrap(), whole, "cut {cut}");
        }
    }

    #[test]
    fn a_flipped_byte_in_the_last_record_is_a_torn_tail() {
        let records = every_kind();
        let whole = file_of(&records);
        let last_start = file_of(&records[..records.len() - 1]).len();
        for at in last_start..whole.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = whole.clone();
                bad[at] ^= flip;
                let decoded = decode(&bad).unwrap_or_else(|e| panic!("byte {at}: {e}"));
                assert_eq!(decoded.records, records[..records.len() - 1], "byte {at}");
                assert_eq!(decoded.valid_len, last_start);
                assert_eq!(decoded.torn_tail_bytes, whole.len() - last_start);
            }
        }
    }

    #[test]
    fn a_flipped_byte_in_a_middle_record_is_corruption() {
        let records = every_kind();
        let whole = file_of(&records);
        let start = file_of(&records[..4]).len();
        let end = file_of(&records[..5]).len();
        for at in start..end {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = whole.clone();
                bad[at] ^= flip;
                match decode(&bad) {
                    Err(JournalError::Corrupt { offset, reason }) => {
                        assert_eq!(offset, start as u64, "byte {at}: {reason}");
                        assert!(reason.contains("intact record follows"), "{reason}");
                    }
                    other => panic!("byte {at} flip {flip:#x}: {other:?}"),
                }
            }
        }
        // Open refuses it too, and leaves the file alone.
        let dir = tempfile::tempdir().unwrap();
        let path = journal_in(dir.path());
        let mut bad = whole.clone();
        bad[start + RECORD_HEADER_LEN] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            Journal::open(&path),
            Err(JournalError::Corrupt { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), bad);
    }

    #[test]
    fn an_intact_record_that_does_not_decode_is_never_cut_away() {
        // As the last record, where a damaged one would be a torn tail.
        let good = file_of(&every_kind()[..2]);
        for payload in [
            &[99u8, 0][..],            // a variant this build does not know
            &[0x80, 0x00, 1, b'a', 1], // over-long varint for variant 0 (Hosted)
            &[0, 1, b'a', 1, 0],       // a trailing byte after a Hosted record
            &[0, 1, 0xff, 1],          // a VM name that is not UTF-8
        ] {
            let mut bytes = good.clone();
            bytes.extend_from_slice(&frame_of_payload(payload));
            match decode(&bytes) {
                Err(JournalError::Corrupt { offset, .. }) => {
                    assert_eq!(offset, good.len() as u64, "{payload:?}")
                }
                other => panic!("{payload:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        let records = file_of(&every_kind()[..1]);
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), records[..HEADER_LEN - 1].to_vec()];
        for at in [0, 7, 8, 9, 10, 15] {
            let mut bad = records.clone();
            bad[at] ^= 0x10;
            cases.push(bad);
        }
        for bad in cases {
            assert!(
                matches!(decode(&bad), Err(JournalError::BadHeader { .. })),
                "{bad:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = journal_in(dir.path());
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(
            Journal::open(&path),
            Err(JournalError::BadHeader { .. })
        ));
        // Not replaced by a fresh journal: that would forget every decision.
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn oversized_records_are_refused_when_encoded_and_decoded() {
        let huge = Record::HandedOver {
            vm: "vm".into(),
            epoch: 2,
            session: 1,
            to: "x".repeat(PAYLOAD_LEN_MAX),
        };
        assert!(matches!(
            encode_record(&huge),
            Err(JournalError::TooLarge {
                limit: PAYLOAD_LEN_MAX,
                ..
            })
        ));
        // A frame that claims more than the limit is damage, here a torn tail.
        let mut bytes = encode_header().to_vec();
        bytes.extend_from_slice(&((PAYLOAD_LEN_MAX + 1) as u32).to_le_bytes());
        bytes.extend_from_slice(&[0; 8]);
        let decoded = decode(&bytes).unwrap();
        assert!(decoded.records.is_empty());
        assert_eq!(decoded.torn_tail_bytes, RECORD_HEADER_LEN);
    }

    #[test]
    fn rewrite_replaces_the_contents_and_later_appends_follow_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_in(dir.path());
        let (journal, _) = Journal::open(&path).unwrap();
        for r in every_kind() {
            journal.append(&r).unwrap();
        }
        let compacted: Vec<Record> = latest_by_vm(&every_kind()).into_values().collect();
        journal.rewrite(&compacted).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), file_of(&compacted));
        assert!(!temp_path(&path).exists());
        let extra = Record::Hosted {
            vm: "vm-d".into(),
            epoch: 1,
        };
        journal.append(&extra).unwrap();
        // The rewritten file is the locked one now.
        assert!(matches!(
            Journal::open(&path),
            Err(JournalError::Locked { .. })
        ));
        drop(journal);
        let (journal, opened) = Journal::open(&path).unwrap();
        let mut want = compacted.clone();
        want.push(extra);
        assert_eq!(opened.records, want);

        // A rewrite that cannot create its temporary file leaves the journal as it was.
        std::fs::create_dir(temp_path(&path)).unwrap();
        assert!(matches!(journal.rewrite(&[]), Err(JournalError::Io { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), file_of(&want));
        std::fs::remove_dir(temp_path(&path)).unwrap();
        journal.append(&every_kind()[0]).unwrap();
        drop(journal);
        want.push(every_kind()[0].clone());
        assert_eq!(Journal::open(&path).unwrap().1.records, want);
    }

    #[test]
    fn latest_by_vm_keeps_the_last_record_per_name_in_name_order() {
        let latest = latest_by_vm(&every_kind());
        let names: Vec<&str> = latest.keys().map(String::as_str).collect();
        let long = "x".repeat(255);
        assert_eq!(names, ["vm-a", "vm-b", long.as_str()]);
        assert_eq!(latest["vm-a"], every_kind()[4]);
        assert_eq!(latest["vm-b"], every_kind()[9]);
        assert_eq!(latest[&long], every_kind()[7]);
        assert!(latest_by_vm(&[]).is_empty());
    }

    /// A tmpfs of a few pages, for running out of space for real (needs root; the test says
    /// so and passes without it).
    struct SmallFs {
        dir: tempfile::TempDir,
    }

    impl SmallFs {
        fn mount(kib: u64) -> Option<SmallFs> {
            let dir = tempfile::tempdir().ok()?;
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "ferry-test"])
                .arg(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .ok()?;
            status.success().then_some(SmallFs { dir })
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }

    #[test]
    fn an_append_that_runs_out_of_space_leaves_the_previous_records() {
        let Some(fs) = SmallFs::mount(64) else {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs (not root?); the disk-full append is untested"
            );
            return;
        };
        let path = journal_in(fs.dir.path());
        let (journal, _) = Journal::open(&path).unwrap();
        let before = every_kind();
        for r in &before {
            journal.append(r).unwrap();
        }
        // Fill the file system to the last byte.
        let filler = fs.dir.path().join("filler");
        let mut file = File::create(&filler).unwrap();
        let page = [0xa5u8; 4096];
        loop {
            match io::Write::write(&mut file, &page) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // The journal's last page has room for part of this record, not all of it: the
        // write lands partly before ENOSPC.
        let big = Record::HandedOver {
            vm: "vm-a".into(),
            epoch: 2,
            session: 5,
            to: "y".repeat(8000),
        };
        match journal.append(&big) {
            Err(JournalError::Io { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}")
            }
            other => panic!("append on a full file system: {other:?}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), file_of(&before));
        // With room again the journal goes on where it was.
        drop(file);
        std::fs::remove_file(&filler).unwrap();
        journal.append(&big).unwrap();
        drop(journal);
        let (_journal, opened) = Journal::open(&path).unwrap();
        let mut want = before;
        want.push(big);
        assert_eq!(opened.records, want);
        assert_eq!(opened.torn_tail_bytes, 0);
    }
}
