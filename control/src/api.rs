//! The CLI ↔ agent API.
//!
//! A CLI connection opens with [`crate::peer::Opening::Request`] carrying one [`Request`]
//! and gets exactly one [`Response`] back, except `Migrate`, which gets a stream of
//! [`Response::Progress`] followed by one final [`Response::Migrated`] or
//! [`Response::Error`]. Every message is framed by `ferry_dataplane::wire` (postcard,
//! checksummed, bounded by [`API_MESSAGE_LEN_MAX`]).

use std::path::PathBuf;

use ferry_dataplane::disk::{DirectIo, LatencySummary};
use ferry_dataplane::engine::{MigrationParams, MigrationReport, Progress};
use ferry_dataplane::guest::reference::{DiskPattern, Pattern, VerifyReport, VmSpec};
use serde::{Deserialize, Serialize};

/// Largest response the CLI accepts: a list of many VMs or a verify report with its
/// mismatch list is a few KiB; 4 MiB leaves room without letting a broken agent make the
/// CLI allocate without bound.
pub const API_MESSAGE_LEN_MAX: u32 = 4 << 20;

/// What the CLI asks an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Boot a reference VM (names are unique per agent). When `spec.disk` is set, `disk`
    /// says where its image lives and how it is opened.
    VmCreate {
        spec: VmSpec,
        #[serde(default)]
        disk: DiskPlacement,
    },
    VmList,
    VmStatus {
        name: String,
    },
    /// Replay the VM's program and check every page (the VM pauses while it runs).
    VmVerify {
        name: String,
    },
    /// Stop and remove a VM; a disk image the agent created for it is deleted with it.
    VmDestroy {
        name: String,
    },
    /// Stop the vCPUs (and their disk writes) at a step boundary; the VM stays hosted.
    VmPause {
        name: String,
    },
    /// Let a paused VM (or one that arrived with `migrate --paused`) run again.
    VmResume {
        name: String,
    },
    /// Move `name` to the agent at `to` (`host:port`). The source agent runs the migration in
    /// its own thread; the requesting connection only watches it.
    Migrate {
        name: String,
        to: String,
        params: MigrationParams,
    },
    /// Cancel the migration (outgoing or incoming) of `name`.
    Cancel {
        name: String,
    },
    /// Stop the agent: cancels migrations, shuts its VMs down, exits.
    Shutdown,
}

/// Where the image of a new VM's disk comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskPlacement {
    /// An existing file or block device on the agent's host, whose whole content the agent
    /// overwrites and whose size becomes the disk's (the spec's `bytes` is then ignored).
    /// `None`: the agent creates `DATA_DIR/disks/NAME.img` of the spec's size, and owns it.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// How the agent opens the image.
    #[serde(default)]
    pub direct_io: DirectIo,
}

/// Where a hosted VM is in its life on this agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Hosted here and not moving (its vCPUs may still be paused; see `running`).
    Running,
    /// Being migrated away from this agent.
    Migrating,
    /// Being migrated to this agent; not running yet.
    Incoming,
    /// Migrated here and prepared, but the source's decision did not arrive: kept paused
    /// while this agent asks the source's agent how the swap ended. Never resumed before it
    /// learns of the commit.
    #[serde(rename = "in-doubt")]
    InDoubt,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Migrating => "migrating",
            VmState::Incoming => "incoming",
            VmState::InDoubt => "in-doubt",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One hosted VM as `vm list` and `vm status` show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub pattern: Pattern,
    pub dirty_rate_bytes_per_s: u64,
    pub seed: u64,
    pub fill_percent: u8,
    pub state: VmState,
    /// vCPUs are running (false while parked, quiesced or before an incoming VM resumes).
    pub running: bool,
    pub total_steps: u64,
    /// Steps per vCPU.
    pub steps: Vec<u64>,
    pub throttle_percent: u8,
    /// The VM's virtual disk, if it has one.
    #[serde(default)]
    pub disk: Option<DiskInfo>,
    /// The ownership epoch: 1 when created, one more after each completed migration.
    #[serde(default)]
    pub epoch: u64,
    /// Who owns the VM by this agent's journal: `this agent`, or while in doubt, the
    /// source agent being asked.
    #[serde(default)]
    pub owner: String,
}

/// A hosted VM's virtual disk as `vm status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub bytes: u64,
    /// The image: a file or a block device on the agent's host.
    pub path: PathBuf,
    /// The agent created the image (under `DATA_DIR/disks/`) and deletes it with the VM;
    /// false for a path the user gave, which is never deleted.
    pub agent_owned: bool,
    pub block_device: bool,
    /// O_DIRECT is in effect for the image.
    pub direct_io: bool,
    pub pattern: DiskPattern,
    /// Bytes the vCPUs write to the disk per second, in total.
    pub write_rate_bytes_per_s: u64,
    /// Share of 1 MiB extents given content at boot.
    pub fill_percent: u8,
    /// Disk writes completed, per vCPU, and in total.
    pub steps: Vec<u64>,
    pub total_steps: u64,
    /// Guest disk writes that failed (each is retried until it succeeds).
    pub write_errors: u64,
    /// Guest write latency while no migration mirrored the disk.
    pub unmirrored_latency: LatencySummary,
}

