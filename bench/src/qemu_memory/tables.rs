//! The three tables of `ferry-bench qemu`, with what each column means under them.

use super::{qemu_vm, PairMedians, PairRow, QemuMemoryResults, GIB};
use crate::report::{self, fixed, Table};

/// "ok", or which side failed how often, with the first error.
fn status(row: &PairRow) -> String {
    let failed_qemu: Vec<&str> = row.qemu.iter().filter_map(|s| s.error.as_deref()).collect();
    let failed_ferry: Vec<&str> = row
        .ferry
        .iter()
        .filter_map(|s| s.error.as_deref())
        .collect();
    if failed_qemu.is_empty() && failed_ferry.is_empty() {
        return "ok".to_string();
    }
    let n = row.qemu.len();
    let first = failed_qemu
        .first()
        .map(|e| format!("QEMU: {e}"))
        .or_else(|| failed_ferry.first().map(|e| format!("ferry: {e}")))
        .unwrap_or_default();
    format!(
        "FAILED (QEMU {}/{n} ok, ferry {}/{n} ok; {})",
        n - failed_qemu.len(),
        row.ferry.len() - failed_ferry.len(),
        first.replace('|', "/")
    )
}

/// `value` against a target: "met"/"NOT met", or "-" with nothing to compare.
fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        None => "-",
        Some(true) => "met",
        Some(false) => "NOT met",
    }
}

fn check(value: f64, good: impl Fn(f64) -> bool) -> Option<bool> {
    value.is_finite().then(|| good(value))
}

