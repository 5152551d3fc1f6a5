//! Persisted device state of the reference VM, kept apart from the runtime structs.
//!
//! A blob is a fixed 24-byte container header followed by a postcard payload (the same
//! container holds a persistent VM's spec file, with its own magic: see `persist`):
//!
//! ```text
//! 0          8         10         12              16                 24
//! | magic    | version | reserved | payload bytes | payload xxh3-64  | payload (postcard VmState) …
//! ```
//! All integers little-endian. Decoding checks magic, version, length and checksum before
//! it trusts the payload, and never panics: any other input is a `BadState` with a reason.

use crate::hash::xxh3_64;
use serde::{Deserialize, Serialize};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::program::{splitmix64, VcpuRegs, Xoshiro256, STEPS_MAX};
use super::{DiskSpec, VmSpec};
use crate::guest::GuestError;

/// "FRYSTATE".
pub const STATE_MAGIC: [u8; 8] = *b"FRYSTATE";
/// Bumped on any change to [`VmState`]'s encoding (2: disk lanes' register files).
pub const STATE_FORMAT_VERSION: u16 = 2;
/// Domain tag for deriving the NIC from the seed ("nic").
const TAG_NIC: u64 = 0x006e_6963;
/// Size of [`StateHeader`].
pub const STATE_HEADER_LEN: usize = 24;
/// Largest payload accepted: 64 vCPUs of memory and disk registers plus a spec is a few KiB.
pub const STATE_PAYLOAD_BYTES_MAX: u32 = 1 << 16;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug)]
#[repr(C)]
struct StateHeader {
    magic: [u8; 8],
    version: U16,
    reserved: U16,
    payload_bytes: U32,
    payload_xxh3: U64,
}

const _: () = assert!(std::mem::size_of::<StateHeader>() == STATE_HEADER_LEN);

/// Everything the VM has besides its memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub spec: VmSpec,
    pub vcpus: Vec<VcpuState>,
    /// Register files of the vCPUs' disk lanes: one per vCPU with a disk, none without.
    pub disk_queues: Vec<VcpuState>,
    pub nic: NicState,
}

/// A vCPU's register file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub rng: [u64; 4],
    pub steps: u64,
}

/// The VM's network adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicState {
    pub mac: [u8; 6],
    pub ipv4: [u8; 4],
}

impl NicState {
    /// The adapter a VM with `seed` boots with: a locally administered unicast MAC and an
    /// address in 10.0.0.0/8 that is neither a network nor a broadcast address.
    pub fn from_seed(seed: u64) -> Self {
        let bits = splitmix64(seed ^ TAG_NIC).to_le_bytes();
        let mac = [0x02, bits[0], bits[1], bits[2], bits[3], bits[4]];
        let host = 1 + bits[7] % 254;
        Self {
            mac,
            ipv4: [10, bits[5], bits[6], host],
        }
    }
}

impl From<VcpuRegs> for VcpuState {
    fn from(regs: VcpuRegs) -> Self {
        Self {
            rng: regs.rng.s,
            steps: regs.steps,
        }
    }
}

impl From<VcpuState> for VcpuRegs {
    fn from(state: VcpuState) -> Self {
        Self {
            rng: Xoshiro256 { s: state.rng },
            steps: state.steps,
        }
    }
}

fn bad(reason: impl Into<String>) -> GuestError {
    GuestError::BadState {
        reason: reason.into(),
    }
}

/// Encodes `state` as a blob.
pub fn encode(state: &VmState) -> Result<Vec<u8>, GuestError> {
    let payload = postcard::to_stdvec(state)
        .map_err(|e| bad(format!("encoding the device state failed: {e}")))?;
    seal(STATE_MAGIC, STATE_FORMAT_VERSION, &payload)
        .map_err(|reason| bad(format!("device state of {} bytes: {reason}", payload.len())))
}

