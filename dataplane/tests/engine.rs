//! The migration engine end to end in one process: a real reference VM, the real uffd-wp
//! tracker, real TCP on loopback. Faults are injected through wrappers at the seams
//! (tracker, transport) and through raw bytes on the sockets.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_dataplane::engine::destination::{migrate_in, DestinationContext, IncomingReport};
use ferry_dataplane::engine::source::{migrate_out, trace, SourceContext};
use ferry_dataplane::engine::{EngineError, MigrationParams, MigrationReport};
use ferry_dataplane::guest::reference::{Pattern, ReferenceVm, VmSpec};
use ferry_dataplane::guest::Guest;
use ferry_dataplane::memory::tracker::UffdWpTracker;
use ferry_dataplane::memory::{DirtyBitmap, DirtyTracker, GuestMemory, TrackerError};
use ferry_dataplane::transport::tcp::{TcpDestination, TcpSource};
use ferry_dataplane::transport::{SourceTransport, TransportError};
use ferry_dataplane::wire::Frame;

fn spec(name: &str, mib: u64, rate_mb: u64, pattern: Pattern) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_bytes: mib << 20,
        vcpus: 2,
        dirty_rate_bytes_per_s: rate_mb << 20,
        pattern,
        seed: 42,
        fill_percent: 100,
    }
}

struct Link {
    source_control: TcpStream,
    source_data: Vec<TcpStream>,
    destination_control: TcpStream,
    destination_data: Vec<TcpStream>,
}

fn link(streams: usize) -> Link {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let pair = || {
        let a = TcpStream::connect(addr).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    };
    let (source_control, destination_control) = pair();
    let (source_data, destination_data) = (0..streams).map(|_| pair()).unzip();
    Link {
        source_control,
        source_data,
        destination_control,
        destination_data,
    }
}

struct Outcome {
    source: Result<MigrationReport, EngineError>,
    destination: Result<IncomingReport, EngineError>,
}

/// Runs one migration from `vm` to a fresh incoming VM; `wrap` may replace the source
/// transport, `tracker` the dirty tracker, `before` runs on the raw sockets first.
fn migrate(
    vm: &ReferenceVm,
    incoming: &ReferenceVm,
    params: MigrationParams,
    tracker: &mut dyn DirtyTracker,
    wrap: impl FnOnce(Arc<dyn SourceTransport>) -> Arc<dyn SourceTransport>,
    before: impl FnOnce(&mut Link),
    cancel: &AtomicBool,
) -> Outcome {
    let mut link = link(params.streams);
    before(&mut link);
    let Link {
        source_control,
        source_data,
        destination_control,
        destination_data,
    } = link;
    let transport = wrap(Arc::new(TcpSource::new(source_data).unwrap()));
    let destination_cancel = AtomicBool::new(false);
    std::thread::scope(|s| {
        let destination = s.spawn(|| {
            migrate_in(DestinationContext {
                guest: incoming,
                control: destination_control,
                transport: Box::new(TcpDestination::new(destination_data).unwrap()),
                cancel: &destination_cancel,
            })
        });
        let source = trace(vm, tracker, cancel).and_then(|trace| {
            migrate_out(
                SourceContext {
                    guest: vm,
                    tracker,
                    trace,
                    control: source_control,
                    transport,
                    params: &params,
                    started: Instant::now(),
                    prefault_ms: incoming.prefault_ms(),
                    cancel,
                },
                &mut |_| {},
            )
        });
        Outcome {
            source,
            destination: destination.join().unwrap(),
        }
    })
}

fn steps_increase(vm: &ReferenceVm) {
    let before = vm.status().total_steps;
    std::thread::sleep(Duration::from_millis(200));
    let after = vm.status().total_steps;
    assert!(
        after > before,
        "the VM is not running: steps {before} -> {after}"
    );
}

fn assert_failed_back(vm: &ReferenceVm, outcome: &Outcome) {
    assert!(
        outcome.source.is_err(),
        "source should have failed: {:?}",
        outcome.source
    );
    assert!(
        outcome.destination.is_err(),
        "destination should have failed"
    );
    assert!(
        vm.status().running,
        "source VM must run again after fail-back"
    );
    steps_increase(vm);
    let report = vm.verify().unwrap();
    assert!(
        report.ok,
        "source VM must verify after fail-back: {report:?}"
    );
}

fn identity(t: Arc<dyn SourceTransport>) -> Arc<dyn SourceTransport> {
    t
}

