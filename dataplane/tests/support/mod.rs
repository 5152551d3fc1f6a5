#![allow(dead_code)] // each test binary uses a different part of the harness
//! Shared harness for the engine tests: a loopback link, one migration with optional fault
//! injection, and the hooks that inject it at the seams (tracker, transport).

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_dataplane::disk::{DirectIo, DiskImage, VirtualDisk};
use ferry_dataplane::engine::destination::{migrate_in, DestinationContext, IncomingReport};
use ferry_dataplane::engine::source::{migrate_out, SourceContext};
use ferry_dataplane::engine::{EngineError, MigrationParams, MigrationReport, Progress};
use ferry_dataplane::guest::reference::{DiskPattern, DiskSpec};
use ferry_dataplane::guest::reference::{Pattern, ReferenceVm, VmSpec};
use ferry_dataplane::guest::Guest;
use ferry_dataplane::memory::tracker::UffdWpTracker;
use ferry_dataplane::memory::{DirtyBitmap, DirtyTracker, GuestMemory, PageArmer, TrackerError};
use ferry_dataplane::transport::rdma::link::UnauthenticatedLanes;
use ferry_dataplane::transport::rdma::memory::RdmaSource;
use ferry_dataplane::transport::rdma::session::{
    connect_outgoing, IncomingRdma, IncomingTransports,
};
use ferry_dataplane::transport::rdma::test_addresses;
use ferry_dataplane::transport::tcp::{TcpDestination, TcpSource};
use ferry_dataplane::transport::tcp_disk::{TcpDiskDestination, TcpDiskSource};
use ferry_dataplane::transport::{DiskSource, SourceTransport, TransportError};
use ferry_dataplane::wire::Frame;

pub fn spec(name: &str, mib: u64, rate_mb: u64, pattern: Pattern) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_bytes: mib << 20,
        vcpus: 2,
        dirty_rate_bytes_per_s: rate_mb << 20,
        pattern,
        seed: 42,
        fill_percent: 100,
        disk: None,
    }
}

/// A booted source VM and an incoming VM of the same spec on the "destination".
pub fn boot_pair(spec: VmSpec) -> (ReferenceVm, ReferenceVm) {
    let source = ReferenceVm::boot(spec).expect("booting the source VM");
    let incoming = ReferenceVm::incoming(source.spec().clone()).expect("creating the incoming VM");
    (source, incoming)
}

/// The kernel dirty tracker over `vm`'s memory.
pub fn kernel_tracker(vm: &ReferenceVm) -> UffdWpTracker {
    UffdWpTracker::new(Arc::clone(vm.memory())).expect("registering the uffd-wp tracker")
}

pub struct Link {
    /// The source's RDMA memory transport, when the tests run over RDMA
    /// (`FERRY_TEST_TRANSPORT=rdma`, inside ../shared/rxe-vm): memory and disk then travel
    /// over RDMA lanes and the TCP data streams stay idle.
    pub rdma: Option<Arc<RdmaSource>>,
    pub source_control: TcpStream,
    pub source_data: Vec<TcpStream>,
    pub destination_control: TcpStream,
    pub destination_data: Vec<TcpStream>,
    /// Bulk and mirror lanes, when the VM has disks.
    pub source_disk: Vec<TcpStream>,
    pub destination_disk: Vec<TcpStream>,
}

/// The engine tests run over RDMA when `FERRY_TEST_TRANSPORT=rdma` (CI sets it inside the
/// soft-RoCE VM); TCP otherwise.
pub fn over_rdma() -> bool {
    std::env::var("FERRY_TEST_TRANSPORT").is_ok_and(|v| v == "rdma")
}

