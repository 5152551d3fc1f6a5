//! The registers file of a persistent VM: the step counter of every lane and a state word,
//! in a shared mapping that the vCPU workers update in place ([`super::persist`] explains
//! why counters are enough to recover the VM).
//!
//! All integers little-endian; one page for up to 63 lanes, three for 128.
//!
//! ```text
//! 0   magic "FRYREGS\0"          8   format version u16   10  reserved u16 (0)
//! 12  memory lanes u32           16  disk lanes u32       20  lane stride u32 (64)
//! 24  xxh3-64 of the spec file   32  NIC: MAC [6], IPv4 [4], 6 zero bytes
//! 48  xxh3-64 of bytes 0..48     56  state u32 (atomic)   60  reserved u32
//! 64  lane 0 (memory lanes, then disk lanes), one 64-byte slot each: a u64 counter
//!     (atomic) = steps in bits 0..48, and a 16-bit check of (lane, steps) in bits 48..64
//! ```
//!
//! Each counter has a cache line to itself, so workers do not contend. The check bits make
//! a counter that is not one this code wrote (a flipped bit, a slot of another lane) a
//! clear error instead of a wrong replay. The state word says what the counters mean:
//!
//! - `INVALID`: not a recoverable VM (boot content being written; an incoming VM that has
//!   not loaded its state; a `load_state` half done);
//! - `PARKED`: every lane is at a step boundary: the counters are exact;
//! - `RUNNING`: a step may be in flight on every lane that is not idle.
//!
//! The VM holds an exclusive `flock` on the registers file while it lives (the kernel drops
//! it when the process dies), so a second process cannot recover a VM that is still alive.

use std::fs::{File, OpenOptions};

use crate::file_lock::lock_exclusive;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::persist::{io_error, partial_path, publish_file, PersistError, REGISTERS_FILE};
use super::program::{splitmix64, STEPS_MAX};
use super::{NicState, VmSpec};
use crate::guest::GuestError;
use crate::hash::xxh3_64;
use crate::memory::{MemoryError, PAGE_SIZE};

/// "FRYREGS\0".
pub const REGISTERS_MAGIC: [u8; 8] = *b"FRYREGS\0";
/// Bumped on any change to the registers file's layout.
pub const REGISTERS_FORMAT_VERSION: u16 = 1;

/// Size of [`RegistersHeader`], the checksummed part of the header.
const HEADER_LEN: usize = 56;
/// Bytes of the header covered by its checksum.
const HEADER_CHECKED_LEN: usize = 48;
/// Offset of the state word.
pub(super) const STATE_OFFSET: usize = 56;
/// Offset of lane 0's slot.
pub(super) const LANES_OFFSET: usize = 64;
/// Bytes per lane slot: a cache line, so lanes do not contend.
pub(super) const LANE_STRIDE: usize = 64;

/// Bits of a counter that hold the step count; the check bits sit above them.
const STEP_BITS: u32 = 48;
const STEP_MASK: u64 = (1 << STEP_BITS) - 1;
const _: () = assert!(STEPS_MAX <= STEP_MASK);
/// Domain tag of the counter check ("ctrs").
const TAG_COUNTER: u64 = 0x6374_7273;

/// What the step counters of a registers file mean (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RegistersState {
    Invalid,
    Parked,
    Running,
}

impl RegistersState {
    /// The state word: four ASCII letters, so that a zeroed or stray word is none of them.
    const fn word(self) -> u32 {
        u32::from_le_bytes(match self {
            RegistersState::Invalid => *b"INVA",
            RegistersState::Parked => *b"PARK",
            RegistersState::Running => *b"RUNS",
        })
    }

    fn from_word(word: u32) -> Option<Self> {
        [
            RegistersState::Invalid,
            RegistersState::Parked,
            RegistersState::Running,
        ]
        .into_iter()
        .find(|state| state.word() == word)
    }
}

/// The checksummed part of the registers file's header.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug)]
#[repr(C)]
pub(super) struct RegistersHeader {
    magic: [u8; 8],
    version: U16,
    reserved: U16,
    memory_lanes: U32,
    disk_lanes: U32,
    lane_stride: U32,
    spec_xxh3: U64,
    mac: [u8; 6],
    ipv4: [u8; 4],
    padding: [u8; 6],
    header_xxh3: U64,
}

