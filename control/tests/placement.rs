//! `ferry agent --show-placement` and `--cpus`, run as the built binary: the topology and
//! the data plane's placement are printed (as a table or JSON), nothing is created, and a
//! bad CPU list is refused with a clear error.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_control::client::Client;
use ferry_dataplane::numa::thread_affinity;
use serde_json::Value;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const ROLES: [&str; 5] = ["transport", "disk", "tracker", "guest", "control"];

/// `ferry agent --data-dir DATA_DIR ARGS…`, with no key anywhere (none is needed to show).
fn agent(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(FERRY)
        .arg("agent")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("FERRY_KEY")
        .env_remove("RUST_LOG")
        .output()
        .expect("running ferry")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The first CPU this process may use (0 on most machines).
fn first_cpu() -> u32 {
    *thread_affinity().first().expect("some CPU is allowed")
}

#[test]
fn show_placement_prints_the_topology_and_the_plan() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let out = agent(&data_dir, &["--show-placement"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let nodes: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("NUMA nodes: "))
        .expect("a node count")
        .parse()
        .unwrap();
    assert!(nodes >= 1, "{stdout}");
    assert!(stdout.contains("  node "), "a line per node:\n{stdout}");
    // The default listen address is loopback: no NIC node to go by.
    assert!(
        stdout.contains("listen 127.0.0.1:7070: NIC lo (node unknown)"),
        "{stdout}"
    );
    assert!(stdout.contains("data dir "), "{stdout}");
    assert!(stdout.contains("role "), "the table's header:\n{stdout}");
    for role in ROLES {
        assert!(
            stdout.lines().any(|l| l.starts_with(role)),
            "a row for {role}:\n{stdout}"
        );
    }
    if nodes == 1 {
        assert!(
            stdout.contains("note: one NUMA node: buffers not bound"),
            "{stdout}"
        );
        for role in ROLES {
            let row = stdout.lines().find(|l| l.starts_with(role)).unwrap();
            assert!(row.contains("not bound"), "{row}");
        }
    }
    // Showing touches nothing: no data directory, no socket.
    assert!(!data_dir.exists(), "--show-placement created {data_dir:?}");
}

#[test]
fn show_placement_json_with_one_cpu_pins_every_role_to_it() {
    let temp = tempfile::tempdir().unwrap();
    let cpu = first_cpu().to_string();
    let out = agent(
        &temp.path().join("data"),
        &["--cpus", &cpu, "--show-placement", "--json"],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let json: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let nodes = json["topology"]["nodes"].as_array().expect("nodes");
    assert!(!nodes.is_empty(), "{json}");
    // The node holding the CPU: every role runs there.
    let cpu_node = nodes
        .iter()
        .find(|n| {
            let cpus = ferry_dataplane::numa::parse_cpu_list(n["cpus"].as_str().unwrap_or(""))
                .unwrap_or_default();
            cpus.contains(&first_cpu())
        })
        .map(|n| n["os_index"].clone())
        .expect("a node holds the CPU");
    let placement = &json["placement"];
    assert_eq!(placement["allowed_cpus"], cpu.as_str(), "{json}");
    let roles = placement["roles"].as_array().expect("roles");
    assert_eq!(roles.len(), ROLES.len(), "{json}");
    for (role, name) in roles.iter().zip(ROLES) {
        assert_eq!(role["role"], name, "{json}");
        assert_eq!(role["pinned"], true, "{name}: {json}");
        assert_eq!(role["cpus"], cpu.as_str(), "{name}: {json}");
        assert_eq!(role["node"], cpu_node, "{name}: {json}");
        assert!(
            role["why"].as_str().is_some_and(|w| !w.is_empty()),
            "{json}"
        );
    }
    let notes: Vec<&str> = placement["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if nodes.len() == 1 {
        assert_eq!(placement["nodes"], 1);
        assert!(
            notes.contains(&"one NUMA node: buffers not bound"),
            "{notes:?}"
        );
        for role in roles {
            assert_eq!(role["memory_node"], Value::Null, "{json}");
        }
    }
    assert_eq!(json["nic"]["name"], "lo", "{json}");
    assert_eq!(json["nic"]["node"], Value::Null, "{json}");
}

#[test]
fn cpus_the_process_may_not_use_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    // 99 unless this machine lets us use it.
    let missing = if thread_affinity().contains(&99) {
        "65535"
    } else {
        "99"
    };
    let out = agent(&data_dir, &["--cpus", missing, "--show-placement"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--cpus: CPUs {missing} are not available to this process"
        )),
        "{stderr}"
    );
    // The same before an agent starts for real: nothing is created.
    let out = agent(&data_dir, &["--cpus", missing, "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(!data_dir.exists());
    // With --json the error is a JSON object too.
    let out = agent(
        &data_dir,
        &["--cpus", missing, "--show-placement", "--json"],
    );
    let json: Value = serde_json::from_str(text(&out.stdout).trim()).expect("a JSON error");
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("not available to this process")),
        "{json}"
    );
}