/// Decodes a blob, checking the container and that the payload is self-consistent. Does
/// not check it against a particular VM: see [`check_compatible`].
pub fn decode(blob: &[u8]) -> Result<VmState, GuestError> {
    let payload = unseal(blob, STATE_MAGIC, STATE_FORMAT_VERSION).map_err(bad)?;
    let (state, rest): (VmState, _) = postcard::take_from_bytes(payload)
        .map_err(|e| bad(format!("payload does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(bad(format!(
            "{} bytes follow the encoded state",
            rest.len()
        )));
    }
    check_consistent(&state)?;
    Ok(state)
}

/// Wraps `payload` in the container (header with `magic`, `version`, length and checksum).
/// Also used for the spec file of a persistent VM (`persist`). Fails only for a payload
/// over [`STATE_PAYLOAD_BYTES_MAX`].
pub(super) fn seal(magic: [u8; 8], version: u16, payload: &[u8]) -> Result<Vec<u8>, String> {
    let payload_bytes = u32::try_from(payload.len())
        .ok()
        .filter(|&n| n <= STATE_PAYLOAD_BYTES_MAX)
        .ok_or_else(|| format!("too large (limit {STATE_PAYLOAD_BYTES_MAX} bytes)"))?;
    let header = StateHeader {
        magic,
        version: U16::new(version),
        reserved: U16::ZERO,
        payload_bytes: U32::new(payload_bytes),
        payload_xxh3: U64::new(xxh3_64(payload)),
    };
    let mut blob = Vec::with_capacity(STATE_HEADER_LEN + payload.len());
    blob.extend_from_slice(header.as_bytes());
    blob.extend_from_slice(payload);
    Ok(blob)
}

/// Checks the container of `blob` (magic, version, length, checksum) and returns its
/// payload, or the reason it is refused. Never panics.
pub(super) fn unseal(blob: &[u8], magic: [u8; 8], version: u16) -> Result<&[u8], String> {
    let (header, payload) = StateHeader::read_from_prefix(blob).map_err(|_| {
        format!(
            "blob of {} bytes is shorter than the {STATE_HEADER_LEN}-byte header",
            blob.len()
        )
    })?;
    if header.magic != magic {
        return Err(format!(
            "bad magic {:02x?}, expected {:?}",
            header.magic,
            String::from_utf8_lossy(&magic)
        ));
    }
    if header.version.get() != version {
        return Err(format!(
            "format version {} is not supported (this build reads version {version})",
            header.version.get()
        ));
    }
    if header.reserved.get() != 0 {
        return Err("reserved header field is not zero".into());
    }
    let payload_bytes = header.payload_bytes.get();
    if payload_bytes > STATE_PAYLOAD_BYTES_MAX {
        return Err(format!(
            "payload length {payload_bytes} exceeds the limit of {STATE_PAYLOAD_BYTES_MAX} bytes"
        ));
    }
    if payload.len() != payload_bytes as usize {
        return Err(format!(
            "header says {payload_bytes} payload bytes but the blob carries {}",
            payload.len()
        ));
    }
    let checksum = xxh3_64(payload);
    if checksum != header.payload_xxh3.get() {
        return Err(format!(
            "payload checksum {checksum:#018x} does not match the header's {:#018x}",
            header.payload_xxh3.get()
        ));
    }
    Ok(payload)
}

