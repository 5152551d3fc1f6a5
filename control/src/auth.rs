//! The cluster key, and the mutual challenge-response that starts every TCP connection to an
//! agent (the CLI's and the peers': control and data alike) before any other byte is parsed.
//!
//! The key is 32 random bytes in a file every agent of the cluster has, readable by its
//! owner only (`ferry key init` writes one). Whoever holds it may migrate VMs into an agent
//! and drive it, so an agent refuses a key file that group or others can read or write.
//!
//! ```text
//! client (CLI or source agent)                          server (agent)
//!   Hello     { b"FRYAUTH1", client_nonce[32] }    40 B ▶
//!           ◀ 64 B  Challenge { server_nonce[32], server_proof[32] }
//!   Response  { client_proof[32] }                 32 B ▶
//!           ◀  1 B  Verdict   { 0x01 ok | 0x00 refused }
//!
//! server_proof = HMAC-SHA256(K, "ferry server" ‖ client_nonce ‖ server_nonce)
//! client_proof = HMAC-SHA256(K, "ferry client" ‖ server_nonce ‖ client_nonce)
//! session_key  = HMAC-SHA256(K, "ferry session" ‖ client_nonce ‖ server_nonce)
//! ```
//!
//! Both nonces are fresh from the OS's random source. A recorded client `Response` is
//! useless later: the server's nonce differs each time. A server impersonator cannot make
//! `server_proof`; the client checks it before it answers, and then sends an all-zero proof
//! so that the server logs a wrong key rather than an unexplained close. The labels keep a
//! proof of one role from passing as the other's. Proofs are compared in constant time.
//!
//! The messages have fixed sizes and no parser: a peer that is not speaking this protocol
//! is refused at its first byte that differs from the magic, and every read and write runs
//! against one deadline, so a silent or trickling peer costs one connection slot for at
//! most that long. The handshake authenticates; it does not encrypt (see
//! docs/operations.md, "Cluster key and authentication").

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a cluster key.
pub const KEY_BYTES: usize = 32;
/// Bytes of each side's nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of an HMAC-SHA256 proof.
pub const PROOF_BYTES: usize = 32;
/// Bytes of an RDMA lane tag ([`SessionAuth::lane_tag`]).
pub const LANE_TAG_BYTES: usize = 16;
/// The first bytes of every authenticated connection (the version is its last character).
pub const HELLO_MAGIC: [u8; 8] = *b"FRYAUTH1";
/// Client → server: magic, client nonce.
pub const HELLO_LEN: usize = HELLO_MAGIC.len() + NONCE_BYTES;
/// Server → client: server nonce, server proof.
pub const CHALLENGE_LEN: usize = NONCE_BYTES + PROOF_BYTES;
/// Client → server: client proof.
pub const RESPONSE_LEN: usize = PROOF_BYTES;
/// Server → client: one verdict byte.
pub const VERDICT_LEN: usize = 1;
const VERDICT_OK: u8 = 0x01;
const VERDICT_REFUSED: u8 = 0x00;

const LABEL_SERVER: &[u8] = b"ferry server";
const LABEL_CLIENT: &[u8] = b"ferry client";
const LABEL_SESSION: &[u8] = b"ferry session";
const LABEL_LANE: &[u8] = b"ferry lane";
const LABEL_FINGERPRINT: &[u8] = b"ferry fingerprint";