#[test]
fn busy_vm_moves_and_verifies_on_the_destination() {
    for pattern in [Pattern::Uniform, Pattern::Hotset, Pattern::Sweep] {
        let vm = ReferenceVm::boot(spec("e2e", 64, 100, pattern)).unwrap();
        let incoming = ReferenceVm::incoming(vm.spec().clone()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut tracker = UffdWpTracker::new(Arc::clone(vm.memory())).unwrap();
        let params = MigrationParams {
            streams: 3,
            ..Default::default()
        };
        let outcome = migrate(
            &vm,
            &incoming,
            params,
            &mut tracker,
            identity,
            |_| {},
            &AtomicBool::new(false),
        );
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
        steps_increase(&incoming);
        let verify = incoming.verify().unwrap();
        assert!(verify.ok, "{pattern}: {verify:?}");
        assert!(
            verify.steps.iter().sum::<u64>() > vm.status().total_steps,
            "destination continued past the source's steps"
        );
    }
}

/// Drops one collection: the pages in it are never sent again.
struct DroppingTracker<T> {
    inner: T,
    drop_collection: usize,
    collections: usize,
    dropped_pages: usize,
}

impl<T: DirtyTracker> DirtyTracker for DroppingTracker<T> {
    fn start(&mut self) -> Result<(), TrackerError> {
        self.inner.start()
    }
    fn collect(&mut self) -> Result<DirtyBitmap, TrackerError> {
        let set = self.inner.collect()?;
        self.collections += 1;
        if self.collections == self.drop_collection {
            self.dropped_pages = set.count();
            return Ok(DirtyBitmap::new(set.pages()));
        }
        Ok(set)
    }
    fn put_back(&mut self, pages: &DirtyBitmap) {
        self.inner.put_back(pages)
    }
    fn name(&self) -> &'static str {
        "dropping"
    }
}

/// The loss must be caught. Usually by `verify` on the destination: the engine itself cannot
/// see pages the tracker never reported. Sometimes earlier, by the lock-step digest: a
/// dropped page that the guest wrote between being hashed and being sent makes the two
/// sides' digests differ, and the migration fails back. Either way nothing passes silently.
#[test]
fn a_tracker_that_drops_one_collection_is_caught() {
    let vm = ReferenceVm::boot(spec("drop", 64, 200, Pattern::Uniform)).unwrap();
    let incoming = ReferenceVm::incoming(vm.spec().clone()).unwrap();
    // A downtime target of 0 never converges, so there are exactly `rounds_max` pre-copy
    // rounds. The second collection (pages written during round 1) is dropped: those pages
    // were last sent with the bytes the source hashed, so usually only verify can tell.
    let params = MigrationParams {
        streams: 2,
        downtime_ms: 0,
        rounds_max: 4,
        ..Default::default()
    };
    let mut tracker = DroppingTracker {
        inner: UffdWpTracker::new(Arc::clone(vm.memory())).unwrap(),
        drop_collection: 2,
        collections: 0,
        dropped_pages: 0,
    };
    let outcome = migrate(
        &vm,
        &incoming,
        params,
        &mut tracker,
        identity,
        |_| {},
        &AtomicBool::new(false),
    );
    assert!(
        tracker.dropped_pages > 0,
        "the dropped collection was empty"
    );
    match outcome.source {
        Ok(_) => {
            let verify = incoming.verify().unwrap();
            assert!(
                !verify.ok,
                "verify must catch the {} lost pages",
                tracker.dropped_pages
            );
            assert!(verify.mismatched_pages > 0 && !verify.first_mismatches.is_empty());
            eprintln!(
                "caught by verify: {} of {} dropped pages stale",
                verify.mismatched_pages, tracker.dropped_pages
            );
        }
        Err(EngineError::DigestMismatch { .. }) => {
            eprintln!("caught by the lock-step digest before the commit point");
            assert_failed_back(&vm, &outcome);
        }
        Err(other) => panic!("unexpected failure: {other}"),
    }
}

/// Fails every send after the first `ok_sends`.
struct FailingTransport {
    inner: Arc<dyn SourceTransport>,
    ok_sends: usize,
    sends: AtomicUsize,
}