const _: () = assert!(std::mem::size_of::<RegistersHeader>() == HEADER_LEN);
const _: () = assert!(HEADER_LEN <= STATE_OFFSET && STATE_OFFSET + 8 <= LANES_OFFSET);

impl RegistersHeader {
    fn new(lanes: LaneCounts, spec_xxh3: u64, nic: &NicState) -> Self {
        let mut header = Self {
            magic: REGISTERS_MAGIC,
            version: U16::new(REGISTERS_FORMAT_VERSION),
            reserved: U16::ZERO,
            memory_lanes: U32::new(lanes.memory),
            disk_lanes: U32::new(lanes.disk),
            lane_stride: U32::new(LANE_STRIDE as u32),
            spec_xxh3: U64::new(spec_xxh3),
            mac: nic.mac,
            ipv4: nic.ipv4,
            padding: [0; 6],
            header_xxh3: U64::ZERO,
        };
        header.seal();
        header
    }

    fn checksum(&self) -> u64 {
        xxh3_64(&self.as_bytes()[..HEADER_CHECKED_LEN])
    }

    fn seal(&mut self) {
        self.header_xxh3 = U64::new(self.checksum());
    }

    /// Checks a header read back against the VM it should describe.
    fn check(&self, lanes: LaneCounts, spec_xxh3: u64) -> Result<(), String> {
        if self.magic != REGISTERS_MAGIC {
            return Err(format!(
                "bad magic {:02x?}, expected {:?}",
                self.magic,
                String::from_utf8_lossy(&REGISTERS_MAGIC)
            ));
        }
        if self.version.get() != REGISTERS_FORMAT_VERSION {
            return Err(format!(
                "format version {} is not supported (this build reads version {REGISTERS_FORMAT_VERSION})",
                self.version.get()
            ));
        }
        let checksum = self.checksum();
        if checksum != self.header_xxh3.get() {
            return Err(format!(
                "header checksum {checksum:#018x} does not match the stored {:#018x}",
                self.header_xxh3.get()
            ));
        }
        let found = (
            self.memory_lanes.get(),
            self.disk_lanes.get(),
            self.lane_stride.get(),
        );
        if found != (lanes.memory, lanes.disk, LANE_STRIDE as u32) {
            return Err(format!(
                "{} memory and {} disk lanes of {} bytes, but the spec has {} memory and {} disk lanes of {LANE_STRIDE} bytes",
                found.0, found.1, found.2, lanes.memory, lanes.disk
            ));
        }
        if self.spec_xxh3.get() != spec_xxh3 {
            return Err(format!(
                "written for a spec file with checksum {:#018x}, but the spec file has {spec_xxh3:#018x}",
                self.spec_xxh3.get()
            ));
        }
        Ok(())
    }

    pub(super) fn nic(&self) -> NicState {
        NicState {
            mac: self.mac,
            ipv4: self.ipv4,
        }
    }
}

/// Lanes of a VM: one memory lane per vCPU, and one disk lane per vCPU with a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LaneCounts {
    memory: u32,
    disk: u32,
}

impl LaneCounts {
    fn of(spec: &VmSpec) -> Self {
        Self {
            memory: spec.vcpus,
            disk: if spec.disk.is_some() { spec.vcpus } else { 0 },
        }
    }

    fn total(self) -> usize {
        self.memory as usize + self.disk as usize
    }

    /// Length of the registers file (and mapping): whole pages.
    fn file_len(self) -> usize {
        (LANES_OFFSET + self.total() * LANE_STRIDE).next_multiple_of(PAGE_SIZE)
    }
}

/// The 16 check bits of `steps` in slot `lane`.
#[inline]
fn check_bits(lane: usize, steps: u64) -> u64 {
    splitmix64(steps ^ ((lane as u64) << STEP_BITS) ^ TAG_COUNTER) >> STEP_BITS
}

/// The counter word for `steps` in slot `lane`.
#[inline]
fn counter_word(lane: usize, steps: u64) -> u64 {
    debug_assert!(steps <= STEP_MASK);
    steps | (check_bits(lane, steps) << STEP_BITS)
}