/// Name of the agent's default key file in its data directory.
pub const KEY_FILE: &str = "cluster.key";
/// Environment variable naming the key file (for the agent and the CLI alike).
pub const KEY_ENV: &str = "FERRY_KEY";
/// A key file is one line; anything much longer is not one.
const KEY_FILE_LEN_MAX: u64 = 4096;
const KEY_FILE_HEADER: &str =
    "# ferry cluster key: copy it to every agent (mode 0600); whoever has it can drive them\n";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no cluster key at {path}: create one with `ferry key init {path}` and copy it to every agent (0600)", path = .path.display())]
    KeyMissing { path: PathBuf },
    #[error("cannot read the cluster key {path}", path = .path.display())]
    KeyRead { path: PathBuf, source: io::Error },
    #[error("the cluster key {path} is accessible to group or others (mode {mode:04o}): run `chmod 600 {path}` (and check who may have read it)", path = .path.display())]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{path} is not a cluster key: {reason} (expected one line of 64 hex digits, as `ferry key init` writes it)", path = .path.display())]
    KeyFormat { path: PathBuf, reason: String },
    #[error("{path} already exists: pass --force to replace it (every agent then needs the new key)", path = .path.display())]
    KeyExists { path: PathBuf },
    #[error("cannot write the cluster key {path}", path = .path.display())]
    KeyWrite { path: PathBuf, source: io::Error },
    #[error("the operating system's random source failed: {reason}")]
    Random { reason: String },
    #[error("the peer does not speak ferry's authenticated protocol (its first bytes are not the handshake's: an old ferry, or not ferry at all)")]
    NotAFerryPeer,
    /// Server side: the client's proof is wrong. A client without the key, with another key
    /// and one replaying an old handshake all look alike from here.
    #[error("the peer's proof does not match: it has no cluster key or a different one, or it replays an old handshake")]
    WrongKey,
    /// Client side: the agent could not prove it knows our key.
    #[error("the agent's proof does not match: it does not have this cluster key (a different key, or not the agent we meant)")]
    AgentWrongKey,
    /// Client side: the agent found our proof wrong.
    #[error("the agent refused our proof: it has a different cluster key")]
    Refused,
    #[error("the agent answered the handshake with an unknown verdict {byte:#04x}")]
    BadVerdict { byte: u8 },
    #[error("the handshake did not finish in time (stuck {step})")]
    Timeout { step: &'static str },
    #[error("the peer closed the connection {step}")]
    Closed {
        step: &'static str,
        /// Bytes of that message received before the close.
        got: usize,
    },
    #[error("i/o error {step}")]
    Io {
        step: &'static str,
        source: io::Error,
    },
}

impl AuthError {
    /// The peer connected and closed without sending a byte: a port probe, or the agent's
    /// own shutdown wake-up. Nothing worth a warning.
    pub fn is_silent_close(&self) -> bool {
        matches!(self, AuthError::Closed { got: 0, step } if *step == STEP_HELLO)
    }
}

/// The cluster's shared secret. Its Debug shows a fingerprint, never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey {
    bytes: [u8; KEY_BYTES],
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(fingerprint {})", self.fingerprint())
    }
}

impl ClusterKey {
    /// A new key from the OS's random source.
    pub fn generate() -> Result<ClusterKey, AuthError> {
        Ok(ClusterKey {
            bytes: random_bytes()?,
        })
    }

    /// A key with these bytes (tests, and keys kept elsewhere).
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> ClusterKey {
        ClusterKey { bytes }
    }

    /// 16 hex digits that tell keys apart without revealing them (an HMAC of a constant):
    /// compare it across agents when a handshake fails.
    pub fn fingerprint(&self) -> String {
        hex(&self.mac(&[LABEL_FINGERPRINT])[..8])
    }

    /// Reads a key file: refused when group or others may read or write it, when it is not
    /// a regular file, or when its content is not one key. Format: lines starting with `#`
    /// and blank lines are ignored; exactly one line of 64 hex digits (either case) is the
    /// key.
    pub fn load(path: &Path) -> Result<ClusterKey, AuthError> {
        let read_err = |source: io::Error| AuthError::KeyRead {
            path: path.to_path_buf(),
            source,
        };
        let format_err = |reason: &str| AuthError::KeyFormat {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let file = match File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(AuthError::KeyMissing {
                    path: path.to_path_buf(),
                })
            }
            Err(err) => return Err(read_err(err)),
        };
        // The metadata of the opened file, so a swap after the check changes nothing.
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(format_err("it is not a regular file"));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(AuthError::KeyPermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        if meta.len() > KEY_FILE_LEN_MAX {
            return Err(format_err("it is far too long"));
        }
        let mut text = String::new();
        file.take(KEY_FILE_LEN_MAX)
            .read_to_string(&mut text)
            .map_err(|err| match err.kind() {
                io::ErrorKind::InvalidData => format_err("it is not text"),
                _ => read_err(err),
            })?;
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'));
        let Some(line) = lines.next() else {
            return Err(format_err("it holds no key line"));
        };
        if lines.next().is_some() {
            return Err(format_err("it holds more than one key line"));
        }
        let bytes = parse_hex_key(line).map_err(format_err)?;
        Ok(ClusterKey { bytes })
    }