impl SourceTransport for FailingTransport {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn streams(&self) -> usize {
        self.inner.streams()
    }
    fn send(
        &self,
        stream: usize,
        memory: &GuestMemory,
        frames: &[Frame],
    ) -> Result<u64, TransportError> {
        if self.sends.fetch_add(1, Ordering::SeqCst) >= self.ok_sends {
            return Err(TransportError::Io {
                stream,
                op: "sending pages",
                source: std::io::ErrorKind::BrokenPipe.into(),
            });
        }
        self.inner.send(stream, memory, frames)
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// Records what is put back.
struct RecordingTracker<T> {
    inner: T,
    put_back_pages: Arc<AtomicU64>,
}

impl<T: DirtyTracker> DirtyTracker for RecordingTracker<T> {
    fn start(&mut self) -> Result<(), TrackerError> {
        self.inner.start()
    }
    fn collect(&mut self) -> Result<DirtyBitmap, TrackerError> {
        self.inner.collect()
    }
    fn put_back(&mut self, pages: &DirtyBitmap) {
        self.put_back_pages
            .fetch_add(pages.count() as u64, Ordering::SeqCst);
        self.inner.put_back(pages)
    }
    fn name(&self) -> &'static str {
        "recording"
    }
}

#[test]
fn a_failed_send_puts_the_dirty_set_back_and_fails_back() {
    let vm = ReferenceVm::boot(spec("putback", 32, 50, Pattern::Uniform)).unwrap();
    let incoming = ReferenceVm::incoming(vm.spec().clone()).unwrap();
    let put_back = Arc::new(AtomicU64::new(0));
    let mut tracker = RecordingTracker {
        inner: UffdWpTracker::new(Arc::clone(vm.memory())).unwrap(),
        put_back_pages: Arc::clone(&put_back),
    };
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
            Arc::new(FailingTransport {
                inner,
                ok_sends: 5,
                sends: AtomicUsize::new(0),
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

#[test]
fn cancel_during_precopy_leaves_the_vm_running_on_the_source() {
    let vm = ReferenceVm::boot(spec("cancel", 64, 50, Pattern::Uniform)).unwrap();
    let incoming = ReferenceVm::incoming(vm.spec().clone()).unwrap();
    let mut tracker = UffdWpTracker::new(Arc::clone(vm.memory())).unwrap();
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
    let vm = ReferenceVm::boot(spec("corrupt", 16, 20, Pattern::Uniform)).unwrap();
    let incoming = ReferenceVm::incoming(vm.spec().clone()).unwrap();
    let mut tracker = UffdWpTracker::new(Arc::clone(vm.memory())).unwrap();
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

/// Sends one batch of pages from another memory: the destination lands wrong bytes.
struct LyingTransport {
    inner: Arc<dyn SourceTransport>,
    decoy: GuestMemory,
    lied: Mutex<bool>,
}

impl SourceTransport for LyingTransport {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn streams(&self) -> usize {
        self.inner.streams()
    }
    fn send(
        &self,
        stream: usize,
        memory: &GuestMemory,
        frames: &[Frame],
    ) -> Result<u64, TransportError> {
        let mut lied = self.lied.lock().unwrap();
        if !*lied && frames.iter().any(|f| matches!(f, Frame::Pages { .. })) {
            *lied = true;
            return self.inner.send(stream, &self.decoy, frames);
        }
        drop(lied);
        self.inner.send(stream, memory, frames)
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

#[test]
fn a_digest_mismatch_fails_back() {
    // A nearly idle guest: it cannot re-send all 256 corrupted pages, so the digests differ.
    let vm = ReferenceVm::boot(spec("digest", 16, 1, Pattern::Uniform)).unwrap();
    let incoming = ReferenceVm::incoming(vm.spec().clone()).unwrap();
    let mut tracker = UffdWpTracker::new(Arc::clone(vm.memory())).unwrap();
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
            Arc::new(LyingTransport {
                inner,
                decoy,
                lied: Mutex::new(false),
            })
        },
        |_| {},
        &AtomicBool::new(false),
    );
    assert!(
        matches!(outcome.destination, Err(EngineError::DigestMismatch { .. })),
        "{:?}",
        outcome.destination.as_ref().err()
    );
    assert_failed_back(&vm, &outcome);
}

#[test]
fn a_guest_that_outruns_the_link_is_throttled_and_still_moves_intact() {
    // 300 MB/s of dirtying against a 60 MB/s link: pre-copy cannot converge by itself.
    let vm = ReferenceVm::boot(spec("throttle", 32, 300, Pattern::Uniform)).unwrap();
    let incoming = ReferenceVm::incoming(vm.spec().clone()).unwrap();
    let mut tracker = UffdWpTracker::new(Arc::clone(vm.memory())).unwrap();
    let params = MigrationParams {
        streams: 2,
        downtime_ms: 20,
        rounds_max: 12,
        bandwidth_max_bytes_per_s: Some(60 << 20),
        ..Default::default()
    };
    let outcome = migrate(
        &vm,
        &incoming,
        params,
        &mut tracker,
        identity,
        |_| {},
        &AtomicBool::new(false),
    );
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