static RDMA_SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Both sides' RDMA transports for one migration between `vm` and `incoming`.
fn rdma_pair(
    vm: &ReferenceVm,
    incoming: &ReferenceVm,
    streams: usize,
    disks: bool,
) -> (
    ferry_dataplane::transport::rdma::session::OutgoingTransports,
    IncomingTransports,
) {
    let (a, b) = test_addresses().expect("FERRY_TEST_TRANSPORT=rdma needs an RDMA device");
    let session = RDMA_SESSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let listening = IncomingRdma::listen(b, Arc::clone(incoming.memory())).unwrap();
    let port = listening.port();
    let deadline = Instant::now() + Duration::from_secs(30);
    let sizes: Option<Vec<u64>> = disks.then(|| vm.disks().iter().map(|d| d.size()).collect());
    std::thread::scope(|s| {
        let accept = s.spawn(|| {
            listening.accept(
                session,
                streams,
                disks,
                &UnauthenticatedLanes,
                deadline,
                &AtomicBool::new(false),
            )
        });
        let out = connect_outgoing(
            (a, std::net::SocketAddr::new(b, port)),
            session,
            streams,
            sizes,
            Arc::clone(vm.memory()),
            &UnauthenticatedLanes,
            deadline,
        )
        .unwrap();
        (out, accept.join().unwrap().unwrap())
    })
}

pub fn link(streams: usize) -> Link {
    link_with_disks(streams, false)
}

pub fn link_with_disks(streams: usize, disks: bool) -> Link {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let pair = || {
        let a = TcpStream::connect(addr).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    };
    let (source_control, destination_control) = pair();
    let (source_data, destination_data) = (0..streams).map(|_| pair()).unzip();
    let (source_disk, destination_disk) = (0..if disks { 2 } else { 0 }).map(|_| pair()).unzip();
    Link {
        rdma: None,
        source_control,
        source_data,
        destination_control,
        destination_data,
        source_disk,
        destination_disk,
    }
}

/// A spec with a disk of `disk_mib` MiB written at `disk_rate_mb` MB/s.
pub fn disk_spec(
    name: &str,
    mib: u64,
    rate_mb: u64,
    disk_mib: u64,
    disk_rate_mb: u64,
    pattern: DiskPattern,
) -> VmSpec {
    VmSpec {
        disk: Some(DiskSpec {
            bytes: disk_mib << 20,
            write_rate_bytes_per_s: disk_rate_mb << 20,
            pattern,
            fill_percent: 50,
        }),
        ..spec(name, mib, rate_mb, Pattern::Uniform)
    }
}

/// A source VM with a disk image in `dir`, and an incoming VM with a fresh image there.
pub fn boot_pair_with_disk(spec: VmSpec, dir: &std::path::Path) -> (ReferenceVm, ReferenceVm) {
    let bytes = spec.disk.as_ref().expect("a spec with a disk").bytes;
    let image = |name: &str| {
        Arc::new(VirtualDisk::new(
            DiskImage::create(&dir.join(name), bytes, DirectIo::Auto).expect("creating an image"),
        ))
    };
    let source = ReferenceVm::boot_with_disk(spec, Some(image("source.img")))
        .expect("booting the source VM");
    let incoming =
        ReferenceVm::incoming_with_disk(source.spec().clone(), Some(image("destination.img")))
            .expect("creating the incoming VM");
    (source, incoming)
}

/// Replaces a transport (to fail, delay or lie).
pub type Wrap<'a, T> = Box<dyn FnOnce(Arc<T>) -> Arc<T> + 'a>;

/// Hooks of [`migrate_with`].
pub struct Hooks<'a> {
    pub wrap: Wrap<'a, dyn SourceTransport>,
    pub wrap_disk: Wrap<'a, dyn DiskSource>,
    pub before: Box<dyn FnOnce(&mut Link) + 'a>,
    pub on_progress: Box<dyn FnMut(&Progress) + 'a>,
}

impl Default for Hooks<'_> {
    fn default() -> Self {
        Self {
            wrap: Box::new(identity),
            wrap_disk: Box::new(|d| d),
            before: Box::new(|_| {}),
            on_progress: Box::new(|_| {}),
        }
    }
}

pub struct Outcome {
    pub source: Result<MigrationReport, EngineError>,
    pub destination: Result<IncomingReport, EngineError>,
}

