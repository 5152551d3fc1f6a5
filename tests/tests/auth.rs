//! Authenticated peers: the cluster key, the handshake on every TCP connection, the CLI's
//! owner-only unix socket. Real agents and the real CLI; refusals are checked in the
//! refusing agent's log as an operator would read it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_tests::{ferry_bin, init_key, parse_json, test_key_path, Agent, KEY_ENV};

/// stdout and stderr of a CLI run, for messages and assertions.
fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A small VM: quick to create and to migrate.
fn create_tiny(agent: &Agent, name: &str) {
    agent.json(&[
        "vm",
        "create",
        name,
        "--memory",
        "64M",
        "--vcpus",
        "1",
        "--dirty-rate",
        "10MB/s",
    ]);
}

/// A key file other than the test key, in `dir`.
fn other_key(dir: &Path) -> PathBuf {
    let path = dir.join("other.key");
    init_key(&path);
    path
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn agents_with_the_same_key_migrate() {
    let (a, b) = (Agent::start(), Agent::start());
    create_tiny(&a, "keyed");
    let report = a.json(&["migrate", "keyed", "--to", &b.addr, "--streams", "2"]);
    assert!(
        report["bytes_sent"].as_u64().unwrap_or(0) >= 64 << 20,
        "{report}"
    );
    assert_eq!(b.vm_names(), vec!["keyed".to_string()]);
    assert_eq!(b.verify("keyed")["ok"], true);
    assert!(a.vm_names().is_empty());
}

#[test]
fn an_agent_with_another_key_refuses_the_migration_and_the_vm_stays() {
    let keys = tempfile::tempdir().unwrap();
    let a = Agent::start();
    let b = Agent::start_logged(&other_key(keys.path()));
    create_tiny(&a, "stay");
    let out = a.run(&["migrate", "stay", "--to", &b.addr]);
    let text = text_of(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("authentication with the destination agent")
            && text.contains("does not have this cluster key")
            && text.contains("keeps running on the source"),
        "the CLI should say the destination failed authentication: {text}"
    );
    // The VM never left; the destination built nothing.
    a.assert_running("stay");
    assert_eq!(a.verify("stay")["ok"], true);
    assert!(b.vm_names().is_empty(), "{:?}", b.vm_names());
    let line = b.wait_for_log_line(&["authentication failed", "127.0.0.1"]);
    assert!(
        line.contains("WARN") && line.contains("different"),
        "the refusal should say why: {line}"
    );
}

#[test]
fn an_opening_without_the_handshake_is_refused_and_the_agent_keeps_serving() {
    let b = Agent::start_logged(test_key_path());
    let mut raw = TcpStream::connect(&b.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The start of a ferry control message (magic "FRYC", version 1, a length): what a
    // client without the key, or an older ferry, sends first.
    let mut frame = b"FRYC\x01\x00\x00\x00\x10\x00\x00\x00".to_vec();
    frame.extend_from_slice(&[0u8; 28]);
    raw.write_all(&frame).unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert!(
        answer.is_empty(),
        "the agent answered a peer without the key: {answer:?}"
    );
    let line = b.wait_for_log_line(&["authentication failed", "does not speak"]);
    assert!(line.contains("WARN"), "{line}");
    // Still serving: over its socket, and over TCP with the key.
    assert!(b.vm_names().is_empty());
    let out = b.run_tcp(&["vm", "list"]);
    assert!(out.status.success(), "{}", text_of(&out));
}

/// Forwards one connection to `target`, recording what the client sent.
fn recording_proxy(target: String) -> (String, Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&recorded);
    let proxy = std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect(&target).unwrap();
        let (mut from_client, mut to_server) =
            (client.try_clone().unwrap(), server.try_clone().unwrap());
        let upstream = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match from_client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        sink.lock().unwrap().extend_from_slice(&buf[..n]);
                        if to_server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to_server.shutdown(Shutdown::Write);
        });
        let (mut from_server, mut to_client) = (server, client);
        let _ = std::io::copy(&mut from_server, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Write);
        upstream.join().unwrap();
    });
    (addr, recorded, proxy)
}

