//! The one place ferry calls libibverbs and librdmacm.
//!
//! Bindings come from `rdma-mummy-sys`: a static shim that `dlopen`s `libibverbs.so.1` and
//! `librdmacm.so.1` when the process starts and answers `EOPNOTSUPP` for every call when
//! they are missing. So the `ferry` binary starts, and works over TCP, on a host without
//! rdma-core; [`probe`] says why RDMA is unusable there. (docs/design.md explains why this
//! crate and not `sideway` or `rdma-sys`.)
//!
//! Everything here is a thin owner of one C object, freed in `Drop`, plus the calls on it.
//! What the types guarantee:
//!
//! - A queue pair can only post sends and RDMA writes as a [`ConnectedQp`], which exists
//!   only once rdma_cm reported the connection *established* ([`PendingQp::connect`],
//!   [`PendingQp::accept`]): a half-connected QP cannot be used. A [`PendingQp`] may post
//!   receives (a passive side must, before it accepts, or the peer's first send finds no
//!   buffer).
//! - Memory the device reads or writes is registered as a [`MemoryRegion`], which borrows
//!   nothing: its owner ([`RegisteredBuffer`], or a caller that keeps the memory alive,
//!   see [`MemoryRegion::register`]) outlives it. Work requests name memory by
//!   `(lkey, addr, len)`, checked against the region they claim to be in.
//! - Completion queues are polled and armed by their one owner; their event channel's fd
//!   is readable when armed and a completion arrived, so a thread can `poll` several.

use std::ffi::CStr;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_mummy_sys as sys;

use super::RdmaError;

fn last_error(op: &'static str) -> RdmaError {
    RdmaError::Verbs {
        op,
        source: std::io::Error::last_os_error(),
    }
}

fn errno_error(op: &'static str, errno: i32) -> RdmaError {
    RdmaError::Verbs {
        op,
        source: std::io::Error::from_raw_os_error(errno),
    }
}

/// The RDMA devices of this host (names, e.g. `rxe0`), or why there are none usable.
pub fn probe() -> Result<Vec<String>, RdmaError> {
    let mut count: i32 = 0;
    // SAFETY: `count` is a valid out-pointer; the returned list (or NULL on error) is
    // read only up to `count` entries and freed once below.
    let list = unsafe { sys::ibv_get_device_list(&mut count) };
    if list.is_null() {
        let err = std::io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            RdmaError::NoLibrary
        } else if matches!(
            err.raw_os_error(),
            Some(libc::ENOSYS | libc::ENODEV | libc::ENOENT)
        ) {
            // libibverbs answers ENOSYS when the kernel has no RDMA subsystem at all.
            RdmaError::NoKernelSupport
        } else {
            RdmaError::Verbs {
                op: "listing RDMA devices",
                source: err,
            }
        });
    }
    let mut names = Vec::with_capacity(count.max(0) as usize);
    for i in 0..count.max(0) as usize {
        // SAFETY: `list` has `count` valid device pointers (ibv_get_device_list's contract);
        // ibv_get_device_name returns a NUL-terminated string owned by the device, which
        // lives until the list is freed; it is copied out before that.
        let name = unsafe {
            let device = *list.add(i);
            let name = sys::ibv_get_device_name(device);
            if name.is_null() {
                continue;
            }
            CStr::from_ptr(name).to_string_lossy().into_owned()
        };
        names.push(name);
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed exactly once.
    unsafe { sys::ibv_free_device_list(list) };
    if names.is_empty() {
        return Err(RdmaError::NoDevice);
    }
    Ok(names)
}

/// An rdma_cm event channel: every connection manager event of the ids created on it.
pub struct EventChannel(NonNull<sys::rdma_event_channel>);

// SAFETY: librdmacm event channels are used from any thread (the library locks inside);
// ferry reads events from one thread at a time (the owner of the `&mut` or the monitor).
unsafe impl Send for EventChannel {}
// SAFETY: as above; the only `&self` operations are reading the fd and getting events,
// which librdmacm serialises.
unsafe impl Sync for EventChannel {}