    /// Writes this key to `path` with mode 0600, never readable by others at any moment:
    /// without `force` the file is created exclusively (an existing one is refused), with
    /// `force` a temporary file beside it (created 0600) replaces it by rename. Missing
    /// parent directories are created.
    pub fn write_new(&self, path: &Path, force: bool) -> Result<(), AuthError> {
        let write_err = |source: io::Error| AuthError::KeyWrite {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(write_err)?;
        }
        let content = format!("{KEY_FILE_HEADER}{}\n", hex(&self.bytes));
        if !force {
            let file = match create_private(path) {
                Ok(file) => file,
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(AuthError::KeyExists {
                        path: path.to_path_buf(),
                    })
                }
                Err(err) => return Err(write_err(err)),
            };
            if let Err(err) = fill(file, &content) {
                let _ = fs::remove_file(path);
                return Err(write_err(err));
            }
            return Ok(());
        }
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let _ = fs::remove_file(&tmp);
        let written = create_private(&tmp)
            .and_then(|file| fill(file, &content))
            .and_then(|()| fs::rename(&tmp, path));
        if let Err(err) = written {
            let _ = fs::remove_file(&tmp);
            return Err(write_err(err));
        }
        Ok(())
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; PROOF_BYTES] {
        mac_with(&self.bytes, parts)
    }

    fn mac_state(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.bytes).expect("HMAC takes any key size");
        for part in parts {
            mac.update(part);
        }
        mac
    }
}

/// Creates `path` exclusively with mode 0600 (the umask can only take bits away; the chmod
/// makes it exactly 0600 whatever the umask).
fn create_private(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

fn fill(mut file: File, content: &str) -> io::Result<()> {
    file.write_all(content.as_bytes())?;
    file.sync_all()
}

fn mac_with(key: &[u8], parts: &[&[u8]]) -> [u8; PROOF_BYTES] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key size");
    for part in parts {
        mac.update(part);
    }
    let mut out = [0u8; PROOF_BYTES];
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

fn random_bytes<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|err| AuthError::Random {
        reason: err.to_string(),
    })?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn parse_hex_key(line: &str) -> Result<[u8; KEY_BYTES], &'static str> {
    if line.len() != KEY_BYTES * 2 {
        return Err("its key line is not 64 hex digits long");
    }
    let mut bytes = [0u8; KEY_BYTES];
    for (byte, pair) in bytes.iter_mut().zip(line.as_bytes().chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16).ok_or("its key line is not hex");
        *byte = ((digit(pair[0])? << 4) | digit(pair[1])?) as u8;
    }
    Ok(bytes)
}

/// What both sides know after a successful handshake: a key of this connection's own,
/// derived from the cluster key and both nonces. Debug does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionAuth {
    pub session_key: [u8; KEY_BYTES],
}

impl fmt::Debug for SessionAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionAuth(..)")
    }
}

impl SessionAuth {
    /// A tag proving knowledge of this session's key for data lane `lane` of migration
    /// `session`, for links whose connect carries a few bytes of private data instead of a
    /// byte stream (RDMA): HMAC-SHA256(session_key, "ferry lane" ‖ session ‖ lane), little
    /// endian, truncated to 16 bytes.
    pub fn lane_tag(&self, session: u64, lane: u32) -> [u8; LANE_TAG_BYTES] {
        let full = mac_with(
            &self.session_key,
            &[LABEL_LANE, &session.to_le_bytes(), &lane.to_le_bytes()],
        );
        let mut tag = [0u8; LANE_TAG_BYTES];
        tag.copy_from_slice(&full[..LANE_TAG_BYTES]);
        tag
    }