/// The step count of a counter word read from slot `lane`, if its check bits match.
fn checked_steps(lane: usize, word: u64) -> Option<u64> {
    let steps = word & STEP_MASK;
    (word >> STEP_BITS == check_bits(lane, steps)).then_some(steps)
}

/// The registers file, locked for as long as a VM uses it.
struct LockedFile {
    file: File,
    path: PathBuf,
}

/// The step counters of every lane and the state word, in a mapping: of the registers file
/// (shared) for a persistent VM, anonymous for a memfd VM (where they serve status
/// only, at the same per-step cost).
pub(super) struct Registers {
    base: NonNull<u8>,
    len: usize,
    lanes: LaneCounts,
    /// None for an anonymous mapping.
    file: Option<LockedFile>,
}

// SAFETY: Registers owns a mapping that lives until drop; the pointer is not tied to
// a thread, and the counters and state word in it are only accessed atomically.
unsafe impl Send for Registers {}
// SAFETY: as for Send: concurrent access is through atomics only (the header bytes, written
// with pwrite, are written only while no worker runs and never read through the mapping).
unsafe impl Sync for Registers {}

impl std::fmt::Debug for Registers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registers")
            .field("lanes", &self.lanes)
            .field("path", &self.file.as_ref().map(|f| &f.path))
            .field("state", &self.state())
            .finish()
    }
}