impl EventChannel {
    pub fn new() -> Result<Arc<Self>, RdmaError> {
        // SAFETY: no arguments; a NULL return is an error with errno set.
        let channel = unsafe { sys::rdma_create_event_channel() };
        match NonNull::new(channel) {
            Some(c) => Ok(Arc::new(Self(c))),
            None => {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    Err(RdmaError::NoLibrary)
                } else {
                    Err(RdmaError::Verbs {
                        op: "creating an rdma_cm event channel",
                        source: err,
                    })
                }
            }
        }
    }

    pub fn fd(&self) -> RawFd {
        // SAFETY: the channel is valid while `self` lives; `fd` is a plain field.
        unsafe { self.0.as_ref().fd }
    }

    /// The next event, or `None` when `deadline` passes first.
    pub fn next(&self, deadline: Instant) -> Result<Option<CmEvent>, RdmaError> {
        if !wait_readable(self.fd(), deadline)? {
            return Ok(None);
        }
        let mut event: *mut sys::rdma_cm_event = ptr::null_mut();
        // SAFETY: the channel is valid; `event` is a valid out-pointer. The fd was
        // readable, so the call does not block for long (it is blocking by default).
        if unsafe { sys::rdma_get_cm_event(self.0.as_ptr(), &mut event) } != 0 {
            return Err(last_error("reading an rdma_cm event"));
        }
        let event = NonNull::new(event)
            .ok_or_else(|| errno_error("reading an rdma_cm event", libc::EIO))?;
        Ok(Some(CmEvent(event)))
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on the channel holds an `Arc` to it, so none is left; the
        // channel is destroyed once.
        unsafe { sys::rdma_destroy_event_channel(self.0.as_ptr()) };
    }
}

/// Waits until `fd` is readable or `deadline` passes; true when readable.
pub fn wait_readable(fd: RawFd, deadline: Instant) -> Result<bool, RdmaError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, length 1; the fd is owned by the caller's object.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready > 0 {
            return Ok(true);
        }
        if ready == 0 {
            return Ok(false);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(RdmaError::Verbs {
                op: "waiting for an RDMA event",
                source: err,
            });
        }
    }
}

/// Waits until one of `fds` is readable or `deadline` passes; which ones are.
pub fn wait_any(fds: &[RawFd], deadline: Instant) -> Result<Vec<bool>, RdmaError> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = left.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds that lives across the call;
    // the fds belong to objects the caller holds.
    let ready = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if ready < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(RdmaError::Verbs {
                op: "waiting for RDMA completions",
                source: err,
            });
        }
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

/// What an rdma_cm event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmEventKind {
    AddressResolved,
    RouteResolved,
    ConnectRequest,
    Established,
    Disconnected,
    Rejected,
    /// Anything else (errors, device removal, timewait): named by librdmacm.
    Other(u32),
}

/// One rdma_cm event, acknowledged on drop.
pub struct CmEvent(NonNull<sys::rdma_cm_event>);

impl CmEvent {
    fn raw(&self) -> &sys::rdma_cm_event {
        // SAFETY: the event stays valid until rdma_ack_cm_event in Drop.
        unsafe { self.0.as_ref() }
    }

    pub fn kind(&self) -> CmEventKind {
        match self.raw().event {
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED => CmEventKind::AddressResolved,
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED => CmEventKind::RouteResolved,
            sys::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST => CmEventKind::ConnectRequest,
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED => CmEventKind::Established,
            sys::rdma_cm_event_type::RDMA_CM_EVENT_DISCONNECTED => CmEventKind::Disconnected,
            sys::rdma_cm_event_type::RDMA_CM_EVENT_REJECTED => CmEventKind::Rejected,
            other => CmEventKind::Other(other),
        }
    }

    /// librdmacm's name for the event, for messages.
    pub fn name(&self) -> String {
        // SAFETY: rdma_event_str returns a static NUL-terminated string for any value.
        let name = unsafe { sys::rdma_event_str(self.raw().event) };
        if name.is_null() {
            return format!("event {}", self.raw().event);
        }
        // SAFETY: non-NULL, static, NUL-terminated (above).
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }

    pub fn status(&self) -> i32 {
        self.raw().status
    }

    /// The id the event is about (for a connect request: the new id of the request).
    pub fn id_ptr(&self) -> *mut sys::rdma_cm_id {
        self.raw().id
    }

    /// The private data the peer sent with a connect request or with its accept.
    pub fn private_data(&self) -> Vec<u8> {
        let raw = self.raw();
        // SAFETY: for connection events (the only ones ferry reads it from) `param.conn` is
        // the active union member; librdmacm keeps `private_data_len` bytes valid until
        // the event is acknowledged, and it is copied out before that.
        unsafe {
            let conn = &raw.param.conn;
            if conn.private_data.is_null() {
                return Vec::new();
            }
            std::slice::from_raw_parts(
                conn.private_data as *const u8,
                conn.private_data_len as usize,
            )
            .to_vec()
        }
    }
}

impl Drop for CmEvent {
    fn drop(&mut self) {
        // SAFETY: the event came from rdma_get_cm_event and is acknowledged exactly once.
        unsafe { sys::rdma_ack_cm_event(self.0.as_ptr()) };
    }
}

fn sockaddr_of(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: an all-zero sockaddr_storage is a valid (unspecified-family) value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is aligned for any
            // sockaddr; the write covers exactly the sockaddr_in prefix.
            unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
        }
    }
    storage
}