/// Runs one migration from `vm` to a fresh incoming VM; `wrap` may replace the source
/// transport, `tracker` the dirty tracker, `before` runs on the raw sockets first.
pub fn migrate(
    vm: &ReferenceVm,
    incoming: &ReferenceVm,
    params: MigrationParams,
    tracker: &mut dyn DirtyTracker,
    wrap: impl FnOnce(Arc<dyn SourceTransport>) -> Arc<dyn SourceTransport>,
    before: impl FnOnce(&mut Link),
    cancel: &AtomicBool,
) -> Outcome {
    let hooks = Hooks {
        wrap: Box::new(wrap),
        before: Box::new(before),
        ..Hooks::default()
    };
    migrate_with(vm, incoming, params, tracker, hooks, cancel)
}

/// [`migrate`] with no transport wrapper, no hook on the link and no cancel.
pub fn migrate_plainly(
    vm: &ReferenceVm,
    incoming: &ReferenceVm,
    params: MigrationParams,
    tracker: &mut dyn DirtyTracker,
) -> Outcome {
    migrate(
        vm,
        incoming,
        params,
        tracker,
        identity,
        |_| {},
        &AtomicBool::new(false),
    )
}

/// [`migrate`] with every hook, and with disk links when the VM has disks (the source then
/// traces after the bulk copy, as the agent does).
pub fn migrate_with(
    vm: &ReferenceVm,
    incoming: &ReferenceVm,
    params: MigrationParams,
    tracker: &mut dyn DirtyTracker,
    hooks: Hooks<'_>,
    cancel: &AtomicBool,
) -> Outcome {
    let Hooks {
        wrap,
        wrap_disk,
        before,
        mut on_progress,
    } = hooks;
    let has_disks = !vm.disks().is_empty();
    let mut link = link_with_disks(params.streams, has_disks);
    let rdma_incoming = over_rdma().then(|| {
        let (out, inc) = rdma_pair(vm, incoming, params.streams, has_disks);
        let source = Arc::new(out.memory);
        link.rdma = Some(source.clone());
        (source, out.disk, inc)
    });
    before(&mut link);
    let Link {
        rdma: _,
        source_control,
        source_data,
        destination_control,
        destination_data,
        source_disk,
        destination_disk,
    } = link;
    let sizes: Vec<u64> = vm.disks().iter().map(|d| d.size()).collect();
    let (transport, disk_link, disk_transport, destination_transport) = match rdma_incoming {
        Some((source, disk_source, incoming_transports)) => (
            wrap(source as Arc<dyn SourceTransport>),
            disk_source.map(|d| wrap_disk(Arc::new(d))),
            incoming_transports
                .disk
                .map(|d| Box::new(d) as Box<dyn ferry_dataplane::transport::DiskDestination>),
            Box::new(incoming_transports.memory)
                as Box<dyn ferry_dataplane::transport::DestinationTransport>,
        ),
        None => {
            let transport = wrap(Arc::new(TcpSource::new(source_data).unwrap()));
            let (disk_link, disk_transport) = if has_disks {
                let mut s = source_disk.into_iter();
                let mut d = destination_disk.into_iter();
                let source =
                    TcpDiskSource::new(s.next().unwrap(), s.next().unwrap(), sizes, params.streams)
                        .unwrap();
                let destination: Box<dyn ferry_dataplane::transport::DiskDestination> = Box::new(
                    TcpDiskDestination::new(d.next().unwrap(), d.next().unwrap(), params.streams)
                        .unwrap(),
                );
                (Some(wrap_disk(Arc::new(source))), Some(destination))
            } else {
                (None, None)
            };
            (
                transport,
                disk_link,
                disk_transport,
                Box::new(TcpDestination::new(destination_data).unwrap())
                    as Box<dyn ferry_dataplane::transport::DestinationTransport>,
            )
        }
    };
    let destination_cancel = AtomicBool::new(false);
    std::thread::scope(|s| {
        let destination = s.spawn(|| {
            migrate_in(DestinationContext {
                guest: incoming,
                control: destination_control,
                transport: destination_transport,
                disk_transport,
                fresh_disks: true,
                start_paused: params.start_paused,
                cancel: &destination_cancel,
                journal: &ferry_dataplane::engine::barrier::VolatileJournal,
            })
        });
        let source = migrate_out(
            SourceContext {
                guest: vm,
                tracker,
                disk_link,
                control: source_control,
                transport,
                params: &params,
                started: Instant::now(),
                prefault_ms: incoming.prefault_ms(),
                cancel,
                journal: &ferry_dataplane::engine::barrier::VolatileJournal,
            },
            &mut *on_progress,
        );
        Outcome {
            source,
            destination: destination.join().unwrap(),
        }
    })
}