/// Maps `len` bytes of `file` shared, or anonymous memory without a file.
fn map(file: Option<&File>, len: usize) -> io::Result<NonNull<u8>> {
    let (flags, fd) = match file {
        Some(file) => (libc::MAP_SHARED, file.as_raw_fd()),
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a fresh mapping (addr NULL) of `len` bytes; a file given is open read-write
    // and at least `len` long (the callers size or check it first); the result is checked
    // against MAP_FAILED.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))
}

impl Registers {
    /// Registers in anonymous memory, for a VM that is not persistent.
    pub(super) fn anonymous(spec: &VmSpec) -> Result<Self, GuestError> {
        let lanes = LaneCounts::of(spec);
        let len = lanes.file_len();
        let base = map(None, len).map_err(|source| {
            GuestError::Memory(MemoryError::Map {
                bytes: len as u64,
                source,
            })
        })?;
        let registers = Self {
            base,
            len,
            lanes,
            file: None,
        };
        registers.start_counters();
        Ok(registers)
    }

    /// Creates the registers file of a new VM in `dir` (O_EXCL, 0600), locked, state
    /// `INVALID`, every counter 0. It is written whole under a partial name and then
    /// renamed, so a `registers` file always has its header.
    pub(super) fn create(dir: &Path, spec: &VmSpec, spec_xxh3: u64) -> Result<Self, PersistError> {
        let lanes = LaneCounts::of(spec);
        let len = lanes.file_len();
        let partial = partial_path(dir, REGISTERS_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(io_error("creating", &partial))?;
        lock_exclusive(&file).map_err(io_error("locking", &partial))?;
        file.set_len(len as u64)
            .map_err(io_error("sizing", &partial))?;
        let header = RegistersHeader::new(lanes, spec_xxh3, &NicState::from_seed(spec.seed));
        file.write_all_at(header.as_bytes(), 0)
            .map_err(io_error("writing", &partial))?;
        let base = map(Some(&file), len).map_err(io_error("mapping", &partial))?;
        let path = dir.join(REGISTERS_FILE);
        let registers = Self {
            base,
            len,
            lanes,
            file: Some(LockedFile {
                file,
                path: path.clone(),
            }),
        };
        registers.start_counters();
        publish_file(&partial, &path)?;
        Ok(registers)
    }

    /// Opens and locks the registers file of the VM in `dir`, and checks its length and
    /// header against `spec` and the checksum of its spec file. The state word and the
    /// counters are checked by [`Registers::recoverable`].
    pub(super) fn open(dir: &Path, spec: &VmSpec, spec_xxh3: u64) -> Result<Self, PersistError> {
        let path = dir.join(REGISTERS_FILE);
        let corrupt = |reason: String| PersistError::Corrupt {
            path: path.clone(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_error("opening", &path))?;
        match lock_exclusive(&file) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                return Err(PersistError::InUse {
                    dir: dir.to_path_buf(),
                })
            }
            Err(e) => return Err(io_error("locking", &path)(e)),
        }
        let lanes = LaneCounts::of(spec);
        let len = lanes.file_len();
        let found = file
            .metadata()
            .map_err(io_error("inspecting", &path))?
            .len();
        if found != len as u64 {
            return Err(corrupt(format!(
                "it is {found} bytes, but {} memory and {} disk lanes take {len}",
                lanes.memory, lanes.disk
            )));
        }
        let mut bytes = [0u8; HEADER_LEN];
        file.read_exact_at(&mut bytes, 0)
            .map_err(io_error("reading", &path))?;
        let header = RegistersHeader::read_from_bytes(&bytes)
            .map_err(|_| corrupt("the header does not parse".into()))?;
        header.check(lanes, spec_xxh3).map_err(corrupt)?;
        let base = map(Some(&file), len).map_err(io_error("mapping", &path))?;
        Ok(Self {
            base,
            len,
            lanes,
            file: Some(LockedFile { file, path }),
        })
    }

    /// Sets every counter to 0 and the state to `INVALID` (a fresh mapping).
    fn start_counters(&self) {
        for lane in 0..self.lanes.total() {
            self.slot(lane)
                .store(counter_word(lane, 0), Ordering::Relaxed);
        }
        self.set_state(RegistersState::Invalid);
    }

    pub(super) fn memory_lanes(&self) -> u32 {
        self.lanes.memory
    }

    pub(super) fn disk_lanes(&self) -> u32 {
        self.lanes.disk
    }

    /// The counter of slot `lane` (memory lanes first, then disk lanes).
    #[inline]
    fn slot(&self, lane: usize) -> &AtomicU64 {
        assert!(lane < self.lanes.total(), "lane {lane} of {:?}", self.lanes);
        let offset = LANES_OFFSET + lane * LANE_STRIDE;
        // SAFETY: offset + 8 <= len (file_len covers every slot), and offset is a multiple
        // of 8 from a page-aligned base, so the u64 is in the mapping and aligned; the
        // mapping lives as long as &self; in this process these 8 bytes are only accessed
        // atomically (header reads and writes go through the file and skip the slots).
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast::<u64>()) }
    }

    fn state_word(&self) -> &AtomicU32 {
        // SAFETY: STATE_OFFSET + 4 <= LANES_OFFSET <= len and STATE_OFFSET is a multiple of
        // 4 from a page-aligned base; the mapping lives as long as &self; the word is only
        // accessed atomically (header writes through the file stop before it).
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(STATE_OFFSET).cast::<u32>()) }
    }

    /// Publishes memory lane `vcpu`'s step count, after its step's page is written.
    #[inline]
    pub(super) fn publish_memory(&self, vcpu: u32, steps: u64) {
        let lane = vcpu as usize;
        self.slot(lane)
            .store(counter_word(lane, steps), Ordering::Release);
    }

    /// Publishes disk lane `vcpu`'s step count, after its step's unit is written.
    #[inline]
    pub(super) fn publish_disk(&self, vcpu: u32, steps: u64) {
        let lane = self.lanes.memory as usize + vcpu as usize;
        self.slot(lane)
            .store(counter_word(lane, steps), Ordering::Release);
    }

    pub(super) fn memory_steps(&self, vcpu: u32) -> u64 {
        self.slot(vcpu as usize).load(Ordering::Acquire) & STEP_MASK
    }

    pub(super) fn disk_steps(&self, vcpu: u32) -> u64 {
        let lane = self.lanes.memory as usize + vcpu as usize;
        self.slot(lane).load(Ordering::Acquire) & STEP_MASK
    }

    /// The state, or None for a word that is none of the states.
    pub(super) fn state(&self) -> Option<RegistersState> {
        RegistersState::from_word(self.state_word().load(Ordering::SeqCst))
    }

    fn set_state(&self, state: RegistersState) {
        self.state_word().store(state.word(), Ordering::SeqCst);
    }

    /// Moves `from` to `to`; any other state stays (an `INVALID` VM stays invalid).
    fn transition(&self, from: RegistersState, to: RegistersState) {
        let _ = self.state_word().compare_exchange(
            from.word(),
            to.word(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Every worker is parked or exited, with its last step published.
    pub(super) fn mark_parked(&self) {
        self.transition(RegistersState::Running, RegistersState::Parked);
    }

    /// Workers are about to run: from now on a step may be in flight.
    pub(super) fn mark_running(&self) {
        self.transition(RegistersState::Parked, RegistersState::Running);
    }

    /// The counters are about to be rewritten (`load_state`).
    pub(super) fn mark_invalid(&self) {
        self.set_state(RegistersState::Invalid);
    }

    /// The counters and NIC describe a quiesced VM (after `load_state` or a recovery).
    pub(super) fn mark_loaded(&self) {
        self.set_state(RegistersState::Parked);
    }

    /// Boot content is written and the workers are about to run.
    pub(super) fn mark_booted(&self) {
        self.set_state(RegistersState::Running);
    }

    /// Reads the header of the registers file (None for anonymous registers).
    pub(super) fn read_header(&self) -> Result<Option<RegistersHeader>, PersistError> {
        let Some(locked) = &self.file else {
            return Ok(None);
        };
        let mut bytes = [0u8; HEADER_LEN];
        locked
            .file
            .read_exact_at(&mut bytes, 0)
            .map_err(io_error("reading", &locked.path))?;
        RegistersHeader::read_from_bytes(&bytes)
            .map(Some)
            .map_err(|_| PersistError::Corrupt {
                path: locked.path.clone(),
                reason: "the header does not parse".into(),
            })
    }

    /// Records the NIC in the header (no-op for anonymous registers). Called while the state
    /// is `INVALID`, with every worker parked.
    pub(super) fn set_nic(&self, nic: &NicState) -> Result<(), PersistError> {
        let (Some(locked), Some(mut header)) = (&self.file, self.read_header()?) else {
            return Ok(());
        };
        header.mac = nic.mac;
        header.ipv4 = nic.ipv4;
        header.seal();
        locked
            .file
            .write_all_at(header.as_bytes(), 0)
            .map_err(io_error("writing", &locked.path))
    }

    /// The state and the checked counters (memory lanes, disk lanes) of a registers file
    /// to recover from; an `INVALID` state is [`PersistError::NotRecoverable`].
    pub(super) fn recoverable(
        &self,
        dir: &Path,
    ) -> Result<(RegistersState, Vec<u64>, Vec<u64>), PersistError> {
        let path = dir.join(REGISTERS_FILE);
        let corrupt = |reason: String| PersistError::Corrupt {
            path: path.clone(),
            reason,
        };
        let word = self.state_word().load(Ordering::SeqCst);
        let state = match RegistersState::from_word(word) {
            Some(RegistersState::Invalid) => {
                return Err(PersistError::NotRecoverable {
                    dir: dir.to_path_buf(),
                    reason: "its registers were never made valid: boot did not finish, or an incoming VM did not load its state".into(),
                })
            }
            Some(state) => state,
            None => return Err(corrupt(format!("unknown state word {word:#010x}"))),
        };
        let mut counters = Vec::with_capacity(self.lanes.total());
        for lane in 0..self.lanes.total() {
            let word = self.slot(lane).load(Ordering::Acquire);
            let steps = checked_steps(lane, word).ok_or_else(|| {
                corrupt(format!(
                    "the counter of lane {lane} ({word:#018x}) fails its check"
                ))
            })?;
            if steps > STEPS_MAX {
                return Err(corrupt(format!(
                    "lane {lane} counts {steps} steps, more than the maximum {STEPS_MAX}"
                )));
            }
            counters.push(steps);
        }
        let disk = counters.split_off(self.lanes.memory as usize);
        Ok((state, counters, disk))
    }
}

impl Drop for Registers {
    fn drop(&mut self) {
        // SAFETY: base/len describe the mapping made in `anonymous`, `create` or `open`,
        // unmapped exactly once here. (The lock goes with the file, after.)
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Test hooks: the registers file as a crash would leave it.
#[cfg(test)]
pub(super) mod testing {
    use super::*;

    /// Overwrites the state word of the registers file in `dir`.
    pub fn set_state(dir: &Path, state: RegistersState) {
        let file = OpenOptions::new()
            .write(true)
            .open(dir.join(REGISTERS_FILE))
            .unwrap();
        file.write_all_at(&state.word().to_le_bytes(), STATE_OFFSET as u64)
            .unwrap();
    }

    /// The state word of the registers file in `dir`.
    pub fn state(dir: &Path) -> Option<RegistersState> {
        let mut word = [0u8; 4];
        File::open(dir.join(REGISTERS_FILE))
            .unwrap()
            .read_exact_at(&mut word, STATE_OFFSET as u64)
            .unwrap();
        RegistersState::from_word(u32::from_le_bytes(word))
    }

    /// Writes into slot `slot` (memory lanes first) of the file in `dir` the counter that
    /// lane `lane` would store for `steps`.
    pub fn set_counter(dir: &Path, slot: usize, lane: usize, steps: u64) {
        let file = OpenOptions::new()
            .write(true)
            .open(dir.join(REGISTERS_FILE))
            .unwrap();
        file.write_all_at(
            &counter_word(lane, steps).to_le_bytes(),
            (LANES_OFFSET + slot * LANE_STRIDE) as u64,
        )
        .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_check_their_lane_and_value() {
        for lane in [0usize, 1, 127] {
            for steps in [0u64, 1, 12345, STEPS_MAX] {
                let word = counter_word(lane, steps);
                assert_eq!(checked_steps(lane, word), Some(steps));
                assert_eq!(checked_steps(lane + 1, word), None, "slot of another lane");
                for bit in [0, 17, 47, 48, 63] {
                    assert_eq!(checked_steps(lane, word ^ (1 << bit)), None, "bit {bit}");
                }
            }
        }
        // A zeroed slot is not a valid 0.
        assert_eq!(checked_steps(0, 0), None);
    }

    #[test]
    fn state_words_are_distinct_and_not_zero() {
        let words: Vec<u32> = [
            RegistersState::Invalid,
            RegistersState::Parked,
            RegistersState::Running,
        ]
        .map(RegistersState::word)
        .to_vec();
        assert!(!words.contains(&0));
        for (i, w) in words.iter().enumerate() {
            assert_eq!(words.iter().filter(|x| *x == w).count(), 1, "word {i}");
            assert!(RegistersState::from_word(*w).is_some());
        }
        assert_eq!(RegistersState::from_word(0), None);
    }

    #[test]
    fn the_file_holds_every_lane_in_whole_pages() {
        let one = LaneCounts { memory: 1, disk: 0 };
        assert_eq!(one.file_len(), PAGE_SIZE);
        let most = LaneCounts {
            memory: super::super::VCPUS_MAX,
            disk: super::super::VCPUS_MAX,
        };
        assert!(most.file_len() >= LANES_OFFSET + 128 * LANE_STRIDE);
        assert!(most.file_len().is_multiple_of(PAGE_SIZE));
    }

    /// Cost of publishing a step count (check bits and an atomic store to the registers
    /// file's mapping) against a plain atomic store, the per-step cost before persistence.
    /// `cargo test --release -p ferry-dataplane measure_publish -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement: run by hand"]
    fn measure_publish_cost() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let spec = VmSpec {
            name: "publish".into(),
            memory_bytes: 1 << 20,
            vcpus: 2,
            dirty_rate_bytes_per_s: 0,
            pattern: super::super::Pattern::Uniform,
            seed: 1,
            fill_percent: 0,
            disk: None,
        };
        let registers = Registers::create(dir.path(), &spec, 0).unwrap();
        let plain = AtomicU64::new(0);
        const N: u64 = 100_000_000;
        for round in 0..3 {
            let start = std::time::Instant::now();
            for steps in 0..N {
                plain.store(std::hint::black_box(steps), Ordering::Release);
            }
            let plain_ns = start.elapsed().as_secs_f64() * 1e9 / N as f64;
            let start = std::time::Instant::now();
            for steps in 0..N {
                registers.publish_memory(1, std::hint::black_box(steps));
            }
            let publish_ns = start.elapsed().as_secs_f64() * 1e9 / N as f64;
            eprintln!("round {round}: plain store {plain_ns:.2} ns, publish {publish_ns:.2} ns");
        }
        assert_eq!(registers.memory_steps(1), N - 1);
    }
}