#[test]
fn a_replayed_handshake_is_refused() {
    let b = Agent::start_logged(test_key_path());
    // A real CLI's connection, recorded on its way through.
    let (proxy, recorded, proxy_thread) = recording_proxy(b.addr.clone());
    let out = Command::new(ferry_bin())
        .args(["--agent", &proxy, "--key"])
        .arg(test_key_path())
        .args(["--json", "vm", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text_of(&out));
    proxy_thread.join().unwrap();
    let recorded = recorded.lock().unwrap().clone();
    assert!(
        recorded.len() > 72,
        "Hello, Response and a request: {recorded:?}"
    );
    assert_eq!(&recorded[..8], b"FRYAUTH1");

    // The handshake's bytes again, Hello and Response: the agent's new challenge makes the
    // old proof worthless, and it says so and closes.
    let mut replay = TcpStream::connect(&b.addr).unwrap();
    replay
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    replay.write_all(&recorded[..40 + 32]).unwrap();
    let mut answer = Vec::new();
    let _ = replay.read_to_end(&mut answer);
    assert_eq!(
        answer.len(),
        64 + 1,
        "a Challenge and a Verdict, nothing more: {answer:?}"
    );
    assert_eq!(answer[64], 0, "the Verdict is a refusal");
    let line = b.wait_for_log_line(&["authentication failed", "replays an old handshake"]);
    assert!(line.contains("WARN"), "{line}");
    assert!(b.vm_names().is_empty());
}

#[test]
fn the_cli_over_tcp_needs_the_key() {
    let keys = tempfile::tempdir().unwrap();
    let a = Agent::start();
    let cli = |key: Option<&Path>| {
        let mut command = Command::new(ferry_bin());
        command
            .args(["--agent", &a.addr, "--json"])
            .env_remove(KEY_ENV);
        if let Some(key) = key {
            command.arg("--key").arg(key);
        }
        command.args(["vm", "list"]).output().unwrap()
    };

    let out = cli(None);
    assert!(!out.status.success());
    let error = parse_json(&out.stdout)["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("needs the cluster key")
            && error.contains("--key")
            && error.contains(KEY_ENV),
        "{error}"
    );

    let out = cli(Some(&other_key(keys.path())));
    assert!(!out.status.success());
    let error = parse_json(&out.stdout)["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("authenticating with the agent")
            && error.contains("does not have this cluster key"),
        "{error}"
    );

    // A key others may read is refused before any connection.
    let loose = keys.path().join("loose.key");
    std::fs::copy(test_key_path(), &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = cli(Some(&loose));
    assert!(!out.status.success());
    assert!(text_of(&out).contains("chmod 600"), "{}", text_of(&out));

    let out = cli(Some(test_key_path()));
    assert!(out.status.success(), "{}", text_of(&out));
    assert_eq!(parse_json(&out.stdout)["vms"], serde_json::json!([]));
    // FERRY_KEY does as well as --key (the harness sets it for this process).
    let out = Command::new(ferry_bin())
        .args(["--agent", &a.addr, "--json", "vm", "list"])
        .env(KEY_ENV, test_key_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text_of(&out));
}

#[test]
fn the_unix_socket_is_owner_only_and_needs_no_key() {
    let a = Agent::start();
    let socket = a.socket();
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()),
        "{} is not a socket",
        socket.display()
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // No staging directory left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(a.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".sock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let out = Command::new(ferry_bin())
        .arg("--agent")
        .arg(format!("unix:{}", socket.display()))
        .args(["--json", "vm", "list"])
        .env_remove(KEY_ENV)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text_of(&out));
}

#[test]
fn a_stopped_agent_removes_its_socket_and_logs_no_refusal() {
    let mut a = Agent::start_logged(test_key_path());
    assert!(a.socket().exists());
    // Served: the agent's signal handlers are in place (it announces its address a moment
    // before it installs them).
    assert!(a.vm_names().is_empty());
    assert!(a.stop().success());
    assert!(!a.socket().exists(), "the socket outlived the agent");
    let log = a.log();
    assert!(log.contains("agent stopped"), "{log}");
    // The wake-up connections the agent makes to itself are no peers to warn about.
    assert!(!log.contains("authentication failed"), "{log}");
}

#[test]
fn an_agent_without_its_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("agent");
    let start = |key: Option<&Path>| {
        let mut command = Command::new(ferry_bin());
        command
            .args(["agent", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .env_remove(KEY_ENV)
            .stdout(Stdio::null());
        if let Some(key) = key {
            command.arg("--key").arg(key);
        }
        command.output().unwrap()
    };
    let out = start(None);
    assert!(!out.status.success());
    let expected = format!(
        "no cluster key at {0}: create one with `ferry key init {0}` and copy it to every agent (0600)",
        data_dir.join("cluster.key").display()
    );
    assert!(text_of(&out).contains(&expected), "{}", text_of(&out));

    let loose = dir.path().join("loose.key");
    init_key(&loose);
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = start(Some(&loose));
    assert!(!out.status.success());
    assert!(
        text_of(&out).contains(&format!("chmod 600 {}", loose.display())),
        "{}",
        text_of(&out)
    );
}

#[test]
fn key_init_writes_0600_and_never_overwrites_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys/cluster.key");
    let init = |extra: &[&str]| {
        Command::new(ferry_bin())
            .args(["key", "init"])
            .arg(&path)
            .args(extra)
            .env_remove(KEY_ENV)
            .output()
            .unwrap()
    };
    let out = init(&[]);
    assert!(out.status.success(), "{}", text_of(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&path.display().to_string())
            && said.contains("every agent")
            && said.contains("0600"),
        "{said}"
    );
    assert_eq!(mode_of(&path), 0o600);
    let first = std::fs::read(&path).unwrap();

    let out = init(&[]);
    assert!(!out.status.success());
    assert!(text_of(&out).contains("--force"), "{}", text_of(&out));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        first,
        "the key was overwritten"
    );

    let out = init(&["--force", "--json"]);
    assert!(out.status.success(), "{}", text_of(&out));
    let json = parse_json(&out.stdout);
    assert_eq!(json["key"], path.display().to_string());
    assert!(
        json["fingerprint"].as_str().is_some_and(|f| f.len() == 16),
        "{json}"
    );
    assert_eq!(mode_of(&path), 0o600);
    assert_ne!(std::fs::read(&path).unwrap(), first);
}
