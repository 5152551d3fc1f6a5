//! The migration engine end to end in one process: a real reference VM, the real uffd-wp
//! tracker, real TCP on loopback. Faults are injected through wrappers at the seams
//! (tracker, transport) and through raw bytes on the sockets.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_dataplane::engine::collect_pause::CollectPause;
use ferry_dataplane::engine::{EngineError, MigrationParams};
use ferry_dataplane::guest::reference::Pattern;
use ferry_dataplane::guest::Guest;
use ferry_dataplane::hash::xxh3_64;
use ferry_dataplane::memory::{DirtyBitmap, DirtyTracker, GuestMemory};
use ferry_dataplane::transport::TransportError;
use ferry_dataplane::wire::Frame;
use support::{
    assert_failed_back, boot_pair, identity, kernel_tracker, migrate, migrate_plainly, spec,
    steps_increase, HookedTracker, HookedTransport,
};

#[test]
fn busy_vm_moves_and_verifies_on_the_destination() {
    for pattern in [Pattern::Uniform, Pattern::Hotset, Pattern::Sweep] {
        let (vm, incoming) = boot_pair(spec("e2e", 64, 100, pattern));
        std::thread::sleep(Duration::from_millis(100));
        let mut tracker = kernel_tracker(&vm);
        let params = MigrationParams {
            streams: 3,
            ..Default::default()
        };
        let outcome = migrate_plainly(&vm, &incoming, params, &mut tracker);
        let report = outcome.source.expect("migration succeeds");
        let incoming_report = outcome.destination.expect("destination resumes");
        assert!(
            !vm.status().running,
            "source must stay quiesced after the hand-over"
        );
        assert!(
            report.rounds >= 1 && report.bytes_sent >= 64 << 20,
            "{report:?}"
        );
        assert_eq!(report.memory_digest, incoming_report.memory_digest);
        assert!(report.downtime_ms > 0.0 && report.downtime_ms < report.total_ms);
        assert_eq!(
            report.pages_sent + report.zero_pages_sent,
            incoming_report.pages_received
        );
        check_timeline(&report);
        steps_increase(&incoming);
        let verify = incoming.verify().unwrap();
        assert!(verify.ok, "{pattern}: {verify:?}");
        assert!(
            verify.steps.iter().sum::<u64>() > vm.status().total_steps,
            "destination continued past the source's steps"
        );
    }
}

/// The report's timeline agrees with the report: one record per round, the pause is the
/// downtime, samples in time order with counters that never go back and end at the bytes sent.
fn check_timeline(report: &ferry_dataplane::engine::MigrationReport) {
    let t = &report.timeline;
    assert_eq!(t.rounds.len() as u32, report.rounds, "{t:?}");
    for (i, r) in t.rounds.iter().enumerate() {
        assert_eq!(r.round, i as u32);
        assert!(r.start_ms <= r.end_ms && r.bytes > 0 && r.bandwidth_bytes_per_s > 0.0);
    }
    assert_eq!(
        t.rounds[0].pages,
        64 << 20 >> 12,
        "round 0 sends every page"
    );
    let pause = t.pause.expect("the pause is recorded");
    assert!((pause.end_ms - pause.start_ms - report.downtime_ms).abs() < 0.01);
    assert_eq!(pause.pages, report.final_pages);
    assert!((t.total_ms - report.total_ms).abs() < 0.01);
    assert!(t.samples.len() >= 3, "{t:?}");
    assert!(t
        .samples
        .windows(2)
        .all(|w| w[0].t_ms <= w[1].t_ms && w[0].memory_bytes <= w[1].memory_bytes));
    assert_eq!(t.samples.last().unwrap().memory_bytes, report.bytes_sent);
}

