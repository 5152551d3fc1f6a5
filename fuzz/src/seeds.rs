//! Seed inputs for each target, made by the real encoders: `examples/write_corpus.rs` writes
//! them to `corpus/<target>/`, and the corpus test requires every one to be accepted.

use ferry_control::api::{ErrorKind, Request, Response};
use ferry_control::journal::{encode_header, encode_record, Record};
use ferry_control::peer::{
    DataPlaneChoice, DataStream, DataStreamReply, MigrateIn, MigrateInReply, Opening,
    OutcomeQuestion, RdmaOffer,
};
use ferry_dataplane::disk::DirectIo;
use ferry_dataplane::engine::barrier::SwapOutcome;
use ferry_dataplane::engine::protocol::{ToDestination, ToSource};
use ferry_dataplane::engine::{MigrationParams, Progress};
use ferry_dataplane::guest::reference::{
    state, DiskPattern, DiskSpec, NicState, Pattern, VcpuState, VmSpec, VmState,
};
use ferry_dataplane::wire::message::encode_message;
use ferry_dataplane::wire::{DiskFrame, Frame};
use serde::Serialize;

use crate::{DATA_DISK_FRAME, DATA_MEMORY_FRAME, DATA_STATE_BLOB, MESSAGE_TYPES};

/// A named seed.
pub type Seed = (String, Vec<u8>);

/// The fuzz targets, by name, with their seeds.
pub fn all() -> Vec<(&'static str, Vec<Seed>)> {
    vec![
        ("data_frame", data_frame()),
        ("control_message", control_message()),
        ("journal", journal()),
    ]
}

fn spec(name: &str, disk: bool) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_bytes: 64 << 20,
        vcpus: 2,
        dirty_rate_bytes_per_s: 100 << 20,
        pattern: Pattern::Hotset,
        seed: 7,
        fill_percent: 50,
        disk: disk.then_some(DiskSpec {
            bytes: 64 << 20,
            write_rate_bytes_per_s: 8 << 20,
            pattern: DiskPattern::Random,
            fill_percent: 25,
        }),
    }
}

fn vm_state(disk: bool) -> VmState {
    let regs = |i: u64| VcpuState {
        rng: [i + 1, 0x9e37_79b9_7f4a_7c15, 3, 4],
        steps: 1000 * i,
    };
    VmState {
        spec: spec("vm1", disk),
        vcpus: vec![regs(1), regs(2)],
        disk_queues: if disk {
            vec![regs(3), regs(4)]
        } else {
            Vec::new()
        },
        nic: NicState::from_seed(7),
    }
}

fn state_blob(disk: bool) -> Vec<u8> {
    state::encode(&vm_state(disk)).expect("the seed state encodes")
}

/// `[decoder][limits…][bytes]`, see [`crate::check_data_frame`].
pub fn data_frame() -> Vec<Seed> {
    let memory = |pages: u64, per_frame: u16, frame: Frame| {
        let mut input = vec![DATA_MEMORY_FRAME];
        input.extend_from_slice(&pages.to_le_bytes());
        input.extend_from_slice(&per_frame.to_le_bytes());
        input.extend_from_slice(&frame.encode());
        input
    };
    let disk_sizes = [64u64 << 20, 1 << 20];
    let disk = |frame: DiskFrame| {
        let mut input = vec![DATA_DISK_FRAME, disk_sizes.len() as u8];
        for size in disk_sizes {
            input.extend_from_slice(&size.to_le_bytes());
        }
        input.extend_from_slice(&frame.encode());
        input
    };
    let blob = |with_disk: bool| {
        let mut input = vec![DATA_STATE_BLOB];
        input.extend_from_slice(&state_blob(with_disk));
        input
    };
    let pages = |round, first, count| Frame::Pages {
        round,
        first,
        count,
    };
    vec![
        ("memory-pages".into(), memory(16384, 256, pages(3, 10, 256))),
        ("memory-one-page".into(), memory(1000, 1, pages(0, 999, 1))),
        (
            "memory-zero-pages".into(),
            memory(
                16384,
                256,
                Frame::ZeroPages {
                    round: 7,
                    first: 0,
                    count: 5,
                },
            ),
        ),
        (
            "memory-round-end".into(),
            memory(
                16384,
                256,
                Frame::RoundEnd {
                    round: 9,
                    pages: 16384,
                },
            ),
        ),
        (
            "disk-chunk".into(),
            disk(DiskFrame::Chunk {
                disk: 0,
                id: 7,
                offset: 4096,
                len: 1 << 20,
            }),
        ),
        (
            "disk-zero".into(),
            disk(DiskFrame::Zero {
                disk: 1,
                id: u32::MAX,
                offset: 0,
                len: 1 << 20,
            }),
        ),
        (
            "disk-write".into(),
            disk(DiskFrame::Write {
                disk: 0,
                id: 0,
                offset: (64 << 20) - 65536,
                len: 65536,
            }),
        ),
        (
            "disk-ack".into(),
            disk(DiskFrame::Ack {
                disk: 1,
                id: 3,
                status: 28,
            }),
        ),
        ("state-memory-only".into(), blob(false)),
        ("state-with-disk".into(), blob(true)),
    ]
}