/// Why a request failed, so that scripts need not parse messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Malformed or invalid request (bad spec, bad parameters).
    BadRequest,
    /// No VM of that name on this agent.
    NotFound,
    /// A VM of that name exists already.
    AlreadyExists,
    /// The VM is migrating (or being created) and cannot do that now.
    Busy,
    /// The agent is shutting down.
    ShuttingDown,
    /// A migration started but did not complete.
    MigrationFailed,
    /// Anything else (booting failed, verify failed to run, …).
    Internal,
}

/// What an agent answers. (No `PartialEq`: the verify report has none.)
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Created {
        vm: VmInfo,
    },
    Vms {
        vms: Vec<VmInfo>,
    },
    Vm {
        vm: VmInfo,
    },
    Verified {
        name: String,
        report: VerifyReport,
    },
    Destroyed {
        name: String,
    },
    /// A snapshot of a running migration (a few per second, and at every phase or round).
    Progress(Progress),
    /// The migration completed: the VM runs on the destination.
    Migrated(Box<MigrationReport>),
    /// Answer to `Cancel`: whether a migration of `name` was running.
    Cancelled {
        name: String,
        was_running: bool,
    },
    ShuttingDown,
    Error {
        kind: ErrorKind,
        message: String,
    },
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Error {
            kind,
            message: message.into(),
        }
    }

    /// A short name for logs and "unexpected answer" errors.
    pub fn variant(&self) -> &'static str {
        match self {
            Response::Created { .. } => "Created",
            Response::Vms { .. } => "Vms",
            Response::Vm { .. } => "Vm",
            Response::Verified { .. } => "Verified",
            Response::Destroyed { .. } => "Destroyed",
            Response::Progress(_) => "Progress",
            Response::Migrated(_) => "Migrated",
            Response::Cancelled { .. } => "Cancelled",
            Response::ShuttingDown => "ShuttingDown",
            Response::Error { .. } => "Error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_dataplane::engine::{DiskProgress, DiskReport, Phase};
    use ferry_dataplane::guest::reference::{DiskMismatch, DiskSpec, Mismatch};
    use ferry_dataplane::wire::message::{decode_message, encode_message};

    fn spec() -> VmSpec {
        VmSpec {
            name: "vm1".into(),
            memory_bytes: 64 << 20,
            vcpus: 2,
            dirty_rate_bytes_per_s: 100 << 20,
            pattern: Pattern::Hotset,
            seed: 7,
            fill_percent: 50,
            disk: None,
        }
    }

    fn info() -> VmInfo {
        VmInfo {
            name: "vm1".into(),
            memory_bytes: 64 << 20,
            vcpus: 2,
            pattern: Pattern::Sweep,
            dirty_rate_bytes_per_s: 1 << 20,
            seed: 1,
            fill_percent: 100,
            state: VmState::Migrating,
            running: true,
            total_steps: 30,
            steps: vec![10, 20],
            throttle_percent: 5,
            disk: None,
            epoch: 2,
            owner: "this agent".into(),
        }
    }

    fn disk_spec() -> VmSpec {
        VmSpec {
            disk: Some(DiskSpec {
                bytes: 8 << 30,
                write_rate_bytes_per_s: 20 << 20,
                pattern: DiskPattern::Sequential,
                fill_percent: 25,
            }),
            ..spec()
        }
    }

    fn disk_info() -> VmInfo {
        VmInfo {
            disk: Some(DiskInfo {
                bytes: 8 << 30,
                path: "/var/lib/ferry/disks/vm1.img".into(),
                agent_owned: true,
                block_device: false,
                direct_io: true,
                pattern: DiskPattern::Random,
                write_rate_bytes_per_s: 20 << 20,
                fill_percent: 25,
                steps: vec![1, 2],
                total_steps: 3,
                write_errors: 0,
                unmirrored_latency: LatencySummary {
                    count: 3,
                    p50_us: 40.0,
                    p99_us: 900.0,
                    max_us: 1000.0,
                },
            }),
            ..info()
        }
    }

    fn round_trip<T>(value: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let buf = encode_message(value).unwrap();
        decode_message(&buf, API_MESSAGE_LEN_MAX).unwrap()
    }

    #[test]
    fn every_request_round_trips() {
        let requests = [
            Request::VmCreate {
                spec: spec(),
                disk: DiskPlacement::default(),
            },
            Request::VmCreate {
                spec: disk_spec(),
                disk: DiskPlacement::default(),
            },
            Request::VmCreate {
                spec: disk_spec(),
                disk: DiskPlacement {
                    path: Some("/dev/vdb".into()),
                    direct_io: DirectIo::Required,
                },
            },
            Request::VmPause { name: "p".into() },
            Request::VmResume { name: "r".into() },
            Request::VmList,
            Request::VmStatus { name: "a".into() },
            Request::VmVerify { name: "b".into() },
            Request::VmDestroy { name: "c".into() },
            Request::Migrate {
                name: "d".into(),
                to: "127.0.0.1:7071".into(),
                params: MigrationParams {
                    bandwidth_max_bytes_per_s: Some(1 << 30),
                    ..MigrationParams::default()
                },
            },
            Request::Migrate {
                name: "d".into(),
                to: "127.0.0.1:7071".into(),
                params: MigrationParams {
                    disk_chunk_bytes: 4 << 20,
                    disk_queue_depth: 64,
                    direct_io: DirectIo::Off,
                    start_paused: true,
                    keep_source_disks: true,
                    ..MigrationParams::default()
                },
            },
            Request::Cancel { name: "e".into() },
            Request::Shutdown,
        ];
        for request in requests {
            assert_eq!(round_trip(&request), request);
        }
    }

    #[test]
    fn every_response_round_trips() {
        let report = VerifyReport {
            ok: false,
            pages_checked: 16384,
            mismatched_pages: 1,
            first_mismatches: vec![Mismatch {
                page: 3,
                addr: 0x3005,
                expected: 7,
                found: 0,
            }],
            register_mismatches: vec![],
            steps: vec![5, 6],
            disk_bytes_checked: 1 << 30,
            mismatched_disk_blocks: 1,
            first_disk_mismatches: vec![DiskMismatch {
                block: 9,
                offset: 9 * 4096 + 3,
                expected: 1,
                found: 2,
            }],
            disk_register_mismatches: vec![],
            disk_steps: vec![4, 4],
            elapsed_ms: 1.5,
        };
        let responses = [
            Response::Created { vm: info() },
            Response::Vms {
                vms: vec![info(), info()],
            },
            Response::Vm { vm: info() },
            Response::Vm { vm: disk_info() },
            Response::Destroyed { name: "x".into() },
            Response::Progress(Progress {
                phase: Some(Phase::MemoryPreCopy),
                round: 3,
                eta_ms: Some(9),
                ..Default::default()
            }),
            Response::Progress(Progress {
                phase: Some(Phase::DiskCopy),
                disks: vec![DiskProgress {
                    bytes_total: 1 << 30,
                    bytes_copied: 1 << 29,
                    rate_bytes_per_s: 1 << 28,
                    eta_ms: Some(2000),
                    mirrored_writes: 17,
                    mirrored_bytes: 0,
                }],
                ..Default::default()
            }),
            Response::Migrated(Box::new(MigrationReport {
                total_ms: 12.5,
                transport: "tcp".into(),
                ..Default::default()
            })),
            Response::Migrated(Box::new(MigrationReport {
                disk_copy_ms: 800.0,
                disks: vec![DiskReport {
                    bytes: 128 << 20,
                    data_bytes: 32 << 20,
                    zero_bytes: 96 << 20,
                    mirrored_writes: 12,
                    mirrored_latency: LatencySummary {
                        count: 12,
                        p50_us: 300.0,
                        p99_us: 2000.0,
                        max_us: 2500.0,
                    },
                    digest: 0xfeed,
                    ..Default::default()
                }],
                ..Default::default()
            })),
            Response::Cancelled {
                name: "x".into(),
                was_running: true,
            },
            Response::ShuttingDown,
            Response::error(ErrorKind::NotFound, "no VM named \"x\""),
        ];
        let verified = Response::Verified {
            name: "v".into(),
            report,
        };
        // Compared through JSON: Response has no PartialEq (VerifyReport has none).
        for response in responses.iter().chain([&verified]) {
            let back = round_trip(response);
            assert_eq!(back.variant(), response.variant());
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(response).unwrap()
            );
        }
    }

    #[test]
    fn json_names_are_stable() {
        let v = serde_json::to_value(info()).unwrap();
        assert_eq!(v["state"], "migrating");
        assert_eq!(v["pattern"], "sweep");
        assert!(v["disk"].is_null());
        let v = serde_json::to_value(disk_info()).unwrap();
        assert_eq!(v["disk"]["bytes"], 8u64 << 30);
        assert_eq!(v["disk"]["path"], "/var/lib/ferry/disks/vm1.img");
        assert_eq!(v["disk"]["pattern"], "random");
        assert_eq!(v["disk"]["direct_io"], true);
        assert_eq!(v["disk"]["total_steps"], 3);
        assert_eq!(v["disk"]["unmirrored_latency"]["p99_us"], 900.0);
        // Output of an older agent (no disk field) still reads.
        let mut old = serde_json::to_value(info()).unwrap();
        old.as_object_mut().unwrap().remove("disk");
        let back: VmInfo = serde_json::from_value(old).unwrap();
        assert_eq!(back, info());
        let e = serde_json::to_value(ErrorKind::AlreadyExists).unwrap();
        assert_eq!(e, "already-exists");
    }
}