/// Checks what a valid state always satisfies, whatever VM it is loaded into.
fn check_consistent(state: &VmState) -> Result<(), GuestError> {
    state
        .spec
        .validate()
        .map_err(|e| bad(format!("the saved spec is invalid: {e}")))?;
    if state.vcpus.len() != state.spec.vcpus as usize {
        return Err(bad(format!(
            "{} vCPU register files for a spec of {} vCPUs",
            state.vcpus.len(),
            state.spec.vcpus
        )));
    }
    let disk_queues = if state.spec.disk.is_some() {
        state.spec.vcpus as usize
    } else {
        0
    };
    if state.disk_queues.len() != disk_queues {
        return Err(bad(format!(
            "{} disk register files for a spec of {} vCPUs {}",
            state.disk_queues.len(),
            state.spec.vcpus,
            if disk_queues == 0 {
                "without a disk"
            } else {
                "with a disk"
            }
        )));
    }
    let register_files = state
        .vcpus
        .iter()
        .enumerate()
        .map(|(v, regs)| ("vCPU", v, regs))
        .chain(
            state
                .disk_queues
                .iter()
                .enumerate()
                .map(|(v, regs)| ("disk lane of vCPU", v, regs)),
        );
    for (what, v, regs) in register_files {
        if regs.steps > STEPS_MAX {
            return Err(bad(format!(
                "{what} {v} step counter {} exceeds the maximum {STEPS_MAX}",
                regs.steps
            )));
        }
        if regs.rng == [0; 4] {
            return Err(bad(format!("{what} {v} PRNG state is all zero")));
        }
    }
    Ok(())
}

/// Checks that `state` was saved by a VM running the same program as `spec`: the memory
/// size, vCPU count, seed, pattern and fill decide every byte, and the disk's size, pattern
/// and fill every disk block. The name and the dirty and disk write rates may differ (the
/// destination runs at its own rate).
pub fn check_compatible(spec: &VmSpec, state: &VmState) -> Result<(), GuestError> {
    let saved = &state.spec;
    let mut differences = Vec::new();
    note(
        &mut differences,
        "memory_bytes",
        &saved.memory_bytes,
        &spec.memory_bytes,
    );
    note(&mut differences, "vcpus", &saved.vcpus, &spec.vcpus);
    note(&mut differences, "seed", &saved.seed, &spec.seed);
    note(&mut differences, "pattern", &saved.pattern, &spec.pattern);
    note(
        &mut differences,
        "fill_percent",
        &saved.fill_percent,
        &spec.fill_percent,
    );
    differences.extend(disk_differences(saved.disk.as_ref(), spec.disk.as_ref()));
    if differences.is_empty() {
        Ok(())
    } else {
        Err(bad(format!(
            "state was saved by a different VM: {}",
            differences.join(", ")
        )))
    }
}

/// Adds "`what` saved (this VM has ours)" when the two differ.
fn note<T: PartialEq + std::fmt::Display>(
    differences: &mut Vec<String>,
    what: &str,
    saved: &T,
    ours: &T,
) {
    if saved != ours {
        differences.push(format!("{what} {saved} (this VM has {ours})"));
    }
}