    /// Whether `tag` is [`SessionAuth::lane_tag`] of `session` and `lane` (constant time).
    pub fn verify_lane_tag(&self, session: u64, lane: u32, tag: &[u8]) -> bool {
        if tag.len() != LANE_TAG_BYTES {
            return false;
        }
        let mut mac =
            HmacSha256::new_from_slice(&self.session_key).expect("HMAC takes any key size");
        mac.update(LABEL_LANE);
        mac.update(&session.to_le_bytes());
        mac.update(&lane.to_le_bytes());
        mac.verify_truncated_left(tag).is_ok()
    }
}

impl ferry_dataplane::transport::rdma::link::LaneAuth for SessionAuth {
    fn tag(&self, session: u64, lane: u16) -> [u8; LANE_TAG_BYTES] {
        self.lane_tag(session, u32::from(lane))
    }
    fn verify(&self, session: u64, lane: u16, tag: &[u8; LANE_TAG_BYTES]) -> bool {
        self.verify_lane_tag(session, u32::from(lane), tag)
    }
}

/// A stream the handshake can run on: it needs to bound each read and write.
pub trait AuthStream: Read + Write {
    /// Sets the read and the write timeout (`None`: block).
    fn set_io_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

impl AuthStream for TcpStream {
    fn set_io_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
}

impl AuthStream for UnixStream {
    fn set_io_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
}

const STEP_HELLO: &str = "before its Hello";
const STEP_HELLO_REST: &str = "in the middle of its Hello";
const STEP_CHALLENGE: &str = "before the agent's Challenge";
const STEP_RESPONSE: &str = "before its Response";
const STEP_VERDICT: &str = "before the agent's Verdict";

/// The client's side (the CLI, or a source agent on each of its connections): proves it
/// knows `key` and checks that the agent does, all before `deadline`. The stream is left
/// without timeouts, whatever the outcome.
pub fn authenticate_client<S: AuthStream>(
    stream: &mut S,
    key: &ClusterKey,
    deadline: Instant,
) -> Result<SessionAuth, AuthError> {
    let result = client_exchange(
        &mut Bounded {
            stream: &mut *stream,
            deadline,
        },
        key,
    );
    let _ = stream.set_io_timeout(None);
    result
}

/// The agent's side, first thing on every accepted TCP connection: checks the peer knows
/// `key` and proves that it does, all before `deadline`. The stream is left without
/// timeouts, whatever the outcome.
pub fn authenticate_server<S: AuthStream>(
    stream: &mut S,
    key: &ClusterKey,
    deadline: Instant,
) -> Result<SessionAuth, AuthError> {
    let result = server_exchange(
        &mut Bounded {
            stream: &mut *stream,
            deadline,
        },
        key,
    );
    let _ = stream.set_io_timeout(None);
    result
}

fn client_exchange<S: AuthStream>(
    io: &mut Bounded<'_, S>,
    key: &ClusterKey,
) -> Result<SessionAuth, AuthError> {
    let client_nonce: [u8; NONCE_BYTES] = random_bytes()?;
    let mut hello = [0u8; HELLO_LEN];
    hello[..HELLO_MAGIC.len()].copy_from_slice(&HELLO_MAGIC);
    hello[HELLO_MAGIC.len()..].copy_from_slice(&client_nonce);
    io.write_all(&hello, "sending the Hello")?;

    let mut challenge = [0u8; CHALLENGE_LEN];
    io.read_exact(&mut challenge, STEP_CHALLENGE)?;
    let (server_nonce, server_proof) = challenge.split_at(NONCE_BYTES);
    let server_ok = key
        .mac_state(&[LABEL_SERVER, &client_nonce, server_nonce])
        .verify_slice(server_proof)
        .is_ok();
    if !server_ok {
        // Tell the agent (it logs a wrong key instead of a mysterious close), reveal nothing.
        let _ = io.write_all(&[0u8; RESPONSE_LEN], "sending the Response");
        return Err(AuthError::AgentWrongKey);
    }
    let client_proof = key.mac(&[LABEL_CLIENT, server_nonce, &client_nonce]);
    io.write_all(&client_proof, "sending the Response")?;

    let mut verdict = [0u8; VERDICT_LEN];
    io.read_exact(&mut verdict, STEP_VERDICT)?;
    match verdict[0] {
        VERDICT_OK => Ok(session(key, &client_nonce, server_nonce)),
        VERDICT_REFUSED => Err(AuthError::Refused),
        byte => Err(AuthError::BadVerdict { byte }),
    }
}

fn server_exchange<S: AuthStream>(
    io: &mut Bounded<'_, S>,
    key: &ClusterKey,
) -> Result<SessionAuth, AuthError> {
    // The magic byte by byte: a peer speaking something else is refused at its first byte
    // that differs, without waiting for a whole Hello it may never send.
    let mut hello = [0u8; HELLO_LEN];
    let mut got = 0;
    while got < HELLO_MAGIC.len() {
        let n = io.read_some(&mut hello[got..HELLO_MAGIC.len()], STEP_HELLO, got)?;
        if hello[got..got + n] != HELLO_MAGIC[got..got + n] {
            return Err(AuthError::NotAFerryPeer);
        }
        got += n;
    }
    io.read_exact(&mut hello[HELLO_MAGIC.len()..], STEP_HELLO_REST)?;
    let client_nonce = &hello[HELLO_MAGIC.len()..];

    let server_nonce: [u8; NONCE_BYTES] = random_bytes()?;
    let mut challenge = [0u8; CHALLENGE_LEN];
    challenge[..NONCE_BYTES].copy_from_slice(&server_nonce);
    challenge[NONCE_BYTES..].copy_from_slice(&key.mac(&[
        LABEL_SERVER,
        client_nonce,
        &server_nonce,
    ]));
    io.write_all(&challenge, "sending the Challenge")?;

    let mut response = [0u8; RESPONSE_LEN];
    io.read_exact(&mut response, STEP_RESPONSE)?;
    let client_ok = key
        .mac_state(&[LABEL_CLIENT, &server_nonce, client_nonce])
        .verify_slice(&response)
        .is_ok();
    if !client_ok {
        let _ = io.write_all(&[VERDICT_REFUSED], "sending the Verdict");
        return Err(AuthError::WrongKey);
    }
    io.write_all(&[VERDICT_OK], "sending the Verdict")?;
    Ok(session(key, client_nonce, &server_nonce))
}

fn session(key: &ClusterKey, client_nonce: &[u8], server_nonce: &[u8]) -> SessionAuth {
    SessionAuth {
        session_key: key.mac(&[LABEL_SESSION, client_nonce, server_nonce]),
    }
}

/// A stream whose every read and write must end by one deadline.
struct Bounded<'a, S> {
    stream: &'a mut S,
    deadline: Instant,
}