/// An rdma_cm identifier (the RDMA analogue of a socket), destroyed on drop with its QP.
pub struct CmId {
    id: NonNull<sys::rdma_cm_id>,
    channel: Arc<EventChannel>,
    has_qp: bool,
}

// SAFETY: an rdma_cm_id is used from one thread at a time (its owner); librdmacm calls on
// distinct ids are thread-safe, and `disconnect` from a monitor thread is explicitly
// allowed by librdmacm (it only transitions the QP to the error state).
unsafe impl Send for CmId {}
// SAFETY: the `&self` methods (`disconnect`, `device_name`, `local_port`) are safe to call
// concurrently per librdmacm.
unsafe impl Sync for CmId {}

impl CmId {
    pub fn new(channel: &Arc<EventChannel>) -> Result<Self, RdmaError> {
        let mut id: *mut sys::rdma_cm_id = ptr::null_mut();
        // SAFETY: valid channel and out-pointer; a reliable-connected (TCP port space) id.
        let rc = unsafe {
            sys::rdma_create_id(
                channel.0.as_ptr(),
                &mut id,
                ptr::null_mut(),
                sys::rdma_port_space::RDMA_PS_TCP,
            )
        };
        if rc != 0 {
            return Err(last_error("creating an rdma_cm id"));
        }
        let id =
            NonNull::new(id).ok_or_else(|| errno_error("creating an rdma_cm id", libc::EIO))?;
        Ok(Self {
            id,
            channel: channel.clone(),
            has_qp: false,
        })
    }

    /// Takes ownership of the new id of a connect request event (on `channel`).
    ///
    /// # Safety
    ///
    /// `id` must be the `id` of a connect-request event from `channel`, not yet owned by
    /// another `CmId` (each request is adopted once).
    pub unsafe fn adopt(
        id: *mut sys::rdma_cm_id,
        channel: &Arc<EventChannel>,
    ) -> Result<Self, RdmaError> {
        let id = NonNull::new(id)
            .ok_or_else(|| errno_error("adopting a connect request", libc::EINVAL))?;
        Ok(Self {
            id,
            channel: channel.clone(),
            has_qp: false,
        })
    }

    pub fn as_ptr(&self) -> *mut sys::rdma_cm_id {
        self.id.as_ptr()
    }

    pub fn channel(&self) -> &Arc<EventChannel> {
        &self.channel
    }

    pub fn bind(&self, addr: SocketAddr) -> Result<(), RdmaError> {
        let mut storage = sockaddr_of(addr);
        // SAFETY: valid id; `storage` holds a valid sockaddr for the call's duration.
        let rc = unsafe {
            sys::rdma_bind_addr(self.as_ptr(), &mut storage as *mut _ as *mut libc::sockaddr)
        };
        if rc != 0 {
            return Err(last_error("binding an rdma_cm id to an address"));
        }
        Ok(())
    }

    pub fn listen(&self, backlog: i32) -> Result<(), RdmaError> {
        // SAFETY: valid, bound id.
        if unsafe { sys::rdma_listen(self.as_ptr(), backlog) } != 0 {
            return Err(last_error("listening for RDMA connections"));
        }
        Ok(())
    }