/// `[type][message]`, see [`crate::check_control_message`].
pub fn control_message() -> Vec<Seed> {
    let mut seeds = Vec::new();
    let mut add = |type_name: &str, name: &str, bytes: Vec<u8>| {
        let kind = MESSAGE_TYPES
            .iter()
            .position(|&t| t == type_name)
            .expect("a known message type");
        let mut input = vec![kind as u8];
        input.extend_from_slice(&bytes);
        seeds.push((format!("{type_name}-{name}"), input));
    };
    fn msg<T: Serialize>(value: &T) -> Vec<u8> {
        encode_message(value).expect("the seed message encodes")
    }

    add(
        "ToDestination",
        "hello",
        msg(&ToDestination::Hello {
            protocol: ferry_dataplane::engine::protocol::PROTOCOL_VERSION,
            pages: 16384,
            streams: 4,
            transport: "tcp".into(),
            disks: vec![64 << 20],
            disk_chunk_bytes: 1 << 20,
            disk_queue_depth: 32,
            switchover_timeout_ms: 10_000,
        }),
    );
    add(
        "ToDestination",
        "switch-over",
        msg(&ToDestination::SwitchOver {
            final_round: 4,
            device_state: state_blob(true),
            digest: 0x1234_5678_9abc_def0,
            disk_digests: vec![42],
        }),
    );
    add("ToDestination", "commit", msg(&ToDestination::Commit));
    add(
        "ToDestination",
        "abort",
        msg(&ToDestination::Abort {
            reason: "cancelled".into(),
        }),
    );
    add(
        "ToSource",
        "hello-ack",
        msg(&ToSource::HelloAck {
            pages: 16384,
            disks: vec![64 << 20],
        }),
    );
    add(
        "ToSource",
        "prepared",
        msg(&ToSource::Prepared {
            digest: 1,
            disk_digests: vec![2],
        }),
    );
    add(
        "ToSource",
        "not-in-lock-step",
        msg(&ToSource::NotInLockStep {
            digest: 3,
            disk_digests: vec![],
        }),
    );
    add("ToSource", "resumed", msg(&ToSource::Resumed));
    add(
        "Opening",
        "vm-create",
        msg(&Opening::Request(Request::VmCreate {
            spec: spec("vm1", true),
            disk: Default::default(),
        })),
    );
    add(
        "Opening",
        "migrate",
        msg(&Opening::Request(Request::Migrate {
            name: "vm1".into(),
            to: "10.0.0.2:7000".into(),
            params: MigrationParams::default(),
        })),
    );
    add(
        "Opening",
        "vm-list",
        msg(&Opening::Request(Request::VmList)),
    );
    add(
        "Opening",
        "migrate-in",
        msg(&Opening::MigrateIn(MigrateIn {
            session: 0xfeed_f00d,
            spec: spec("vm1", true),
            streams: 4,
            direct_io: DirectIo::Auto,
            start_paused: false,
            rdma: true,
            epoch: 1,
            source_port: 7000,
        })),
    );
    add(
        "Opening",
        "data-stream",
        msg(&Opening::DataStream(DataStream {
            session: 0xfeed_f00d,
            index: 3,
        })),
    );
    add(
        "Opening",
        "outcome",
        msg(&Opening::Outcome(OutcomeQuestion {
            vm: "vm1".into(),
            epoch: 2,
            session: 0xfeed_f00d,
        })),
    );
    for (name, outcome) in [
        ("committed", SwapOutcome::Committed),
        ("aborted", SwapOutcome::Aborted),
        ("pending", SwapOutcome::Pending),
    ] {
        add("SwapOutcome", name, msg(&outcome));
    }
    add(
        "MigrateInReply",
        "accepted",
        msg(&MigrateInReply::Accepted {
            prefault_ms: 12.5,
            rdma: RdmaOffer::Listening {
                port: 18515,
                device: "rxe0".into(),
            },
        }),
    );
    add(
        "MigrateInReply",
        "refused",
        msg(&MigrateInReply::Refused {
            reason: "a VM named vm1 exists".into(),
        }),
    );
    add(
        "DataStreamReply",
        "attached",
        msg(&DataStreamReply::Attached),
    );
    add(
        "DataStreamReply",
        "refused",
        msg(&DataStreamReply::Refused {
            reason: "no such session".into(),
        }),
    );
    add("DataPlaneChoice", "tcp", msg(&DataPlaneChoice::Tcp));
    add("DataPlaneChoice", "rdma", msg(&DataPlaneChoice::Rdma));
    // (No VmInfo seed: the struct grows often, and the fuzzer builds one from `Vms`.)
    add("Response", "vms", msg(&Response::Vms { vms: Vec::new() }));
    add(
        "Response",
        "cancelled",
        msg(&Response::Cancelled {
            name: "vm1".into(),
            was_running: true,
        }),
    );
    add(
        "Response",
        "progress",
        msg(&Response::Progress(Progress::default())),
    );
    add(
        "Response",
        "migrated",
        msg(&Response::Migrated(Box::default())),
    );
    add(
        "Response",
        "error",
        msg(&Response::error(ErrorKind::NotFound, "no VM named vm9")),
    );
    seeds
}