pub fn print(r: &QemuMemoryResults) {
    let gib = |b: f64| fixed(b / GIB, 2);
    println!(
        "## qemu 1: ferry vs QEMU multifd vs raw TCP push ({} streams / channels, downtime \
         limit {} ms, QEMU under TCG, median of {})\n",
        r.streams, r.downtime_ms, r.repeat
    );
    let mut t = Table::new(
        &[
            PAIR_HEAD.as_slice(),
            &[
                "ferry CPU s/GiB",
                "rounds",
                "throttle max %",
                "raw GiB/s",
                "raw CPU s/GiB",
                "GiB/s ferry/QEMU",
                "GiB/s ferry/raw",
                "CPU ferry/QEMU",
                "downtime ferry/QEMU",
                "QEMU guest MiB/s",
                "ferry guest MiB/s",
                "verify",
            ],
        ]
        .concat(),
    );
    for row in &r.rows {
        let m = &row.medians;
        let mut cells = qemu_cells(row);
        cells.extend(ferry_cells(m));
        cells.extend([
            format!(
                "{} ({})",
                fixed(m.ferry_same_state_cpu_s_per_gib, 2),
                fixed(m.ferry_cpu_s_per_gib, 2)
            ),
            fixed(m.ferry_rounds, 0),
            fixed(m.ferry_throttle_percent_max, 0),
            gib(m.raw_bytes_per_s),
            fixed(m.raw_cpu_s_per_gib, 2),
            fixed(m.throughput_ratio, 2),
            fixed(m.raw_ratio, 2),
            fixed(m.cpu_ratio, 2),
            fixed(m.downtime_ratio, 2),
            format!(
                "{}/{}",
                fixed(m.qemu_guest_rate_before, 0),
                fixed(m.qemu_guest_rate_during, 0)
            ),
            row.rate_mib_per_s.to_string(),
            status(row),
        ]);
        t.row(cells);
    }
    print!("{}", t.render());
    println!(
        "\nQEMU: {}, `-accel tcg,thread=multi -smp 1 -m M+{}M+M/{}` (room for the guest's kernel), guest = bench/guest/dirty.c (M MiB of \
         non-zero xorshift data, R MiB/s of 8-byte writes to uniformly random pages); \
         capabilities multifd + auto-converge, multifd-channels = streams, downtime-limit as \
         above, max-bandwidth 0 (= no rate limit since QEMU 8.1), destination RAM {}.\n\
         ferry: two `ferry agent` processes on loopback, `ferry vm create --vcpus 1 \
         --dirty-rate R --disk 0` (uniform pattern), `ferry migrate --streams N --downtime-ms D`, \
         `ferry vm verify` on the destination.\n\
         QEMU total: `migrate` to the destination's RESUME event; QEMU downtime: the source's \
         STOP event to the destination's RESUME (host clock, what the guest sees), in brackets \
         QEMU's own `downtime`, which ends on the source before the destination has loaded and \
         resumed. ferry total: the report's total_ms (command to the destination's confirmed \
         resume), which includes the destination's preparation: creating and allocating the \
         VM's memory and pre-faulting it (prefault_ms counts the pre-fault only). ferry same-state = total − (pre-copy start − \
         trace): the migration with the destination already prepared, as QEMU's is (started \
         with -incoming, RAM preallocated, before the clock): the ratios use it. (The JSON \
         also has total − prefault + trace, which leaves the allocation in.)\n\
         GiB/s: QEMU ram.transferred / (total-time − setup-time); ferry bytes on the wire / \
         same-state time (handshake, trace, rounds and switch-over; the JSON also has the \
         rounds' own rate); raw: M bytes over N streams between two processes \
         (write_all from faulted-in memory, read_exact into pre-faulted memory, TCP_NODELAY) \
         from connected to the receiver's acknowledgement.\n\
         CPU s/GiB: utime+stime of both QEMUs / both agents minus their vCPU threads (QEMU \
         \"CPU 0/TCG\", ferry \"ferry-vcpu*\"), from the migrate command to the resume, per GiB \
         on the wire; ferry's first figure leaves out the destination's CPU before pre-copy \
         began (its pre-fault, if any; QEMU preallocates outside the clock), the bracketed one \
         counts it. raw: sender + receiver process CPU.\n\
         Ratios: median of per-run ratios (ferry / QEMU, ferry / raw of the same repetition). \
         QEMU guest MiB/s: the guest's FERRY-RATE lines before / during the migration (TCG \
         slows the writer while dirty tracking is on); ferry's reference VM is paced at R.\n",
        r.qemu_version,
        qemu_vm::HEADROOM_MIB,
        qemu_vm::HEADROOM_DIVISOR,
        if r.qemu_prealloc {
            "`memory-backend-ram,prealloc=on` (preallocated before the clock starts)"
        } else {
            "`memory-backend-ram` without prealloc (--qemu-prealloc off: faulted in as pages land)"
        },
    );
    // A ferry destination that allocates pages as they land has no pre-fault to take out:
    // then "same state" holds only against a QEMU destination that is not preallocated.
    let ferry_ok: Vec<_> = r
        .rows
        .iter()
        .flat_map(|row| &row.ferry)
        .filter(|s| s.error.is_none())
        .collect();
    if r.qemu_prealloc && !ferry_ok.is_empty() && ferry_ok.iter().all(|s| s.prefault_ms == 0.0) {
        println!(
            "NOTE: this ferry's destination did not pre-fault (prefault_ms = 0 in every run: it \
             allocates pages as they land), so its same-state figure still pays for allocating \
             every page and the destinations were NOT in the same state: QEMU's was preallocated \
             outside the clock. `--qemu-prealloc off` compares like with like.\n"
        );
    }
    let rows_ok: Vec<&PairMedians> = r.rows.iter().map(|row| &row.medians).collect();
    let all = |f: &dyn Fn(&PairMedians) -> Option<bool>| -> Option<bool> {
        let v: Vec<Option<bool>> = rows_ok.iter().map(|m| f(m)).collect();
        if v.iter().all(Option::is_none) {
            None
        } else {
            Some(v.iter().all(|x| x.unwrap_or(false)))
        }
    };
    println!(
        "Targets, every row: throughput >= 1.0 x QEMU: {}; >= 0.9 x raw push: {}; CPU s/GiB <= \
         0.7 x QEMU: {}; downtime <= QEMU's: {}.\n",
        verdict(all(&|m| check(m.throughput_ratio, |x| x >= 1.0))),
        verdict(all(&|m| check(m.raw_ratio, |x| x >= 0.9))),
        verdict(all(&|m| check(m.cpu_ratio, |x| x <= 0.7))),
        verdict(all(&|m| check(m.downtime_ratio, |x| x <= 1.0))),
    );

    if let Some(row) = &r.converge {
        let m = &row.medians;
        println!(
            "## qemu 2: convergence, {} at {} MB/s (QEMU multifd {} + auto-converge vs ferry \
             --streams {}, downtime limit {} ms, median of {})\n",
            report::size(row.size_bytes),
            row.rate_mib_per_s,
            r.streams,
            r.streams,
            r.downtime_ms,
            r.repeat
        );
        let stop_reasons: Vec<&str> = row
            .ferry
            .iter()
            .filter(|s| s.error.is_none())
            .map(|s| s.stop_reason.as_str())
            .collect();
        let mut t = Table::new(&[
            "size",
            "dirty MB/s",
            "QEMU total ms",
            "QEMU downtime ms",
            "QEMU syncs",
            "QEMU throttle max %",
            "QEMU guest MiB/s",
            "QEMU CPU s/GiB",
            "ferry total ms",
            "ferry same-state ms",
            "ferry downtime ms",
            "rounds",
            "ferry throttle max %",
            "stop reason",
            "ferry CPU s/GiB",
            "QEMU total / ferry same-state",
            "verify",
        ]);
        t.row(vec![
            report::size(row.size_bytes),
            row.rate_mib_per_s.to_string(),
            fixed(m.qemu_total_ms, 0),
            format!(
                "{} ({})",
                fixed(m.qemu_downtime_ms, 1),
                fixed(m.qemu_reported_downtime_ms, 0)
            ),
            fixed(m.qemu_dirty_sync_count, 0),
            fixed(m.qemu_throttle_percent_max, 0),
            format!(
                "{}/{}",
                fixed(m.qemu_guest_rate_before, 0),
                fixed(m.qemu_guest_rate_during, 0)
            ),
            fixed(m.qemu_cpu_s_per_gib, 2),
            fixed(m.ferry_total_ms, 0),
            fixed(m.ferry_same_state_ms, 0),
            fixed(m.ferry_downtime_ms, 1),
            fixed(m.ferry_rounds, 0),
            fixed(m.ferry_throttle_percent_max, 0),
            if stop_reasons.is_empty() {
                "-".to_string()
            } else {
                stop_reasons.join(",")
            },
            format!(
                "{} ({})",
                fixed(m.ferry_same_state_cpu_s_per_gib, 2),
                fixed(m.ferry_cpu_s_per_gib, 2)
            ),
            fixed(m.total_ratio, 2),
            status(row),
        ]);
        print!("{}", t.render());
        println!(
            "\nQEMU guest MiB/s: what the TCG guest achieved before / during the migration \
             (it was asked for {} MiB/s). syncs: QEMU's dirty-sync-count. Target: ferry \
             converges no slower than QEMU (ratio >= 1): {}.\n",
            row.rate_mib_per_s,
            verdict(check(m.total_ratio, |x| x >= 1.0)),
        );
    }

    if !r.defaults.is_empty() {
        println!(
            "## qemu 3: out of the box: QEMU defaults vs `ferry migrate` with no flags (median \
             of {})\n",
            r.repeat
        );
        let mut t = Table::new(
            &[
                PAIR_HEAD.as_slice(),
                &[
                    "ferry CPU s/GiB",
                    "QEMU total / ferry same-state",
                    "QEMU total / ferry total",
                    "verify",
                ],
            ]
            .concat(),
        );
        for row in &r.defaults {
            let m = &row.medians;
            let mut cells = qemu_cells(row);
            cells.extend(ferry_cells(m));
            cells.extend([
                fixed(m.ferry_cpu_s_per_gib, 2),
                fixed(m.same_state_ratio, 1),
                fixed(m.total_ratio, 1),
                status(row),
            ]);
            t.row(cells);
        }
        print!("{}", t.render());
        let ratios: Vec<f64> = r
            .defaults
            .iter()
            .map(|row| row.medians.total_ratio)
            .collect();
        println!(
            "\nQEMU: no migration capability or parameter set (one stream, max-bandwidth 128 \
             MiB/s, downtime-limit 300 ms); its destination RAM preallocated as in the first \
             table. ferry: `ferry migrate NAME --to ADDR`. QEMU total / ferry same-state: both \
             destinations prepared before the clock, the issue's rule for every target. QEMU \
             total / ferry total: ferry also pays, on the clock, for preparing its destination \
             from fresh memory (allocation and pre-fault, counted in its time and CPU), QEMU \
             does not. Target: ferry >= 20 x faster, destinations in the same state: {}; ferry \
             also preparing its destination on the clock: {}.\n",
            verdict(twenty_times(
                &r.defaults
                    .iter()
                    .map(|row| row.medians.same_state_ratio)
                    .collect::<Vec<_>>()
            )),
            verdict(twenty_times(&ratios)),
        );
    }

    let plots: Vec<String> = r
        .rows
        .iter()
        .chain(&r.converge)
        .chain(&r.defaults)
        .flat_map(|row| &row.ferry)
        .filter_map(|s| s.plot.as_ref())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if !plots.is_empty() {
        println!(
            "ferry timelines (SVG), in {}: {}.\n",
            r.plots_dir.display(),
            plots.join(", ")
        );
    }
    println!(
        "Whole run: {:.1} min (QEMU guests boot and fill under TCG outside the clock).\n",
        r.elapsed_s / 60.0
    );
}

