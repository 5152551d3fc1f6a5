//! How the CLI prints VMs, verify reports and errors, for people and as JSON.

use std::fmt::Write as _;
use std::io::Write as _;

use ferry_dataplane::guest::reference::VerifyReport;
use ferry_dataplane::units::{format_bytes, format_rate};
use serde::Serialize;

use crate::api::VmInfo;

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
        "{:<20} {:<10} {:>10} {:>5} {:<8} {:>14} {:<7} {:>12}\n",
        "NAME", "STATE", "MEMORY", "VCPUS", "PATTERN", "DIRTY RATE", "RUNNING", "STEPS"
    );
    for vm in vms {
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>10} {:>5} {:<8} {:>14} {:<7} {:>12}",
            vm.name,
            vm.state.as_str(),
            format_bytes(vm.memory_bytes),
            vm.vcpus,
            vm.pattern.as_str(),
            format_dirty_rate(vm.dirty_rate_bytes_per_s),
            if vm.running { "yes" } else { "no" },
            vm.total_steps
        );
    }
    out
}

pub fn render_vm_detail(vm: &VmInfo) -> String {
    let mut out = String::new();
    let rows: [(&str, String); 9] = [
        ("name", vm.name.clone()),
        ("state", vm.state.to_string()),
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
    out
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
    if !report.first_mismatches.is_empty() {
        let _ = writeln!(
            out,
            "  {:>10}  {:>18}  {:>8}  {:>5}",
            "PAGE", "ADDRESS", "EXPECTED", "FOUND"
        );
        for m in &report.first_mismatches {
            let _ = writeln!(
                out,
                "  {:>10}  {:#018x}  {:>#8x}  {:>#5x}",
                m.page, m.addr, m.expected, m.found
            );
        }
        if report.mismatched_pages > report.first_mismatches.len() as u64 {
            let _ = writeln!(
                out,
                "  … and {} more pages",
                report.mismatched_pages - report.first_mismatches.len() as u64
            );
        }
    }
    for r in &report.register_mismatches {
        let _ = writeln!(
            out,
            "  vCPU {} at step {}: registers {:x?}, replay expects {:x?}",
            r.vcpu, r.steps, r.found_rng, r.expected_rng
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_dataplane::guest::reference::Mismatch;

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
            elapsed_ms: 1.0,
        };
        let text = render_verify("v", &report);
        assert!(text.contains("FAILED"), "{text}");
        assert!(text.contains("0x0000000000002010"), "{text}");
        assert!(text.contains("0xab"), "{text}");
        assert!(text.contains("and 2 more"), "{text}");
    }
}