/// The loss must be caught. Usually by `verify` on the destination: the engine itself cannot
/// see pages the tracker never reported. Sometimes earlier, by the lock-step digest: a
/// dropped page that the guest wrote between being hashed and being sent makes the two
/// sides' digests differ, and the migration fails back. Either way nothing passes silently.
#[test]
fn a_tracker_that_drops_one_collection_is_caught() {
    let (vm, incoming) = boot_pair(spec("drop", 64, 200, Pattern::Uniform));
    // A downtime target of 0 never converges, so there are exactly `rounds_max` pre-copy
    // rounds. The second collection (pages written during round 1) is dropped: those pages
    // were last sent with the bytes the source hashed, so usually only verify can tell.
    let params = MigrationParams {
        streams: 2,
        downtime_ms: 0,
        rounds_max: 4,
        ..Default::default()
    };
    // Drops the second collection: its pages are never sent again.
    let (collections, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tracker = HookedTracker::new(kernel_tracker(&vm)).on_collect({
        let (collections, dropped) = (Arc::clone(&collections), Arc::clone(&dropped));
        move |set| {
            if collections.fetch_add(1, Ordering::SeqCst) + 1 == 2 {
                dropped.store(set.count(), Ordering::SeqCst);
                return DirtyBitmap::new(set.pages());
            }
            set
        }
    });
    let outcome = migrate_plainly(&vm, &incoming, params, &mut tracker);
    assert!(
        dropped.load(Ordering::SeqCst) > 0,
        "the dropped collection was empty"
    );
    match outcome.source {
        Ok(_) => {
            let verify = incoming.verify().unwrap();
            assert!(
                !verify.ok,
                "verify must catch the {} lost pages",
                dropped.load(Ordering::SeqCst)
            );
            assert!(verify.mismatched_pages > 0 && !verify.first_mismatches.is_empty());
            eprintln!(
                "caught by verify: {} of {} dropped pages stale",
                verify.mismatched_pages,
                dropped.load(Ordering::SeqCst)
            );
        }
        Err(EngineError::DigestMismatch { .. }) => {
            eprintln!("caught by the lock-step digest before the commit point");
            assert_failed_back(&vm, &outcome);
        }
        Err(other) => panic!("unexpected failure: {other}"),
    }
}

#[test]
fn a_failed_send_puts_the_dirty_set_back_and_fails_back() {
    let (vm, incoming) = boot_pair(spec("putback", 32, 50, Pattern::Uniform));
    let put_back = Arc::new(AtomicU64::new(0));
    let mut tracker = HookedTracker::new(kernel_tracker(&vm)).on_put_back({
        let put_back = Arc::clone(&put_back);
        move |pages| {
            put_back.fetch_add(pages.count() as u64, Ordering::SeqCst);
        }
    });
    let params = MigrationParams {
        streams: 2,
        ..Default::default()
    };
    let outcome = migrate(
        &vm,
        &incoming,
        params,
        &mut tracker,
        |inner| {
            // Every send after the first five fails.
            let sends = AtomicUsize::new(0);
            HookedTransport::wrap(inner, move |inner, stream, memory, frames| {
                if sends.fetch_add(1, Ordering::SeqCst) >= 5 {
                    return Err(TransportError::Io {
                        stream,
                        op: "sending pages",
                        source: std::io::ErrorKind::BrokenPipe.into(),
                    });
                }
                inner.send(stream, memory, frames)
            })
        },
        |_| {},
        &AtomicBool::new(false),
    );
    assert!(
        matches!(outcome.source, Err(EngineError::Transport(_))),
        "{:?}",
        outcome.source.as_ref().err()
    );
    // Round 0 was the whole memory: every page of it went back to the tracker.
    assert_eq!(put_back.load(Ordering::SeqCst), vm.memory().pages() as u64);
    let after = tracker.collect().unwrap();
    assert_eq!(
        after.count(),
        vm.memory().pages(),
        "the put-back set comes out of the next collection"
    );
    assert_failed_back(&vm, &outcome);
}

/// The data link itself goes away mid pre-copy (TCP: every socket shut down; RDMA: every
/// lane disconnected, so posted work is flushed on both ends): the migration fails back
/// and the VM runs on, intact, on the source.
#[test]
fn a_data_link_lost_mid_precopy_fails_back() {
    let (vm, incoming) = boot_pair(spec("linkloss", 32, 20, Pattern::Uniform));
    let mut tracker = kernel_tracker(&vm);
    let params = MigrationParams {
        streams: 2,
        ..Default::default()
    };
    let outcome = migrate(
        &vm,
        &incoming,
        params,
        &mut tracker,
        |inner| {
            let sends = AtomicUsize::new(0);
            HookedTransport::wrap(inner, move |inner, stream, memory, frames| {
                if sends.fetch_add(1, Ordering::SeqCst) == 8 {
                    inner.shutdown();
                }
                inner.send(stream, memory, frames)
            })
        },
        |_| {},
        &AtomicBool::new(false),
    );
    // Either side may notice first: the source's send fails, or the destination's receiver
    // sees its stream cut and aborts the migration.
    assert!(
        matches!(
            outcome.source,
            Err(EngineError::Transport(_) | EngineError::PeerAborted { .. })
        ),
        "{:?}",
        outcome.source.as_ref().err()
    );
    assert!(
        outcome.destination.is_err(),
        "the destination must not resume"
    );
    assert_failed_back(&vm, &outcome);
    let verify = vm.verify().unwrap();
    assert!(verify.ok, "{verify:?}");
}

#[test]
fn cancel_during_precopy_leaves_the_vm_running_on_the_source() {
    let (vm, incoming) = boot_pair(spec("cancel", 64, 50, Pattern::Uniform));
    let mut tracker = kernel_tracker(&vm);
    let params = MigrationParams {
        streams: 2,
        bandwidth_max_bytes_per_s: Some(20 << 20),
        ..Default::default()
    };
    let cancel = AtomicBool::new(false);
    let outcome = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(500));
            cancel.store(true, Ordering::SeqCst);
        });
        let started = Instant::now();
        let outcome = migrate(
            &vm,
            &incoming,
            params,
            &mut tracker,
            identity,
            |_| {},
            &cancel,
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "cancel took {:?}",
            started.elapsed()
        );
        outcome
    });
    assert!(
        matches!(outcome.source, Err(EngineError::Cancelled)),
        "{:?}",
        outcome.source.as_ref().err()
    );
    assert_failed_back(&vm, &outcome);
}