/// The cells every table starts with: the case, then QEMU's total, downtime (as the guest saw
/// it, QEMU's own figure in brackets), throughput and CPU per GiB.
fn qemu_cells(row: &PairRow) -> Vec<String> {
    let m = &row.medians;
    vec![
        report::size(row.size_bytes),
        row.rate_mib_per_s.to_string(),
        fixed(m.qemu_total_ms, 0),
        format!(
            "{} ({})",
            fixed(m.qemu_downtime_ms, 1),
            fixed(m.qemu_reported_downtime_ms, 0)
        ),
        fixed(m.qemu_bytes_per_s / GIB, 2),
        fixed(m.qemu_cpu_s_per_gib, 2),
    ]
}

/// The columns [`qemu_cells`] and [`ferry_cells`] fill, at the head of every pair table.
const PAIR_HEAD: [&str; 10] = [
    "size",
    "dirty MB/s",
    "QEMU total ms",
    "QEMU downtime ms",
    "QEMU GiB/s",
    "QEMU CPU s/GiB",
    "ferry total ms",
    "ferry same-state ms",
    "ferry downtime ms",
    "ferry GiB/s",
];

/// ferry's total, same-state, downtime and GiB/s cells, the same in every pair table.
fn ferry_cells(m: &PairMedians) -> [String; 4] {
    [
        fixed(m.ferry_total_ms, 0),
        fixed(m.ferry_same_state_ms, 0),
        fixed(m.ferry_downtime_ms, 1),
        fixed(m.ferry_bytes_per_s / GIB, 2),
    ]
}

/// Whether every out-of-the-box ratio reaches 20 (`None` without any measured ratio).
fn twenty_times(ratios: &[f64]) -> Option<bool> {
    if ratios.iter().all(|x| !x.is_finite()) {
        None
    } else {
        Some(ratios.iter().all(|&x| x >= 20.0))
    }
}