    /// Starts resolving `dst` (from `src`, when given) to a local device; completes with an
    /// `AddressResolved` (or error) event.
    pub fn resolve_addr(
        &self,
        src: Option<IpAddr>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<(), RdmaError> {
        let mut dst = sockaddr_of(dst);
        let mut src_storage = src.map(|ip| sockaddr_of(SocketAddr::new(ip, 0)));
        let src_ptr = src_storage
            .as_mut()
            .map_or(ptr::null_mut(), |s| s as *mut _ as *mut libc::sockaddr);
        // SAFETY: valid id; both sockaddrs (or NULL for src) live across the call.
        let rc = unsafe {
            sys::rdma_resolve_addr(
                self.as_ptr(),
                src_ptr,
                &mut dst as *mut _ as *mut libc::sockaddr,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if rc != 0 {
            return Err(last_error("resolving the peer's RDMA address"));
        }
        Ok(())
    }

    pub fn resolve_route(&self, timeout: Duration) -> Result<(), RdmaError> {
        // SAFETY: valid id with a resolved address.
        let rc = unsafe {
            sys::rdma_resolve_route(
                self.as_ptr(),
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if rc != 0 {
            return Err(last_error("resolving the route to the peer"));
        }
        Ok(())
    }

    /// The local port (for a listener bound to port 0).
    pub fn local_port(&self) -> u16 {
        // SAFETY: valid id; after a bind, `route.addr.src_addr_union` holds the bound
        // address (librdmacm's own rdma_get_src_port reads the same field); the port
        // field sits at the same offset in sockaddr_in and sockaddr_in6.
        u16::from_be(unsafe { self.id.as_ref().route.addr.src_addr_union.src_sin.sin_port })
    }

    /// The device this id is bound to (after bind to a device address or address
    /// resolution), if any.
    fn context(&self) -> Option<NonNull<sys::ibv_context>> {
        // SAFETY: valid id; `verbs` is a plain field set by librdmacm.
        NonNull::new(unsafe { self.id.as_ref().verbs })
    }

    pub fn device_name(&self) -> Option<String> {
        let ctx = self.context()?;
        // SAFETY: a context from librdmacm stays open while any id uses it; its `device`
        // is valid and ibv_get_device_name returns a NUL-terminated string it owns.
        unsafe {
            let name = sys::ibv_get_device_name(ctx.as_ref().device);
            (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
        }
    }

    /// Moves the connection's QP to the error state: every posted work request completes
    /// with a flush error, and the peer is told. Safe to call from any thread, repeatedly.
    pub fn disconnect(&self) {
        // SAFETY: valid id; rdma_disconnect on an unconnected id just fails (ignored).
        unsafe { sys::rdma_disconnect(self.as_ptr()) };
    }

    /// Rejects a connect request (passive side).
    pub fn reject(&self) {
        // SAFETY: valid id of a connect request; no private data.
        unsafe { sys::rdma_reject(self.as_ptr(), ptr::null(), 0) };
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: the QP (if any) was created on this id by rdma_create_qp and is destroyed
        // before the id; the id is destroyed once. Every CQ and MR the QP used is owned by
        // the QP wrapper that holds this id, and is dropped after it.
        unsafe {
            if self.has_qp {
                sys::rdma_destroy_qp(self.as_ptr());
            }
            sys::rdma_destroy_id(self.as_ptr());
        }
    }
}

/// A protection domain on one device.
pub struct ProtectionDomain {
    pd: NonNull<sys::ibv_pd>,
    context: NonNull<sys::ibv_context>,
}

// SAFETY: a PD is only used as an argument to thread-safe verbs calls.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    /// A PD on the device `id` is bound to.
    pub fn on(id: &CmId) -> Result<Arc<Self>, RdmaError> {
        let context = id.context().ok_or(RdmaError::NotBound)?;
        // SAFETY: a valid open context (owned by librdmacm, open while ids use it).
        let pd = unsafe { sys::ibv_alloc_pd(context.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| last_error("allocating a protection domain"))?;
        Ok(Arc::new(Self { pd, context }))
    }

    /// Whether `id` is on this PD's device.
    pub fn same_device(&self, id: &CmId) -> bool {
        id.context() == Some(self.context)
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: every MR, QP and CQ on the PD holds an Arc to it, so none is left.
        unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// Access a registration grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The local device reads it (sources of sends and RDMA writes).
    LocalRead,
    /// The local device writes it (receive buffers).
    LocalWrite,
    /// The peer writes it with RDMA WRITE (destination guest memory, staging buffers).
    RemoteWrite,
}

/// Registered memory: the device may read or write `[addr, addr + len)`.
pub struct MemoryRegion {
    mr: NonNull<sys::ibv_mr>,
    addr: u64,
    len: usize,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: an MR handle is immutable after registration; its keys are plain numbers.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be mapped memory that stays mapped until the region is
    /// dropped. With [`Access::RemoteWrite`] or [`Access::LocalWrite`] the device writes it
    /// outside Rust's view; the caller treats that memory as shared with a device (reads
    /// it through raw pointers or only where the protocol says the device is done).
    pub unsafe fn register(
        pd: &Arc<ProtectionDomain>,
        ptr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Self, RdmaError> {
        let flags = match access {
            Access::LocalRead => 0,
            Access::LocalWrite => sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
            Access::RemoteWrite => {
                sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
                    | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            }
        };
        // SAFETY: valid PD; the caller guarantees the memory range.
        let mr = unsafe { sys::ibv_reg_mr(pd.pd.as_ptr(), ptr.cast(), len, flags as i32) };
        let mr = NonNull::new(mr)
            .ok_or_else(|| last_error("registering memory with the RDMA device"))?;
        Ok(Self {
            mr,
            addr: ptr as u64,
            len,
            _pd: pd.clone(),
        })
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: valid MR; plain field.
        unsafe { self.mr.as_ref().lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: valid MR; plain field.
        unsafe { self.mr.as_ref().rkey }
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A scatter-gather entry for `len` bytes at `offset` in the region.
    pub fn sge(&self, offset: usize, len: usize) -> Result<Sge, RdmaError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) || len > u32::MAX as usize {
            return Err(RdmaError::OutOfRegion {
                offset: offset as u64,
                len: len as u64,
                region: self.len as u64,
            });
        }
        Ok(Sge {
            addr: self.addr + offset as u64,
            len: len as u32,
            lkey: self.lkey(),
        })
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered once, deregistered once; QPs that used it are gone or flushed
        // (owners drop QPs before the memory they write).
        unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// Page-aligned memory owned together with its registration: send and receive buffers.
pub struct RegisteredBuffer {
    region: std::mem::ManuallyDrop<MemoryRegion>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned; access goes through `&self`/`&mut self` and raw pointers
// as documented on each method.
unsafe impl Send for RegisteredBuffer {}
// SAFETY: as above.
unsafe impl Sync for RegisteredBuffer {}

impl RegisteredBuffer {
    pub fn new(pd: &Arc<ProtectionDomain>, len: usize, access: Access) -> Result<Self, RdmaError> {
        let len = len.max(1).next_multiple_of(4096);
        // SAFETY: an anonymous private mapping; arguments are valid; MAP_FAILED checked.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last_error("allocating an RDMA buffer"));
        }
        let ptr = NonNull::new(ptr as *mut u8)
            .ok_or_else(|| errno_error("allocating an RDMA buffer", libc::ENOMEM))?;
        // SAFETY: the mapping lives until Drop, after the region (field order and Drop).
        let region = match unsafe { MemoryRegion::register(pd, ptr.as_ptr(), len, access) } {
            Ok(r) => r,
            Err(e) => {
                // SAFETY: unmapping the mapping made above, once.
                unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
                return Err(e);
            }
        };
        Ok(Self {
            region: std::mem::ManuallyDrop::new(region),
            ptr,
            len,
        })
    }

    pub fn region(&self) -> &MemoryRegion {
        &self.region
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies bytes out of `offset..offset + out.len()`.
    ///
    /// Only for memory the device is not writing now (a receive buffer whose completion was
    /// returned and that is not posted again yet): the protocol's job, enforced by the
    /// owners (receivers repost a buffer only after reading it).
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len, "read beyond an RDMA buffer");
        // SAFETY: in bounds (asserted); the mapping is valid; the device is not writing
        // these bytes (above), so the copy sees stable memory.
        unsafe {
            ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        };
    }

    /// Copies `data` into `offset..`. Only for memory the device is not reading now (a
    /// send slot whose previous send completed).
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(
            offset + data.len() <= self.len,
            "write beyond an RDMA buffer"
        );
        // SAFETY: in bounds (asserted); valid mapping; nothing else reads or writes these
        // bytes now (the slot discipline above), and `data` cannot overlap a private
        // mapping that only this buffer hands out through these copies.
        unsafe {
            ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
    }
}

impl Drop for RegisteredBuffer {
    fn drop(&mut self) {
        // SAFETY: the registration goes first (dropped in place once, never used again),
        // then the mapping made in `new` is unmapped once.
        unsafe {
            std::mem::ManuallyDrop::drop(&mut self.region);
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A completion queue with its own completion channel (one fd to wait on).
pub struct CompletionQueue {
    cq: NonNull<sys::ibv_cq>,
    channel: NonNull<sys::ibv_comp_channel>,
    /// Events taken with ibv_get_cq_event and not acknowledged yet.
    unacked: std::sync::Mutex<u32>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: libibverbs' poll, arm and event calls on a CQ are thread-safe (providers lock
// the queue); the unacknowledged-event count is behind a mutex.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

/// A work completion, copied out of the queue.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub wr_id: u64,
    /// `None` on success, else libibverbs' status text and number.
    pub error: Option<(u32, &'static str)>,
    pub byte_len: u32,
    /// A receive (as opposed to a send or RDMA write completion).
    pub is_recv: bool,
}

impl Completion {
    /// A flush (`IBV_WC_WR_FLUSH_ERR`): the QP went to the error state because the link
    /// was closed (by either side), not because this request itself failed.
    pub fn is_flush(&self) -> bool {
        self.error
            .is_some_and(|(status, _)| status == sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR)
    }
}

impl CompletionQueue {
    pub fn new(pd: &Arc<ProtectionDomain>, entries: u32) -> Result<Self, RdmaError> {
        let ctx = pd.context.as_ptr();
        // SAFETY: valid open context.
        let channel = unsafe { sys::ibv_create_comp_channel(ctx) };
        let channel =
            NonNull::new(channel).ok_or_else(|| last_error("creating a completion channel"))?;
        // SAFETY: valid context and channel; no CQ context pointer; vector 0.
        let cq = unsafe {
            sys::ibv_create_cq(ctx, entries as i32, ptr::null_mut(), channel.as_ptr(), 0)
        };
        let Some(cq) = NonNull::new(cq) else {
            let err = last_error("creating a completion queue");
            // SAFETY: the channel made above, no CQ on it, destroyed once.
            unsafe { sys::ibv_destroy_comp_channel(channel.as_ptr()) };
            return Err(err);
        };
        // SAFETY: the channel's fd is valid; make it non-blocking so a spurious wake-up
        // never blocks in ibv_get_cq_event.
        unsafe {
            let fd = channel.as_ref().fd;
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        let cq = Self {
            cq,
            channel,
            unacked: std::sync::Mutex::new(0),
            _pd: pd.clone(),
        };
        cq.arm()?;
        Ok(cq)
    }

    pub fn fd(&self) -> RawFd {
        // SAFETY: valid channel; plain field.
        unsafe { self.channel.as_ref().fd }
    }

    /// Requests an event for the next completion.
    fn arm(&self) -> Result<(), RdmaError> {
        // SAFETY: valid CQ; any completion (not only solicited).
        let rc = unsafe { sys::ibv_req_notify_cq(self.cq.as_ptr(), 0) };
        if rc != 0 {
            return Err(errno_error("arming a completion queue", rc));
        }
        Ok(())
    }

    /// Takes up to `out.capacity() - out.len()` completions into `out` without waiting.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, RdmaError> {
        const BATCH: usize = 32;
        let mut total = 0;
        while total < max {
            // SAFETY: ibv_wc is plain old data; zeroed is a valid value to be overwritten.
            let mut wcs: [sys::ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
            let want = (max - total).min(BATCH) as i32;
            // SAFETY: valid CQ; `wcs` has room for `want` entries.
            let n = unsafe { sys::ibv_poll_cq(self.cq.as_ptr(), want, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(errno_error("polling a completion queue", -n));
            }
            for wc in &wcs[..n as usize] {
                let error = (wc.status != sys::ibv_wc_status::IBV_WC_SUCCESS).then(|| {
                    // SAFETY: ibv_wc_status_str returns a static string for any status.
                    let text = unsafe { sys::ibv_wc_status_str(wc.status) };
                    let text = if text.is_null() {
                        "unknown status"
                    } else {
                        // SAFETY: static NUL-terminated string (above).
                        unsafe { CStr::from_ptr(text) }
                            .to_str()
                            .unwrap_or("unknown status")
                    };
                    (wc.status, text)
                });
                out.push(Completion {
                    wr_id: wc.wr_id,
                    error,
                    byte_len: wc.byte_len,
                    is_recv: wc.opcode & sys::ibv_wc_opcode::IBV_WC_RECV != 0,
                });
            }
            total += n as usize;
            if (n as usize) < want as usize {
                break;
            }
        }
        Ok(total)
    }

    /// Waits until a completion may be there (or `deadline`), re-arming the queue. Call
    /// [`CompletionQueue::poll`] after it returns; a completion that arrived between the
    /// last poll and the arm is caught by the poll that follows.
    pub fn wait(&self, deadline: Instant) -> Result<(), RdmaError> {
        if wait_readable(self.fd(), deadline)? {
            let mut cq: *mut sys::ibv_cq = ptr::null_mut();
            let mut ctx: *mut libc::c_void = ptr::null_mut();
            // SAFETY: valid channel and out-pointers; non-blocking fd, so an EAGAIN simply
            // means the event was already taken.
            let rc = unsafe { sys::ibv_get_cq_event(self.channel.as_ptr(), &mut cq, &mut ctx) };
            if rc == 0 {
                let mut unacked = self.unacked.lock().unwrap_or_else(|e| e.into_inner());
                *unacked += 1;
                if *unacked >= 64 {
                    // SAFETY: acknowledging events taken from this CQ's channel.
                    unsafe { sys::ibv_ack_cq_events(self.cq.as_ptr(), *unacked) };
                    *unacked = 0;
                }
            }
            self.arm()?;
        }
        Ok(())
    }

    fn ack_events(&mut self) {
        let unacked = self.unacked.get_mut().unwrap_or_else(|e| e.into_inner());
        if *unacked > 0 {
            // SAFETY: acknowledging events taken from this CQ's channel.
            unsafe { sys::ibv_ack_cq_events(self.cq.as_ptr(), *unacked) };
            *unacked = 0;
        }
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        self.ack_events();
        // SAFETY: the QP using this CQ was destroyed first (owners drop the CmId before
        // the queues); CQ then channel, each once.
        unsafe {
            sys::ibv_destroy_cq(self.cq.as_ptr());
            sys::ibv_destroy_comp_channel(self.channel.as_ptr());
        }
    }
}

/// A scatter-gather entry: `len` bytes at `addr` in the region of `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// Where an RDMA WRITE lands: `rkey` memory at `addr` (in the peer's address space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddr {
    pub addr: u64,
    pub rkey: u32,
}

/// Queue sizes of one connection.
#[derive(Debug, Clone, Copy)]
pub struct QpCaps {
    pub send_wr: u32,
    pub recv_wr: u32,
}

/// A QP created on an id but not connected yet: it can post receives, nothing else.
pub struct PendingQp {
    id: CmId,
    send_cq: Arc<CompletionQueue>,
    recv_cq: Arc<CompletionQueue>,
    caps: QpCaps,
}

/// An established reliable connection: the only QP that can send and write.
pub struct ConnectedQp {
    id: CmId,
    send_cq: Arc<CompletionQueue>,
    recv_cq: Arc<CompletionQueue>,
    caps: QpCaps,
}

fn conn_param(private: &[u8]) -> Result<sys::rdma_conn_param, RdmaError> {
    if private.len() > 56 {
        return Err(RdmaError::PrivateDataTooLong { len: private.len() });
    }
    Ok(sys::rdma_conn_param {
        private_data: private.as_ptr().cast(),
        private_data_len: private.len() as u8,
        responder_resources: 1,
        initiator_depth: 1,
        flow_control: 0,
        retry_count: 7,
        // Infinite retries while the receiver has no buffer posted: receivers repost as
        // fast as they consume, and a dead peer is caught by the transport retry count
        // (ACK timeouts) and rdma_cm's disconnect event.
        rnr_retry_count: 7,
        srq: 0,
        qp_num: 0,
    })
}

impl PendingQp {
    /// Creates an RC QP on `id` (bound or resolved to `pd`'s device) with its own send
    /// and receive completion queues.
    pub fn create(
        mut id: CmId,
        pd: &Arc<ProtectionDomain>,
        caps: QpCaps,
    ) -> Result<Self, RdmaError> {
        if !pd.same_device(&id) {
            return Err(RdmaError::OtherDevice);
        }
        let send_cq = Arc::new(CompletionQueue::new(pd, caps.send_wr)?);
        let recv_cq = Arc::new(CompletionQueue::new(pd, caps.recv_wr)?);
        let mut attr = sys::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: send_cq.cq.as_ptr(),
            recv_cq: recv_cq.cq.as_ptr(),
            srq: ptr::null_mut(),
            cap: sys::ibv_qp_cap {
                max_send_wr: caps.send_wr,
                max_recv_wr: caps.recv_wr,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: sys::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: valid id on the PD's device (checked), valid PD and CQs that outlive the
        // QP (PendingQp/ConnectedQp drop the id, and with it the QP, before the CQs).
        let rc = unsafe { sys::rdma_create_qp(id.as_ptr(), pd.pd.as_ptr(), &mut attr) };
        if rc != 0 {
            return Err(last_error("creating a queue pair"));
        }
        id.has_qp = true;
        Ok(Self {
            id,
            send_cq,
            recv_cq,
            caps,
        })
    }

    pub fn id(&self) -> &CmId {
        &self.id
    }

    pub fn post_recv(&mut self, wr_id: u64, sge: Sge) -> Result<(), RdmaError> {
        post_recv(&self.id, wr_id, sge)
    }

    /// Active side: connects (the id must have a resolved route) and waits for the
    /// connection to be established; returns it with the private data the peer accepted
    /// with.
    pub fn connect(
        self,
        private: &[u8],
        deadline: Instant,
    ) -> Result<(ConnectedQp, Vec<u8>), RdmaError> {
        let mut param = conn_param(private)?;
        // SAFETY: valid id with a QP and a resolved route; `param` and the private data it
        // points to live across the call (librdmacm copies them).
        if unsafe { sys::rdma_connect(self.id.as_ptr(), &mut param) } != 0 {
            return Err(last_error("connecting to the peer over RDMA"));
        }
        let event = expect_event(&self.id, CmEventKind::Established, deadline)?;
        let data = event.private_data();
        drop(event);
        Ok((self.into_connected(), data))
    }

    /// Passive side: accepts the connect request this id came from. The connection is
    /// usable once rdma_cm reports it established: then [`PendingQp::established`].
    pub fn accept_start(&self, private: &[u8]) -> Result<(), RdmaError> {
        let mut param = conn_param(private)?;
        // SAFETY: valid id of a connect request, with a QP; `param` and the private data
        // it points to live across the call (librdmacm copies them).
        if unsafe { sys::rdma_accept(self.id.as_ptr(), &mut param) } != 0 {
            return Err(last_error("accepting an RDMA connection"));
        }
        Ok(())
    }

    /// The QP, once its `Established` event arrived (the caller read it from the channel).
    pub fn established(self) -> ConnectedQp {
        self.into_connected()
    }

    fn into_connected(self) -> ConnectedQp {
        ConnectedQp {
            id: self.id,
            send_cq: self.send_cq,
            recv_cq: self.recv_cq,
            caps: self.caps,
        }
    }
}

/// Waits on `id`'s channel for `want` about `id`; any other outcome is an error. (During
/// set-up each id's events are read by the thread setting it up, one id at a time.)
pub fn expect_event(id: &CmId, want: CmEventKind, deadline: Instant) -> Result<CmEvent, RdmaError> {
    let event = id
        .channel()
        .next(deadline)?
        .ok_or(RdmaError::Timeout { waiting_for: want })?;
    if event.kind() != want || event.id_ptr() != id.as_ptr() {
        return Err(RdmaError::UnexpectedEvent {
            want,
            got: event.name(),
            status: event.status(),
        });
    }
    Ok(event)
}

fn post_recv(id: &CmId, wr_id: u64, sge: Sge) -> Result<(), RdmaError> {
    let mut sg = sys::ibv_sge {
        addr: sge.addr,
        length: sge.len,
        lkey: sge.lkey,
    };
    let mut wr = sys::ibv_recv_wr {
        wr_id,
        next: ptr::null_mut(),
        sg_list: &mut sg,
        num_sge: 1,
    };
    let mut bad: *mut sys::ibv_recv_wr = ptr::null_mut();
    // SAFETY: the id has a QP (PendingQp/ConnectedQp only); `wr` and `sg` live across the
    // call (the provider copies them); the SGE names registered memory (from
    // `MemoryRegion::sge`) that its owner keeps until the completion is polled.
    let rc = unsafe { sys::ibv_post_recv((*id.as_ptr()).qp, &mut wr, &mut bad) };
    if rc != 0 {
        return Err(errno_error("posting a receive", rc));
    }
    Ok(())
}

/// One work request to post on a [`ConnectedQp`].
#[derive(Debug, Clone, Copy)]
pub enum WorkRequest {
    /// RDMA WRITE of `local` to `remote`.
    Write { local: Sge, remote: RemoteAddr },
    /// SEND of `local` into the peer's next posted receive.
    Send { local: Sge },
}

impl ConnectedQp {
    pub fn id(&self) -> &CmId {
        &self.id
    }

    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    pub fn post_recv(&self, wr_id: u64, sge: Sge) -> Result<(), RdmaError> {
        post_recv(&self.id, wr_id, sge)
    }

    /// Posts `requests` as one chain; only the last is signalled, with `wr_id` (a
    /// completion of a later request implies every earlier one on the QP completed).
    pub fn post(&self, requests: &[WorkRequest], wr_id: u64) -> Result<(), RdmaError> {
        if requests.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<sys::ibv_sge> = requests
            .iter()
            .map(|r| {
                let s = match r {
                    WorkRequest::Write { local, .. } | WorkRequest::Send { local } => local,
                };
                sys::ibv_sge {
                    addr: s.addr,
                    length: s.len,
                    lkey: s.lkey,
                }
            })
            .collect();
        // SAFETY: ibv_send_wr is plain old data (pointers and integers); zeroed is valid.
        let mut wrs: Vec<sys::ibv_send_wr> = (0..requests.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        let n = requests.len();
        let base = wrs.as_mut_ptr();
        for (i, r) in requests.iter().enumerate() {
            let wr = &mut wrs[i];
            wr.sg_list = &mut sges[i];
            wr.num_sge = 1;
            match *r {
                WorkRequest::Write { remote, .. } => {
                    wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                    wr.wr.rdma = sys::rdma_t {
                        remote_addr: remote.addr,
                        rkey: remote.rkey,
                    };
                }
                WorkRequest::Send { .. } => wr.opcode = sys::ibv_wr_opcode::IBV_WR_SEND,
            }
            if i + 1 < n {
                // SAFETY: `base` points at `n` elements and i + 1 < n.
                wr.next = unsafe { base.add(i + 1) };
            } else {
                wr.wr_id = wr_id;
                wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
        }
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: a connected RC QP; the chain and its SGEs live across the call (the
        // provider copies them into the send queue); each SGE names registered memory its
        // owner keeps mapped until the signalled completion is polled (the caller's
        // budget discipline), and each remote address was granted by the peer.
        let rc = unsafe { sys::ibv_post_send((*self.id.as_ptr()).qp, base, &mut bad) };
        if rc != 0 {
            return Err(errno_error("posting RDMA work requests", rc));
        }
        Ok(())
    }

    /// The send completion queue, for a completion thread.
    pub fn send_cq(&self) -> &Arc<CompletionQueue> {
        &self.send_cq
    }

    /// The receive completion queue.
    pub fn recv_cq(&self) -> &Arc<CompletionQueue> {
        &self.recv_cq
    }
}