fn corrupt_stream_fails_back(bytes: Vec<u8>, expect: &str) {
    corrupt_stream_then(bytes, false, expect)
}

/// Writes `bytes` first on data stream 1 (and closes it when `close`), then migrates.
fn corrupt_stream_then(bytes: Vec<u8>, close: bool, expect: &str) {
    let (vm, incoming) = boot_pair(spec("corrupt", 16, 20, Pattern::Uniform));
    let mut tracker = kernel_tracker(&vm);
    let params = MigrationParams {
        streams: 2,
        ..Default::default()
    };
    let outcome = migrate(
        &vm,
        &incoming,
        params,
        &mut tracker,
        identity,
        |link| {
            use std::io::Write;
            if let Some(rdma) = &link.rdma {
                // Over RDMA the same headers arrive as an announcement: the receiver
                // checks them exactly as TCP's does (a short one is truncated).
                rdma.send_raw_announcement(1, &bytes).unwrap();
                return;
            }
            link.source_data[1].write_all(&bytes).unwrap();
            if close {
                link.source_data[1]
                    .shutdown(std::net::Shutdown::Write)
                    .unwrap();
            }
        },
        &AtomicBool::new(false),
    );
    let message = format!("{:?}", outcome.destination.as_ref().err());
    // When the source breaks the stream too (a closed stream fails its next send), its
    // Abort may reach the destination before the receiver's own error: then the reason
    // names the stream.
    let peer_explained = close && message.contains("PeerAborted") && message.contains("stream 1");
    assert!(
        message.contains(expect) || peer_explained,
        "expected {expect} in {message}"
    );
    assert_failed_back(&vm, &outcome);
}