pub fn steps_increase(vm: &ReferenceVm) {
    let before = vm.status().total_steps;
    std::thread::sleep(Duration::from_millis(200));
    let after = vm.status().total_steps;
    assert!(
        after > before,
        "the VM is not running: steps {before} -> {after}"
    );
}

pub fn assert_failed_back(vm: &ReferenceVm, outcome: &Outcome) {
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

pub fn identity(t: Arc<dyn SourceTransport>) -> Arc<dyn SourceTransport> {
    t
}

/// What a hooked send does instead: it gets the real transport to call or not.
type SendHook = dyn Fn(&dyn SourceTransport, usize, &GuestMemory, &[Frame]) -> Result<u64, TransportError>
    + Send
    + Sync;

/// A transport whose sends go through a test's hook (to fail, delay or lie).
pub struct HookedTransport {
    inner: Arc<dyn SourceTransport>,
    on_send: Box<SendHook>,
}

impl HookedTransport {
    /// Wraps `inner`; every send goes through `on_send`.
    pub fn wrap(
        inner: Arc<dyn SourceTransport>,
        on_send: impl Fn(&dyn SourceTransport, usize, &GuestMemory, &[Frame]) -> Result<u64, TransportError>
            + Send
            + Sync
            + 'static,
    ) -> Arc<dyn SourceTransport> {
        Arc::new(Self {
            inner,
            on_send: Box::new(on_send),
        })
    }
}

impl SourceTransport for HookedTransport {
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
        (self.on_send)(self.inner.as_ref(), stream, memory, frames)
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// A tracker whose collections and put-backs pass through a test's hooks.
pub struct HookedTracker<T> {
    inner: T,
    on_collect: Box<dyn FnMut(DirtyBitmap) -> DirtyBitmap + Send>,
    on_put_back: Box<dyn FnMut(&DirtyBitmap) + Send>,
    /// Collections so far, and the one (1-based) that fails instead.
    collects: u32,
    fail_collect: Option<u32>,
}

impl<T: DirtyTracker> HookedTracker<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            on_collect: Box::new(|set| set),
            on_put_back: Box::new(|_| {}),
            collects: 0,
            fail_collect: None,
        }
    }

    /// Collection number `n` (1-based) fails after the real one ran, as a scan that died
    /// half-way would.
    pub fn fail_collect_at(mut self, n: u32) -> Self {
        self.fail_collect = Some(n);
        self
    }

    /// Sees (and may replace) every collected set.
    pub fn on_collect(
        mut self,
        hook: impl FnMut(DirtyBitmap) -> DirtyBitmap + Send + 'static,
    ) -> Self {
        self.on_collect = Box::new(hook);
        self
    }

    /// Sees every put-back set (which still reaches the real tracker).
    pub fn on_put_back(mut self, hook: impl FnMut(&DirtyBitmap) + Send + 'static) -> Self {
        self.on_put_back = Box::new(hook);
        self
    }
}

impl<T: DirtyTracker> DirtyTracker for HookedTracker<T> {
    fn start(&mut self) -> Result<(), TrackerError> {
        self.inner.start()
    }
    fn start_deferred(&mut self) -> Result<Arc<dyn PageArmer>, TrackerError> {
        self.inner.start_deferred()
    }
    fn collect(&mut self) -> Result<DirtyBitmap, TrackerError> {
        self.collects += 1;
        let set = self.inner.collect()?;
        if self.fail_collect == Some(self.collects) {
            return Err(TrackerError::Syscall {
                op: "PAGEMAP_SCAN",
                source: std::io::Error::other("injected by the test"),
            });
        }
        Ok((self.on_collect)(set))
    }
    fn put_back(&mut self, pages: &DirtyBitmap) {
        (self.on_put_back)(pages);
        self.inner.put_back(pages)
    }
    fn name(&self) -> &'static str {
        "hooked"
    }
}
