//! How the CLI prints VMs, verify reports and errors, for people and as JSON.

use std::fmt::Write as _;
use std::io::Write as _;

use ferry_dataplane::disk::LatencySummary;
use ferry_dataplane::guest::reference::{RegisterMismatch, VerifyReport};
use ferry_dataplane::units::{format_bytes, format_rate};
use serde::Serialize;

use crate::api::{DiskInfo, VmInfo};

/// `1.23 s`, `12.5 ms`, `0.42 ms`.
pub fn format_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// `85 µs`, `1.20 ms`.
pub fn format_us(us: f64) -> String {
    if us >= 1000.0 {
        format_ms(us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// A latency summary as `p50 / p99`, or `-` when nothing was measured.
pub fn format_latency(summary: &LatencySummary) -> String {
    if summary.count == 0 {
        return "-".into();
    }
    format!(
        "{} / {}",
        format_us(summary.p50_us),
        format_us(summary.p99_us)
    )
}

/// A dirty rate, with its two special values named.
pub fn format_dirty_rate(bytes_per_s: u64) -> String {
    match bytes_per_s {
        0 => "idle".into(),
        u64::MAX => "unpaced".into(),
        rate => format_rate(rate as f64),
    }
}

/// Prints one JSON object on its own line and flushes (so a reader sees it at once).
pub fn print_json(value: &impl Serialize) {
    let line = serde_json::to_string(value).expect("API types serialize to JSON");
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

pub fn render_vm_table(vms: &[VmInfo]) -> String {
    if vms.is_empty() {
        return "no VMs\n".into();
    }
    let mut out = format!(
        "{:<20} {:<10} {:>10} {:>5} {:<8} {:>14} {:>10} {:<7} {:>12}\n",
        "NAME", "STATE", "MEMORY", "VCPUS", "PATTERN", "DIRTY RATE", "DISK", "RUNNING", "STEPS"
    );
    for vm in vms {
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>10} {:>5} {:<8} {:>14} {:>10} {:<7} {:>12}",
            vm.name,
            vm.state.as_str(),
            format_bytes(vm.memory_bytes),
            vm.vcpus,
            vm.pattern.as_str(),
            format_dirty_rate(vm.dirty_rate_bytes_per_s),
            vm.disk
                .as_ref()
                .map_or_else(|| "-".into(), |d| format_bytes(d.bytes)),
            if vm.running { "yes" } else { "no" },
            vm.total_steps
        );
    }
    out
}

pub fn render_vm_detail(vm: &VmInfo) -> String {
    let mut out = String::new();
    let rows: [(&str, String); 11] = [
        ("name", vm.name.clone()),
        ("state", vm.state.to_string()),
        ("owner", vm.owner.clone()),
        ("epoch", vm.epoch.to_string()),
        (
            "running",
            if vm.running {
                "yes".into()
            } else {
                "no".into()
            },
        ),
        (
            "memory",
            format!(
                "{} ({} bytes)",
                format_bytes(vm.memory_bytes),
                vm.memory_bytes
            ),
        ),
        ("vcpus", vm.vcpus.to_string()),
        (
            "program",
            format!(
                "{} at {}, seed {}, {}% filled at boot",
                vm.pattern,
                format_dirty_rate(vm.dirty_rate_bytes_per_s),
                vm.seed,
                vm.fill_percent
            ),
        ),
        ("throttle", format!("{}%", vm.throttle_percent)),
        ("total steps", vm.total_steps.to_string()),
        (
            "steps/vcpu",
            vm.steps
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ];
    for (label, value) in rows {
        let _ = writeln!(out, "{label:<12} {value}");
    }
    if let Some(disk) = &vm.disk {
        for (label, value) in disk_rows(disk) {
            let _ = writeln!(out, "{label:<12} {value}");
        }
    }
    out
}

/// `vm status`'s disk lines.
fn disk_rows(disk: &DiskInfo) -> [(&'static str, String); 4] {
    let kind = if disk.block_device {
        "block device"
    } else {
        "file"
    };
    let owner = if disk.agent_owned {
        "the agent's: deleted with the VM"
    } else {
        "user-supplied: never deleted"
    };
    let writes = match disk.write_rate_bytes_per_s {
        0 => "no guest writes".to_string(),
        rate => format!("{} of {} writes", format_dirty_rate(rate), disk.pattern),
    };
    let per_vcpu = disk
        .steps
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    [
        (
            "disk",
            format!(
                "{} ({} bytes), {kind} {} ({owner})",
                format_bytes(disk.bytes),
                disk.bytes,
                disk.path.display()
            ),
        ),
        (
            "disk i/o",
            format!(
                "direct I/O {}; {writes}, {}% filled at boot",
                if disk.direct_io {
                    "yes"
                } else {
                    "no (buffered)"
                },
                disk.fill_percent
            ),
        ),
        (
            "disk steps",
            format!("{} ({per_vcpu} per vCPU)", disk.total_steps),
        ),
        (
            "disk writes",
            format!(
                "{} failed; latency p50/p99 {} (while not mirrored)",
                disk.write_errors,
                format_latency(&disk.unmirrored_latency)
            ),
        ),
    ]
}

pub fn render_verify(name: &str, report: &VerifyReport) -> String {
    let mut out = String::new();
    let verdict = if report.ok { "OK" } else { "FAILED" };
    let _ = writeln!(
        out,
        "verify {name}: {verdict} — {} pages checked in {}, {} mismatched; steps per vCPU {:?}",
        report.pages_checked,
        format_ms(report.elapsed_ms),
        report.mismatched_pages,
        report.steps
    );
    render_mismatches(
        &mut out,
        ("PAGE", "ADDRESS", "pages"),
        report
            .first_mismatches
            .iter()
            .map(|m| (m.page, m.addr, m.expected, m.found)),
        report.mismatched_pages,
    );
    render_register_mismatches(&mut out, "vCPU", "step", &report.register_mismatches);
    if report.disk_bytes_checked > 0 || report.mismatched_disk_blocks > 0 {
        render_disk_verify(&mut out, report);
    }
    out
}

/// The listed mismatches as a table, `(unit, address, expected, found)` per row, and how
/// many more there are of `total`. `labels`: unit column, address column, plural noun.
fn render_mismatches(
    out: &mut String,
    labels: (&str, &str, &str),
    rows: impl Iterator<Item = (u64, u64, u8, u8)>,
    total: u64,
) {
    let (unit, address, plural) = labels;
    let mut listed = 0u64;
    for (i, (number, addr, expected, found)) in rows.enumerate() {
        if i == 0 {
            let _ = writeln!(
                out,
                "  {unit:>10}  {address:>18}  {:>8}  {:>5}",
                "EXPECTED", "FOUND"
            );
        }
        let _ = writeln!(
            out,
            "  {number:>10}  {addr:#018x}  {expected:>#8x}  {found:>#5x}"
        );
        listed += 1;
    }
    if listed > 0 && total > listed {
        let _ = writeln!(out, "  … and {} more {plural}", total - listed);
    }
}

/// Register files that differ from the replay: "`who` N at `step` S: …".
fn render_register_mismatches(
    out: &mut String,
    who: &str,
    step: &str,
    mismatches: &[RegisterMismatch],
) {
    for r in mismatches {
        let _ = writeln!(
            out,
            "  {who} {} at {step} {}: registers {:x?}, replay expects {:x?}",
            r.vcpu, r.steps, r.found_rng, r.expected_rng
        );
    }
}

/// The disk part of a verify report: bytes checked, mismatched blocks with the byte offset
/// of their first differing byte, and disk lanes whose registers differ.
fn render_disk_verify(out: &mut String, report: &VerifyReport) {
    let _ = writeln!(
        out,
        "  disk: {} checked ({} bytes), {} mismatched blocks; disk writes per vCPU {:?}",
        format_bytes(report.disk_bytes_checked),
        report.disk_bytes_checked,
        report.mismatched_disk_blocks,
        report.disk_steps
    );
    render_mismatches(
        out,
        ("BLOCK", "OFFSET", "disk blocks"),
        report
            .first_disk_mismatches
            .iter()
            .map(|m| (m.block, m.offset, m.expected, m.found)),
        report.mismatched_disk_blocks,
    );
    render_register_mismatches(
        out,
        "disk lane of vCPU",
        "write",
        &report.disk_register_mismatches,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_dataplane::guest::reference::{DiskMismatch, Mismatch};

    #[test]
    fn milliseconds_read_well() {
        assert_eq!(format_ms(1234.0), "1.23 s");
        assert_eq!(format_ms(250.4), "250 ms");
        assert_eq!(format_ms(12.54), "12.5 ms");
        assert_eq!(format_ms(0.4), "0.40 ms");
        assert_eq!(format_dirty_rate(u64::MAX), "unpaced");
        assert_eq!(format_dirty_rate(100 << 20), "100 MiB/s");
    }

    #[test]
    fn a_failed_verify_lists_page_address_expected_found() {
        let report = VerifyReport {
            ok: false,
            pages_checked: 10,
            mismatched_pages: 3,
            first_mismatches: vec![Mismatch {
                page: 2,
                addr: 0x2010,
                expected: 0xab,
                found: 0,
            }],
            register_mismatches: vec![],
            steps: vec![1],
            disk_bytes_checked: 0,
            mismatched_disk_blocks: 0,
            first_disk_mismatches: vec![],
            disk_register_mismatches: vec![],
            disk_steps: vec![],
            elapsed_ms: 1.0,
        };
        let text = render_verify("v", &report);
        assert!(text.contains("FAILED"), "{text}");
        assert!(text.contains("0x0000000000002010"), "{text}");
        assert!(text.contains("0xab"), "{text}");
        assert!(text.contains("and 2 more"), "{text}");
        assert!(!text.contains("disk"), "no disk, no disk line: {text}");
    }

    #[test]
    fn a_failed_disk_verify_lists_block_and_byte_offset() {
        let report = VerifyReport {
            ok: false,
            pages_checked: 10,
            mismatched_pages: 0,
            first_mismatches: vec![],
            register_mismatches: vec![],
            steps: vec![1],
            disk_bytes_checked: 128 << 20,
            mismatched_disk_blocks: 4,
            first_disk_mismatches: vec![DiskMismatch {
                block: 300,
                offset: 300 * 4096 + 17,
                expected: 0x5a,
                found: 0,
            }],
            disk_register_mismatches: vec![],
            disk_steps: vec![7, 9],
            elapsed_ms: 1.0,
        };
        let text = render_verify("v", &report);
        for part in [
            "FAILED",
            "128 MiB checked",
            "4 mismatched blocks",
            "BLOCK",
            "OFFSET",
            "300",
            "0x000000000012c011",
            "0x5a",
            "and 3 more disk blocks",
        ] {
            assert!(text.contains(part), "{part:?} missing from {text}");
        }
    }

    #[test]
    fn vm_status_shows_the_disk() {
        let vm = VmInfo {
            name: "d".into(),
            memory_bytes: 64 << 20,
            vcpus: 2,
            pattern: ferry_dataplane::guest::reference::Pattern::Uniform,
            dirty_rate_bytes_per_s: 0,
            seed: 1,
            fill_percent: 100,
            state: crate::api::VmState::Running,
            running: true,
            total_steps: 0,
            steps: vec![0, 0],
            throttle_percent: 0,
            disk: Some(DiskInfo {
                bytes: 8 << 30,
                path: "/var/lib/ferry/disks/d.img".into(),
                agent_owned: true,
                block_device: false,
                direct_io: true,
                pattern: ferry_dataplane::guest::reference::DiskPattern::Hotset,
                write_rate_bytes_per_s: 20 << 20,
                fill_percent: 25,
                steps: vec![3, 4],
                total_steps: 7,
                write_errors: 0,
                unmirrored_latency: LatencySummary {
                    count: 7,
                    p50_us: 85.0,
                    p99_us: 1200.0,
                    max_us: 1500.0,
                },
            }),
            epoch: 3,
            owner: "this agent".into(),
        };
        let text = render_vm_detail(&vm);
        for part in [
            "8.00 GiB",
            "/var/lib/ferry/disks/d.img",
            "direct I/O yes",
            "20.00 MiB/s of hotset writes",
            "25% filled",
            "disk steps   7 (3 4 per vCPU)",
            "owner        this agent",
            "epoch        3",
            "0 failed",
            "85 µs / 1.20 ms",
        ] {
            assert!(text.contains(part), "{part:?} missing from {text}");
        }
        let table = render_vm_table(&[vm]);
        assert!(
            table.contains("DISK") && table.contains("8.00 GiB"),
            "{table}"
        );
        assert_eq!(format_latency(&LatencySummary::default()), "-");
    }
}