/// How the disk a state was saved with differs from this VM's, in program terms.
fn disk_differences(saved: Option<&DiskSpec>, ours: Option<&DiskSpec>) -> Vec<String> {
    let (saved, ours) = match (saved, ours) {
        (None, None) => return Vec::new(),
        (Some(saved), Some(ours)) => (saved, ours),
        (Some(saved), None) => {
            return vec![format!(
                "a disk of {} bytes (this VM has no disk)",
                saved.bytes
            )]
        }
        (None, Some(ours)) => {
            return vec![format!(
                "no disk (this VM has a disk of {} bytes)",
                ours.bytes
            )]
        }
    };
    let mut differences = Vec::new();
    note(&mut differences, "disk bytes", &saved.bytes, &ours.bytes);
    note(
        &mut differences,
        "disk pattern",
        &saved.pattern,
        &ours.pattern,
    );
    note(
        &mut differences,
        "disk fill_percent",
        &saved.fill_percent,
        &ours.fill_percent,
    );
    differences
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::guest::reference::{DiskPattern, Pattern};

    fn spec() -> VmSpec {
        VmSpec {
            name: "state-test".into(),
            memory_bytes: 16 << 20,
            vcpus: 3,
            dirty_rate_bytes_per_s: 1 << 20,
            pattern: Pattern::Hotset,
            seed: 42,
            fill_percent: 100,
            disk: None,
        }
    }

    fn registers(base: u64) -> Vec<VcpuState> {
        (0..3)
            .map(|v| VcpuState {
                rng: [base + v + 1, 2, 3, 4],
                steps: v * 100,
            })
            .collect()
    }

    fn state() -> VmState {
        VmState {
            spec: spec(),
            vcpus: registers(0),
            disk_queues: Vec::new(),
            nic: NicState::from_seed(42),
        }
    }

    fn disk_spec() -> DiskSpec {
        DiskSpec {
            bytes: 8 << 20,
            write_rate_bytes_per_s: 1 << 20,
            pattern: DiskPattern::Sequential,
            fill_percent: 50,
        }
    }

    fn state_with_disk() -> VmState {
        let mut s = state();
        s.spec.disk = Some(disk_spec());
        s.disk_queues = registers(10);
        s
    }

    fn reason(result: Result<VmState, GuestError>) -> String {
        match result {
            Err(GuestError::BadState { reason }) => reason,
            other => panic!("expected BadState, got {other:?}"),
        }
    }

    #[test]
    fn round_trips() {
        let blob = encode(&state()).unwrap();
        assert_eq!(&blob[..8], b"FRYSTATE");
        assert_eq!(decode(&blob).unwrap(), state());
        check_compatible(&spec(), &state()).unwrap();
    }

    #[test]
    fn round_trips_with_disk_registers() {
        let with_disk = state_with_disk();
        let blob = encode(&with_disk).unwrap();
        let decoded = decode(&blob).unwrap();
        assert_eq!(decoded, with_disk);
        assert_eq!(decoded.disk_queues, registers(10));
        check_compatible(&with_disk.spec, &decoded).unwrap();
        // The disk write rate is not part of the program.
        let mut slower = with_disk.spec.clone();
        slower.disk.as_mut().unwrap().write_rate_bytes_per_s = 0;
        check_compatible(&slower, &decoded).unwrap();
    }

    #[test]
    fn inconsistent_disk_registers_are_refused() {
        let mut s = state_with_disk();
        s.disk_queues.pop();
        assert!(reason(decode(&encode(&s).unwrap())).contains("disk register files"));
        let mut s = state();
        s.disk_queues = registers(10);
        assert!(reason(decode(&encode(&s).unwrap())).contains("without a disk"));
        let mut s = state_with_disk();
        s.disk_queues[2].steps = STEPS_MAX + 1;
        assert!(reason(decode(&encode(&s).unwrap())).contains("disk lane of vCPU 2 step counter"));
        let mut s = state_with_disk();
        s.disk_queues[0].rng = [0; 4];
        assert!(reason(decode(&encode(&s).unwrap())).contains("disk lane of vCPU 0 PRNG"));
    }

    #[test]
    fn a_different_disk_is_refused() {
        let saved = state_with_disk();
        let err = check_compatible(&spec(), &saved).unwrap_err().to_string();
        assert!(err.contains("this VM has no disk"), "{err}");
        let err = check_compatible(&saved.spec, &state())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no disk (this VM has a disk"), "{err}");
        for (what, change) in [
            (
                "disk bytes",
                (|d: &mut DiskSpec| d.bytes *= 2) as fn(&mut DiskSpec),
            ),
            ("disk pattern", |d| d.pattern = DiskPattern::Random),
            ("disk fill_percent", |d| d.fill_percent = 51),
        ] {
            let mut other = saved.spec.clone();
            change(other.disk.as_mut().unwrap());
            let err = check_compatible(&other, &saved).unwrap_err().to_string();
            assert!(err.contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn nic_is_deterministic_and_well_formed() {
        let nic = NicState::from_seed(5);
        assert_eq!(nic, NicState::from_seed(5));
        assert_ne!(nic, NicState::from_seed(6));
        assert_eq!(nic.mac[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(nic.ipv4[0], 10);
        assert!(!matches!(nic.ipv4[3], 0 | 255));
    }

    #[test]
    fn each_container_fault_has_its_reason() {
        let blob = encode(&state()).unwrap();
        assert!(reason(decode(&blob[..10])).contains("shorter than"));
        let mut wrong = blob.clone();
        wrong[0] = b'X';
        assert!(reason(decode(&wrong)).contains("magic"));
        let mut wrong = blob.clone();
        wrong[8] = 1;
        assert!(reason(decode(&wrong)).contains("format version 1"));
        assert!(reason(decode(&blob[..blob.len() - 1])).contains("payload bytes"));
        let mut wrong = blob.clone();
        wrong.push(0);
        assert!(reason(decode(&wrong)).contains("payload bytes"));
        let mut wrong = blob.clone();
        *wrong.last_mut().unwrap() ^= 1;
        assert!(reason(decode(&wrong)).contains("checksum"));
    }

    #[test]
    fn inconsistent_payloads_are_refused() {
        let mut s = state();
        s.vcpus.pop();
        assert!(reason(decode(&encode(&s).unwrap())).contains("register files"));
        let mut s = state();
        s.vcpus[1].steps = STEPS_MAX + 1;
        assert!(reason(decode(&encode(&s).unwrap())).contains("step counter"));
        let mut s = state();
        s.vcpus[0].rng = [0; 4];
        assert!(reason(decode(&encode(&s).unwrap())).contains("all zero"));
        let mut s = state();
        s.spec.vcpus = 0;
        assert!(reason(decode(&encode(&s).unwrap())).contains("spec is invalid"));
    }

    #[test]
    fn a_different_program_is_refused() {
        let mut other = spec();
        other.seed = 43;
        other.vcpus = 4;
        let err = check_compatible(&other, &state()).unwrap_err().to_string();
        assert!(err.contains("seed 42 (this VM has 43)"), "{err}");
        assert!(err.contains("vcpus 3 (this VM has 4)"), "{err}");
        // Name and rate are not part of the program.
        let mut renamed = spec();
        renamed.name = "elsewhere".into();
        renamed.dirty_rate_bytes_per_s = 0;
        check_compatible(&renamed, &state()).unwrap();
    }

    /// Wraps `payload` in a valid container, so the postcard decoder itself is exercised.
    fn wrap(payload: &[u8]) -> Vec<u8> {
        let header = StateHeader {
            magic: STATE_MAGIC,
            version: U16::new(STATE_FORMAT_VERSION),
            reserved: U16::ZERO,
            payload_bytes: U32::new(payload.len() as u32),
            payload_xxh3: U64::new(xxh3_64(payload)),
        };
        let mut blob = header.as_bytes().to_vec();
        blob.extend_from_slice(payload);
        blob
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            prop_assert!(decode(&bytes).is_err());
            // Inside a valid container almost all of these fail to decode; any that do decode
            // were checked for consistency, which is all decode promises.
            let _ = decode(&wrap(&bytes));
        }

        #[test]
        fn truncations_are_refused(cut in 0usize..200) {
            let blob = encode(&state()).unwrap();
            let cut = cut % blob.len();
            prop_assert!(decode(&blob[..cut]).is_err());
        }

        #[test]
        fn bit_flips_are_refused(bit in 0usize..4096) {
            let mut blob = encode(&state()).unwrap();
            let bit = bit % (blob.len() * 8);
            blob[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&blob).is_err());
        }

        #[test]
        fn payload_bit_flips_in_a_valid_container_never_panic(bit in 0usize..4096) {
            let blob = encode(&state()).unwrap();
            let mut payload = blob[STATE_HEADER_LEN..].to_vec();
            let bit = bit % (payload.len() * 8);
            payload[bit / 8] ^= 1 << (bit % 8);
            match decode(&wrap(&payload)) {
                Ok(decoded) => prop_assert_ne!(decoded, state()),
                Err(GuestError::BadState { .. }) => {}
                Err(other) => prop_assert!(false, "unexpected error {other:?}"),
            }
        }
    }
}