/// Whole journal files, see [`crate::check_journal`].
pub fn journal() -> Vec<Seed> {
    let file = |records: &[Record]| {
        let mut bytes = encode_header().to_vec();
        for record in records {
            bytes.extend_from_slice(&encode_record(record).expect("the seed record encodes"));
        }
        bytes
    };
    let vm = || "vm1".to_string();
    let source = [
        Record::Hosted { vm: vm(), epoch: 1 },
        Record::OutgoingStarted {
            vm: vm(),
            epoch: 1,
            session: 11,
            to: "10.0.0.2:7000".into(),
        },
        Record::OutgoingAborted {
            vm: vm(),
            epoch: 1,
            session: 11,
        },
        Record::OutgoingStarted {
            vm: vm(),
            epoch: 1,
            session: 12,
            to: "10.0.0.2:7000".into(),
        },
        Record::HandedOver {
            vm: vm(),
            epoch: 2,
            session: 12,
            to: "10.0.0.2:7000".into(),
        },
        Record::Released {
            vm: vm(),
            epoch: 2,
            session: 12,
        },
    ];
    let destination = [
        Record::IncomingStarted {
            vm: vm(),
            epoch: 2,
            session: 12,
            from: "10.0.0.1:7000".into(),
        },
        Record::Prepared {
            vm: vm(),
            epoch: 2,
            session: 12,
            from: "10.0.0.1:7000".into(),
        },
        Record::Owned {
            vm: vm(),
            epoch: 2,
            session: 12,
        },
        Record::IncomingStarted {
            vm: "vm2".into(),
            epoch: 5,
            session: 13,
            from: "10.0.0.1:7000".into(),
        },
        Record::Discarded {
            vm: "vm2".into(),
            epoch: 5,
            session: 13,
        },
        Record::Destroyed { vm: vm(), epoch: 2 },
    ];
    let source_file = file(&source);
    let mut torn = file(&destination);
    torn.truncate(torn.len() - 5);
    vec![
        ("empty".into(), file(&[])),
        ("source".into(), source_file),
        ("destination".into(), file(&destination)),
        ("destination-torn-tail".into(), torn),
    ]
}