#[test]
fn cpu_lists_that_do_not_parse_are_usage_errors() {
    let temp = tempfile::tempdir().unwrap();
    for (list, reason) in [
        ("x", "`x` is not a CPU number"),
        ("3-1", "the range 3-1 runs backwards"),
        ("", "the list is empty"),
    ] {
        let out = agent(temp.path(), &["--cpus", list, "--show-placement"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{list:?}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid value '{list}' for '--cpus <LIST>'")),
            "{list:?}: {stderr}"
        );
        assert!(stderr.contains(reason), "{list:?}: {stderr}");
    }
}

/// `Cpus_allowed_list` of every thread of process `pid` named `name`.
fn thread_cpus(pid: u32, name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        if let Some(cpus) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            found.push(cpus.trim().to_string());
        }
    }
    found
}

/// A real agent started with `--cpus` installs the placement: the vCPU threads of a VM it
/// boots are pinned by the data plane's spawner (its debug log says so), and they and the
/// agent's main thread run on the allowed CPU only.
#[test]
fn agent_with_cpus_pins_the_vcpus_it_starts() {
    let temp = tempfile::tempdir().unwrap();
    let memory = tempfile::Builder::new()
        .prefix("ferry-placement-test-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let key = temp.path().join("cluster.key");
    let status = Command::new(FERRY)
        .args(["key", "init"])
        .arg(&key)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let data_dir = temp.path().join("data");
    let log = temp.path().join("agent.log");
    let cpu = first_cpu().to_string();
    let mut child = Command::new(FERRY)
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--print-addr",
            "--cpus",
            &cpu,
        ])
        .arg("--key")
        .arg(&key)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--memory-dir")
        .arg(memory.path())
        .env("RUST_LOG", "error,ferry_dataplane::numa=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed whatever happens below.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let child = Kill(child);
    assert!(line.starts_with("listening on "), "{line:?}");
    let pid = child.0.id();

    let socket = data_dir.join("agent.sock");
    let out = Command::new(FERRY)
        .arg("--agent")
        .arg(&socket)
        .args([
            "--json", "vm", "create", "v", "--memory", "64M", "--vcpus", "2",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
    // The vCPU threads exist once create has answered; wait a little all the same.
    let deadline = Instant::now() + Duration::from_secs(10);
    let vcpus = loop {
        let vcpus: Vec<String> = ["ferry-vcpu0", "ferry-vcpu1"]
            .iter()
            .flat_map(|name| thread_cpus(pid, name))
            .collect();
        if vcpus.len() == 2 || Instant::now() > deadline {
            break vcpus;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(vcpus, vec![cpu.clone(), cpu.clone()], "vCPU threads' CPUs");
    // The main thread too (pinned to --cpus, so every thread the agent starts inherits it).
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let main = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    assert_eq!(main, cpu);

    Client::new(socket.to_str().unwrap()).shutdown().unwrap();
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "agent did not exit after Shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The spawner pinned each vCPU thread itself (not only by inheritance).
    let log = std::fs::read_to_string(&log).unwrap();
    for vcpu in ["ferry-vcpu0", "ferry-vcpu1"] {
        assert!(
            log.lines().any(|l| l.contains("thread pinned")
                && l.contains("role=guest")
                && l.contains(&format!("thread=\"{vcpu}\""))
                && l.contains(&format!("cpus={cpu}"))),
            "no pinning of {vcpu} in the log:\n{log}"
        );
    }
}