impl<S: AuthStream> Bounded<'_, S> {
    /// Sets the socket timeouts to what is left; each read or write call is bounded by it,
    /// so a peer trickling one byte at a time cannot stretch the handshake.
    fn arm(&mut self, step: &'static str) -> Result<(), AuthError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AuthError::Timeout { step });
        }
        self.stream
            .set_io_timeout(Some(left))
            .map_err(|source| AuthError::Io { step, source })
    }

    /// Reads at least one byte (`got` bytes of this message came before, for the error).
    fn read_some(
        &mut self,
        buf: &mut [u8],
        step: &'static str,
        got: usize,
    ) -> Result<usize, AuthError> {
        loop {
            self.arm(step)?;
            match self.stream.read(buf) {
                Ok(0) => return Err(AuthError::Closed { step, got }),
                Ok(n) => return Ok(n),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(io_error(err, step)),
            }
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], step: &'static str) -> Result<(), AuthError> {
        let mut got = 0;
        while got < buf.len() {
            got += self.read_some(&mut buf[got..], step, got)?;
        }
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8], step: &'static str) -> Result<(), AuthError> {
        let mut sent = 0;
        while sent < buf.len() {
            self.arm(step)?;
            match self.stream.write(&buf[sent..]) {
                Ok(0) => {
                    return Err(AuthError::Io {
                        step,
                        source: io::ErrorKind::WriteZero.into(),
                    })
                }
                Ok(n) => sent += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(io_error(err, step)),
            }
        }
        self.stream
            .flush()
            .map_err(|source| AuthError::Io { step, source })
    }
}

