//! CPU lists in the kernel's notation (`0-3,8`, as in `/sys/devices/system/node/node0/cpulist`
//! and `taskset -c`): parsed from `--cpus`, printed in the placement table.

use super::NumaError;

/// CPU ids are below this: the kernel's `NR_CPUS` tops out at 8192 today, and a bound keeps
/// a typo like `0-4000000000` from allocating a list of four billion entries.
pub const CPU_ID_LIMIT: u32 = 65_536;

/// Parses `0-3,8` into `[0, 1, 2, 3, 8]`: comma-separated CPU ids or inclusive ranges,
/// blanks around items allowed. The result is sorted and has no duplicates; an empty list,
/// a reversed range or an id at or above [`CPU_ID_LIMIT`] is an error.
pub fn parse_cpu_list(list: &str) -> Result<Vec<u32>, NumaError> {
    let bad = |reason: String| NumaError::CpuList {
        list: list.to_string(),
        reason,
    };
    let id = |text: &str| -> Result<u32, NumaError> {
        let text = text.trim();
        let cpu: u32 = text
            .parse()
            .map_err(|_| bad(format!("`{text}` is not a CPU number")))?;
        if cpu >= CPU_ID_LIMIT {
            return Err(bad(format!(
                "CPU {cpu} is beyond the largest CPU id ({})",
                CPU_ID_LIMIT - 1
            )));
        }
        Ok(cpu)
    };
    if list.trim().is_empty() {
        return Err(bad("the list is empty".into()));
    }
    let mut cpus = Vec::new();
    for item in list.split(',') {
        match item.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (id(first)?, id(last)?);
                if first > last {
                    return Err(bad(format!("the range {first}-{last} runs backwards")));
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(id(item)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Formats CPU ids compactly: `[0, 1, 2, 3, 8]` becomes `0-3,8` (any order, duplicates
/// ignored; an empty list is the empty string).
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        // Extend the run [first, last] while the ids are consecutive.
        let first = sorted[i];
        let mut last = first;
        while i + 1 < sorted.len() && sorted[i + 1] == last + 1 {
            i += 1;
            last = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if first == last {
            out.push_str(&first.to_string());
        } else {
            out.push_str(&format!("{first}-{last}"));
        }
        i += 1;
    }
    out
}

/// serde helper: a CPU list field serialized as its compact text (`"0-3,8"`).
pub(crate) fn serialize_cpus<S: serde::Serializer>(
    cpus: &[u32],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_cpu_list(cpus))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cpu_list_parses_ranges_and_singles() {
        assert_eq!(parse_cpu_list("0-3,8").unwrap(), vec![0, 1, 2, 3, 8]);
        assert_eq!(parse_cpu_list("5").unwrap(), vec![5]);
        assert_eq!(parse_cpu_list(" 8, 1-2 ,2").unwrap(), vec![1, 2, 8]);
        assert_eq!(parse_cpu_list("3-3").unwrap(), vec![3]);
    }

    #[test]
    fn cpu_list_rejects_nonsense_with_the_reason() {
        for (list, reason) in [
            ("", "empty"),
            ("x", "`x` is not a CPU number"),
            ("1,,2", "`` is not a CPU number"),
            ("3-1", "runs backwards"),
            ("-1", "`` is not a CPU number"),
            ("0-4000000000", "beyond the largest CPU id"),
        ] {
            let err = parse_cpu_list(list).unwrap_err().to_string();
            assert!(err.contains(reason), "{list:?}: {err}");
        }
    }

    #[test]
    fn cpu_list_formats_compactly() {
        assert_eq!(format_cpu_list(&[8, 0, 1, 2, 3]), "0-3,8");
        assert_eq!(format_cpu_list(&[0]), "0");
        assert_eq!(format_cpu_list(&[0, 2, 4]), "0,2,4");
        assert_eq!(format_cpu_list(&[1, 1, 2]), "1-2");
        assert_eq!(format_cpu_list(&[]), "");
    }

    proptest! {
        #[test]
        fn cpu_list_round_trips(cpus in proptest::collection::btree_set(0..CPU_ID_LIMIT, 1..64)) {
            let cpus: Vec<u32> = cpus.into_iter().collect();
            let text = format_cpu_list(&cpus);
            prop_assert_eq!(parse_cpu_list(&text).unwrap(), cpus);
        }

        #[test]
        fn cpu_list_round_trips_dense_runs(start in 0u32..1000, len in 1u32..200, gap in 2u32..5) {
            let cpus: Vec<u32> = (start..start + len).chain(start + len + gap..start + 2 * len + gap).collect();
            prop_assert_eq!(parse_cpu_list(&format_cpu_list(&cpus)).unwrap(), cpus);
        }
    }
}