#[test]
fn a_truncated_frame_fails_back() {
    // Page 256 is in block 1, stream 1's. The header promises 4 KiB; 100 bytes arrive, then EOF.
    let mut bytes = Frame::Pages {
        round: 0,
        first: 256,
        count: 1,
    }
    .encode()
    .to_vec();
    bytes.extend_from_slice(&[7; 100]);
    corrupt_stream_then(bytes, true, "Truncated");
}

#[test]
fn a_peer_that_lies_about_a_rounds_page_count_fails_back() {
    corrupt_stream_fails_back(
        Frame::RoundEnd { round: 0, pages: 5 }.encode().to_vec(),
        "CountMismatch",
    );
}

#[test]
fn a_corrupt_frame_fails_back() {
    corrupt_stream_fails_back(vec![0xAB; 40], "BadMagic");
}

#[test]
fn an_out_of_range_frame_fails_back() {
    // 16 MiB = 4096 pages; page 5000 is past the end (the checksum is right: only the range is wrong).
    corrupt_stream_fails_back(
        Frame::ZeroPages {
            round: 0,
            first: 5000,
            count: 1,
        }
        .encode()
        .to_vec(),
        "OutOfRange",
    );
}

#[test]
fn a_frame_on_the_wrong_stream_fails_back() {
    // Page 0 belongs to stream 0; this arrives on stream 1.
    corrupt_stream_fails_back(
        Frame::ZeroPages {
            round: 0,
            first: 0,
            count: 1,
        }
        .encode()
        .to_vec(),
        "WrongStream",
    );
}

#[test]
fn an_oversized_frame_fails_back() {
    corrupt_stream_fails_back(
        Frame::Pages {
            round: 0,
            first: 256,
            count: 100_000,
        }
        .encode()
        .to_vec(),
        "TooLong",
    );
}

#[test]
fn a_digest_mismatch_fails_back() {
    // A nearly idle guest: it cannot re-send all 256 corrupted pages, so the digests differ.
    let (vm, incoming) = boot_pair(spec("digest", 16, 1, Pattern::Uniform));
    let mut tracker = kernel_tracker(&vm);
    let decoy = GuestMemory::new("decoy", 16 << 20).unwrap();
    decoy.write_byte(0, 1);
    let params = MigrationParams {
        streams: 2,
        ..Default::default()
    };
    let outcome = migrate(
        &vm,
        &incoming,
        params,
        &mut tracker,
        |inner| {
            // Sends one batch of pages from another memory: the destination lands wrong bytes.
            let lied = AtomicBool::new(false);
            HookedTransport::wrap(inner, move |inner, stream, memory, frames| {
                let has_pages = frames.iter().any(|f| matches!(f, Frame::Pages { .. }));
                if has_pages && !lied.swap(true, Ordering::SeqCst) {
                    return inner.send(stream, &decoy, frames);
                }
                inner.send(stream, memory, frames)
            })
        },
        |_| {},
        &AtomicBool::new(false),
    );
    if support::over_rdma() {
        // RDMA cannot even send the lie: the device only reads memory registered for the
        // link, so the send fails before a wrong byte lands (the disk suite's corrupted
        // chunk shows the digest catching a payload changed after hashing over RDMA).
        let message = format!("{:?}", outcome.source.as_ref().err());
        assert!(message.contains("UnregisteredMemory"), "{message}");
    } else {
        assert!(
            matches!(outcome.destination, Err(EngineError::DigestMismatch { .. })),
            "{:?}",
            outcome.destination.as_ref().err()
        );
    }
    assert_failed_back(&vm, &outcome);
}

#[test]
fn a_guest_that_outruns_the_link_is_throttled_and_still_moves_intact() {
    // 300 MB/s of dirtying against a 60 MB/s link: pre-copy cannot converge by itself.
    let (vm, incoming) = boot_pair(spec("throttle", 32, 300, Pattern::Uniform));
    let mut tracker = kernel_tracker(&vm);
    let params = MigrationParams {
        streams: 2,
        downtime_ms: 20,
        rounds_max: 12,
        bandwidth_max_bytes_per_s: Some(60 << 20),
        ..Default::default()
    };
    let outcome = migrate_plainly(&vm, &incoming, params, &mut tracker);
    let report = outcome.source.expect("migration succeeds");
    assert!(
        report.throttle_percent_max >= 20,
        "the vCPUs were never throttled: {report:?}"
    );
    assert!(report.rounds >= 2, "{report:?}");
    let verify = incoming.verify().unwrap();
    assert!(verify.ok, "{verify:?}");
    // The destination runs at full speed: the throttle stays with the source.
    assert_eq!(incoming.status().throttle_percent, 0);
    steps_increase(&incoming);
}