fn io_error(err: io::Error, step: &'static str) -> AuthError {
    match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AuthError::Timeout { step },
        // A peer that closed while we wrote, or reset the connection.
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => AuthError::Closed { step, got: 0 },
        _ => AuthError::Io { step, source: err },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// Runs a client with `client_key` against a server with `server_key` on loopback.
    fn handshake(
        client_key: &ClusterKey,
        server_key: &ClusterKey,
    ) -> (
        Result<SessionAuth, AuthError>,
        Result<SessionAuth, AuthError>,
    ) {
        let (mut client, mut server) = tcp_pair();
        let server_key = server_key.clone();
        let server =
            std::thread::spawn(move || authenticate_server(&mut server, &server_key, soon()));
        let client = authenticate_client(&mut client, client_key, soon());
        (client, server.join().unwrap())
    }

    /// A stream that records what it writes and replays fixed input.
    struct Recorder<S> {
        inner: S,
        written: Vec<u8>,
    }

    impl<S: Read> Read for Recorder<S> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }

    impl<S: Write> Write for Recorder<S> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    impl<S: AuthStream> AuthStream for Recorder<S> {
        fn set_io_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
            self.inner.set_io_timeout(timeout)
        }
    }

    #[test]
    fn the_same_key_authenticates_both_ways_with_one_session_key() {
        let key = ClusterKey::generate().unwrap();
        let (client, server) = handshake(&key, &key);
        let (client, server) = (client.unwrap(), server.unwrap());
        assert_eq!(client, server);
        assert_eq!(client.lane_tag(7, 3), server.lane_tag(7, 3));
        assert!(server.verify_lane_tag(7, 3, &client.lane_tag(7, 3)));
        assert!(!server.verify_lane_tag(7, 4, &client.lane_tag(7, 3)));
        assert!(!server.verify_lane_tag(8, 3, &client.lane_tag(7, 3)));
        assert!(!server.verify_lane_tag(7, 3, &client.lane_tag(7, 3)[..8]));
        // Each handshake has a session key of its own.
        let (again, _) = handshake(&key, &key);
        assert_ne!(again.unwrap(), client);
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_sides() {
        let (a, b) = (
            ClusterKey::generate().unwrap(),
            ClusterKey::generate().unwrap(),
        );
        let (client, server) = handshake(&a, &b);
        assert!(
            matches!(client, Err(AuthError::AgentWrongKey)),
            "{client:?}"
        );
        assert!(matches!(server, Err(AuthError::WrongKey)), "{server:?}");
        let text = server.unwrap_err().to_string();
        assert!(text.contains("different"), "{text}");
    }

    #[test]
    fn a_client_whose_proof_is_wrong_hears_refused() {
        // A server that knows the key talks to a client that passes the server's proof but
        // sends a bad one of its own: the client is told so.
        let key = ClusterKey::generate().unwrap();
        let (mut client, mut server) = tcp_pair();
        let server_key = key.clone();
        let server =
            std::thread::spawn(move || authenticate_server(&mut server, &server_key, soon()));
        let mut hello = HELLO_MAGIC.to_vec();
        hello.extend_from_slice(&[9u8; NONCE_BYTES]);
        client.write_all(&hello).unwrap();
        let mut challenge = [0u8; CHALLENGE_LEN];
        client.read_exact(&mut challenge).unwrap();
        client.write_all(&[1u8; RESPONSE_LEN]).unwrap();
        let mut verdict = [0xffu8; 1];
        client.read_exact(&mut verdict).unwrap();
        assert_eq!(verdict[0], VERDICT_REFUSED);
        assert!(matches!(server.join().unwrap(), Err(AuthError::WrongKey)));
    }

    #[test]
    fn a_replayed_response_is_refused() {
        let key = ClusterKey::generate().unwrap();
        // Record a complete good exchange from the client's side.
        let (client, mut server) = tcp_pair();
        let server_key = key.clone();
        let first =
            std::thread::spawn(move || authenticate_server(&mut server, &server_key, soon()));
        let mut recorder = Recorder {
            inner: client,
            written: Vec::new(),
        };
        authenticate_client(&mut recorder, &key, soon()).unwrap();
        first.join().unwrap().unwrap();
        assert_eq!(recorder.written.len(), HELLO_LEN + RESPONSE_LEN);

        // Replay the client's bytes, Hello and Response, against a fresh server.
        let (mut attacker, mut server) = tcp_pair();
        let server_key = key.clone();
        let second =
            std::thread::spawn(move || authenticate_server(&mut server, &server_key, soon()));
        attacker.write_all(&recorder.written[..HELLO_LEN]).unwrap();
        let mut challenge = [0u8; CHALLENGE_LEN];
        attacker.read_exact(&mut challenge).unwrap();
        attacker.write_all(&recorder.written[HELLO_LEN..]).unwrap();
        let mut verdict = [0u8; 1];
        attacker.read_exact(&mut verdict).unwrap();
        assert_eq!(verdict[0], VERDICT_REFUSED);
        assert!(matches!(second.join().unwrap(), Err(AuthError::WrongKey)));
    }

    #[test]
    fn garbage_is_refused_at_the_first_wrong_byte() {
        let key = ClusterKey::generate().unwrap();
        let (mut client, mut server) = tcp_pair();
        // A ferry control message without the handshake: "FRYC…" differs at byte 3, and
        // the server does not wait for the rest.
        client.write_all(b"FRYC").unwrap();
        let started = Instant::now();
        let err = authenticate_server(&mut server, &key, soon()).unwrap_err();
        assert!(matches!(err, AuthError::NotAFerryPeer), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        let (mut client, mut server) = tcp_pair();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let err = authenticate_server(&mut server, &key, soon()).unwrap_err();
        assert!(matches!(err, AuthError::NotAFerryPeer), "{err}");
    }

    #[test]
    fn short_and_closing_peers_are_errors() {
        let key = ClusterKey::generate().unwrap();
        // Closed at once: a silent close (the shutdown wake-up, a port probe).
        let (client, mut server) = tcp_pair();
        drop(client);
        let err = authenticate_server(&mut server, &key, soon()).unwrap_err();
        assert!(err.is_silent_close(), "{err}");
        // Closed in the middle of the Hello: not silent.
        let (mut client, mut server) = tcp_pair();
        client.write_all(&HELLO_MAGIC).unwrap();
        client.write_all(&[0u8; 5]).unwrap();
        drop(client);
        let err = authenticate_server(&mut server, &key, soon()).unwrap_err();
        assert!(
            matches!(err, AuthError::Closed { got: 5, .. }) && !err.is_silent_close(),
            "{err:?}"
        );
        // A server that closes instead of challenging.
        let (mut client, server) = tcp_pair();
        let closer = std::thread::spawn(move || {
            let mut server = server;
            let mut hello = [0u8; HELLO_LEN];
            server.read_exact(&mut hello).unwrap();
        });
        let err = authenticate_client(&mut client, &key, soon()).unwrap_err();
        closer.join().unwrap();
        assert!(matches!(err, AuthError::Closed { .. }), "{err:?}");
    }

    #[test]
    fn slow_peers_fail_by_the_deadline() {
        let key = ClusterKey::generate().unwrap();
        let limit = Duration::from_millis(300);
        // Silent client.
        let (_client, mut server) = tcp_pair();
        let started = Instant::now();
        let err = authenticate_server(&mut server, &key, Instant::now() + limit).unwrap_err();
        assert!(matches!(err, AuthError::Timeout { .. }), "{err:?}");
        let took = started.elapsed();
        assert!(took >= limit && took < limit * 3, "{took:?}");
        // A client trickling its Hello one byte at a time, each just within the limit: the
        // deadline is for the whole handshake, not per read.
        let (mut client, mut server) = tcp_pair();
        let trickle = std::thread::spawn(move || {
            for byte in HELLO_MAGIC.iter().chain(&[0u8; NONCE_BYTES]) {
                if client.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        let err = authenticate_server(&mut server, &key, Instant::now() + limit).unwrap_err();
        assert!(matches!(err, AuthError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < limit * 3, "{:?}", started.elapsed());
        drop(server);
        trickle.join().unwrap();
        // Silent server.
        let (mut client, _server) = tcp_pair();
        let started = Instant::now();
        let err = authenticate_client(&mut client, &key, Instant::now() + limit).unwrap_err();
        assert!(matches!(err, AuthError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < limit * 3);
        // The stream is left without timeouts.
        assert_eq!(client.read_timeout().unwrap(), None);
        assert_eq!(client.write_timeout().unwrap(), None);
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn key_files_are_written_0600_and_loaded_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cluster.key");
        let key = ClusterKey::generate().unwrap();
        key.write_new(&path, false).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(ClusterKey::load(&path).unwrap(), key);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with('#'), "{text}");
        assert!(!format!("{key:?}").contains(&text.lines().nth(1).unwrap()[..16]));

        // No overwrite without force; with force, the new key replaces the old one.
        let other = ClusterKey::generate().unwrap();
        let err = other.write_new(&path, false).unwrap_err();
        assert!(
            matches!(err, AuthError::KeyExists { .. }) && err.to_string().contains("--force"),
            "{err}"
        );
        assert_eq!(ClusterKey::load(&path).unwrap(), key);
        other.write_new(&path, true).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(ClusterKey::load(&path).unwrap(), other);
        assert_eq!(
            fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn key_files_others_can_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        ClusterKey::generate()
            .unwrap()
            .write_new(&path, false)
            .unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o610] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = ClusterKey::load(&path).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, AuthError::KeyPermissions { .. })
                    && text.contains(&path.display().to_string())
                    && text.contains("chmod 600"),
                "{mode:o}: {text}"
            );
        }
        for mode in [0o600, 0o400] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            ClusterKey::load(&path).unwrap();
        }
    }

    #[test]
    fn malformed_and_missing_key_files_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let err = ClusterKey::load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "no cluster key at {0}: create one with `ferry key init {0}` and copy it to every agent (0600)",
                path.display()
            )
        );
        let good = "ab".repeat(KEY_BYTES);
        for (content, why) in [
            (String::new(), "no key line"),
            ("# only a comment\n".to_string(), "no key line"),
            ("ab".repeat(KEY_BYTES - 1), "64 hex digits"),
            ("ab".repeat(KEY_BYTES + 1), "64 hex digits"),
            (format!("{}zz", "ab".repeat(KEY_BYTES - 1)), "not hex"),
            (format!("{good}\n{good}\n"), "more than one"),
        ] {
            fs::write(&path, &content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = ClusterKey::load(&path).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, AuthError::KeyFormat { .. }) && text.contains(why),
                "{content:?}: {text}"
            );
        }
        // Comments, blank lines, upper case and surrounding spaces are fine.
        fs::write(&path, format!("# key\n\n  {}  \n", good.to_uppercase())).unwrap();
        assert_eq!(
            ClusterKey::load(&path).unwrap(),
            ClusterKey::from_bytes([0xab; KEY_BYTES])
        );
        // A directory is not a key.
        let sub = dir.path().join("dir");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(
            ClusterKey::load(&sub),
            Err(AuthError::KeyFormat { .. })
        ));
    }

    #[test]
    fn generated_keys_differ_and_debug_hides_them() {
        let keys: Vec<_> = (0..16).map(|_| ClusterKey::generate().unwrap()).collect();
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
                assert_ne!(a.fingerprint(), b.fingerprint());
            }
        }
        let key = ClusterKey::from_bytes([0x5a; KEY_BYTES]);
        let debug = format!("{key:?}");
        assert!(!debug.contains("5a5a"), "{debug}");
        assert!(debug.contains(&key.fingerprint()), "{debug}");
        let session = SessionAuth {
            session_key: [0x5a; KEY_BYTES],
        };
        assert!(!format!("{session:?}").contains("5a"));
    }
}