#[test]
fn collections_with_the_vcpus_stopped_see_still_memory_and_the_vm_moves_intact() {
    for mode in [CollectPause::Always, CollectPause::Never] {
        let (vm, incoming) = boot_pair(spec("collect-pause", 64, 100, Pattern::Uniform));
        std::thread::sleep(Duration::from_millis(50));
        let memory = Arc::clone(vm.memory());
        // Per collection: whether guest memory changed while it ran.
        let changed = Arc::new(Mutex::new(Vec::new()));
        let mut tracker = HookedTracker::new(kernel_tracker(&vm)).on_collect({
            let changed = Arc::clone(&changed);
            move |set| {
                let before = xxh3_64(memory.pages_slice(0, memory.pages()));
                std::thread::sleep(Duration::from_millis(30));
                let after = xxh3_64(memory.pages_slice(0, memory.pages()));
                changed.lock().unwrap().push(before != after);
                set
            }
        });
        let params = MigrationParams {
            streams: 2,
            collect_pause: mode,
            ..Default::default()
        };
        let outcome = migrate_plainly(&vm, &incoming, params, &mut tracker);
        let report = outcome.source.expect("migration succeeds");
        let incoming_report = outcome.destination.expect("destination resumes");
        assert_eq!(report.memory_digest, incoming_report.memory_digest);
        let verify = incoming.verify().unwrap();
        assert!(verify.ok, "{mode}: {verify:?}");
        let rounds = &report.timeline.rounds;
        let changed = changed.lock().unwrap().clone();
        assert_eq!(
            changed.len(),
            rounds.len() + 1,
            "one collection per pre-copy round, then the pause's"
        );
        assert!(
            !changed[rounds.len()],
            "the pause's collection sees still memory"
        );
        let precopy = &changed[..rounds.len()];
        match mode {
            CollectPause::Always => {
                assert_eq!(report.collect_pauses as usize, rounds.len(), "{report:?}");
                assert!(
                    rounds
                        .iter()
                        .all(|r| r.collect_paused && r.collect_ms >= 30.0),
                    "{rounds:?}"
                );
                assert!(
                    precopy.iter().all(|c| !c),
                    "memory changed while the vCPUs were stopped: {precopy:?}"
                );
                assert!(report.collect_pause_ms_max >= 30.0);
                assert!(report.collect_pause_ms_total >= report.collect_pause_ms_max);
            }
            _ => {
                assert_eq!(report.collect_pauses, 0, "{report:?}");
                assert!(rounds.iter().all(|r| !r.collect_paused), "{rounds:?}");
                assert!(
                    precopy.iter().all(|c| *c),
                    "the vCPUs did not run through a collection: {precopy:?}"
                );
            }
        }
        steps_increase(&incoming);
    }
}

#[test]
fn a_collection_failing_with_the_vcpus_stopped_fails_back_with_them_running() {
    let (vm, incoming) = boot_pair(spec("collect-fail", 32, 100, Pattern::Uniform));
    let mut tracker = HookedTracker::new(kernel_tracker(&vm)).fail_collect_at(1);
    let params = MigrationParams {
        streams: 2,
        collect_pause: CollectPause::Always,
        ..Default::default()
    };
    let outcome = migrate_plainly(&vm, &incoming, params, &mut tracker);
    assert!(
        matches!(outcome.source, Err(EngineError::Tracker(_))),
        "{:?}",
        outcome.source
    );
    assert_failed_back(&vm, &outcome);
}
