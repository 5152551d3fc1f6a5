//! The QEMU guest: a kernel found on this host, and an initramfs whose only program is
//! `bench/guest/dirty.c` (compiled here with `gcc -O2 -static`), packed by a small newc
//! cpio writer. Everything lands in `target/ferry-bench-guest/` and is rebuilt when
//! dirty.c changes (its text is compiled into the benchmark, so cargo notices).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// dirty.c as this benchmark was built with it.
const DIRTY_C: &str = include_str!("../../guest/dirty.c");
/// Where the rxe-vm setup keeps its kernel unless `RXE_VM_CACHE` says otherwise.
const RXE_VM_CACHE_DEFAULT: &str = "/var/cache/rxe-vm";

/// The guest's boot files.
#[derive(Clone, Debug)]
pub struct GuestFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// `target/` of this build: the directory above the one holding the running executable
/// (`target/release/ferry-bench`, or `target/release/deps/<test>` for a test binary).
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the benchmark's executable")?;
    let mut dir = exe.parent().context("the executable has no directory")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps/ has no parent")?;
    }
    Ok(dir
        .parent()
        .context("the profile directory has no parent")?
        .to_path_buf())
}

/// The kernel to boot: `explicit`, else the rxe-vm's decompressed ELF vmlinux (booted
/// through its PVH entry, which saves the seconds a bzImage spends unpacking under TCG).
pub fn find_kernel(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        anyhow::ensure!(path.is_file(), "--kernel {} does not exist", path.display());
        return Ok(path.to_path_buf());
    }
    let cache = std::env::var_os("RXE_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RXE_VM_CACHE_DEFAULT));
    let env = std::fs::read_to_string(cache.join("kernel.env")).with_context(|| {
        format!(
            "no guest kernel: {}/kernel.env is missing (run ../shared/rxe-vm/setup, which \
             `./dev setup` runs, or pass --kernel)",
            cache.display()
        )
    })?;
    let version = env
        .lines()
        .find_map(|l| l.strip_prefix("KVER="))
        .map(str::trim)
        .context("kernel.env has no KVER=")?;
    let boot = cache.join("root/boot");
    for name in [format!("vmlinux-{version}"), format!("vmlinuz-{version}")] {
        let path = boot.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "no vmlinux-{version} or vmlinuz-{version} in {}",
        boot.display()
    )
}

/// Compiles dirty.c and packs the initramfs, unless `target/ferry-bench-guest/` already
/// holds both for this very dirty.c.
pub fn build(kernel: PathBuf) -> anyhow::Result<GuestFiles> {
    let dir = target_dir()?.join("ferry-bench-guest");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let source = dir.join("dirty.c");
    let binary = dir.join("init");
    let initramfs = dir.join("initramfs.cpio");
    let current = std::fs::read_to_string(&source).ok().as_deref() == Some(DIRTY_C)
        && binary.is_file()
        && initramfs.is_file();
    if !current {
        // The archive goes last: a build interrupted before it is redone next time.
        let _ = std::fs::remove_file(&initramfs);
        std::fs::write(&source, DIRTY_C)?;
        let out = Command::new("gcc")
            .args(["-O2", "-static", "-Wall", "-o"])
            .arg(&binary)
            .arg(&source)
            .output()
            .context("running gcc (install build-essential; static glibc comes with it)")?;
        if !out.status.success() {
            bail!(
                "gcc -O2 -static {} failed: {}",
                source.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let init = std::fs::read(&binary)?;
        std::fs::write(&initramfs, initramfs_image(&init))
            .with_context(|| format!("writing {}", initramfs.display()))?;
        eprintln!("[qemu] built {}", initramfs.display());
    }
    Ok(GuestFiles { kernel, initramfs })
}

/// The kernel command line of a guest of `memory_mib` MiB dirtying `rate_mib_per_s`.
pub fn cmdline(memory_mib: u64, rate_mib_per_s: u64, seed: u64) -> String {
    // quiet: the console carries the guest's lines only. panic=-1 with -no-reboot: a guest
    // that dies (init exiting, out of memory) ends QEMU instead of hanging the benchmark.
    format!(
        "console=ttyS0 quiet panic=-1 rdinit=/init mitigations=off 8250.nr_uarts=1 \
         ferry_mem={memory_mib} ferry_rate={rate_mib_per_s} ferry_seed={seed}"
    )
}

/// The initramfs: /dev/console (the kernel opens it as init's stdio), /proc (mounted by
/// init) and /init.
pub fn initramfs_image(init: &[u8]) -> Vec<u8> {
    let mut cpio = CpioWriter::default();
    cpio.entry(".", DIRECTORY | 0o755, &[], (0, 0));
    cpio.entry("dev", DIRECTORY | 0o755, &[], (0, 0));
    cpio.entry("dev/console", CHAR_DEVICE | 0o600, &[], (5, 1));
    cpio.entry("proc", DIRECTORY | 0o755, &[], (0, 0));
    cpio.entry("init", REGULAR | 0o755, init, (0, 0));
    cpio.finish()
}

/// File type bits of a mode, and the types an initramfs needs.
const FILE_TYPE: u32 = 0o170_000;
const REGULAR: u32 = 0o100_000;
const DIRECTORY: u32 = 0o040_000;
const CHAR_DEVICE: u32 = 0o020_000;
const NEWC_MAGIC: &str = "070701";

/// A newc ("070701") cpio archive, the format the kernel unpacks into its rootfs: per
/// entry a header of 13 hex fields, the NUL-terminated name and the data, each padded to
/// 4 bytes; a `TRAILER!!!` entry ends it.
#[derive(Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_inode: u32,
}

impl CpioWriter {
    /// Appends one entry; `rdev` is (major, minor) of a device node.
    pub fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.next_inode += 1;
        let nlink = if mode & FILE_TYPE == DIRECTORY { 2 } else { 1 };
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("an initramfs file under 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("a short name"),
            0, // check (newc has none)
        ];
        self.out.extend_from_slice(NEWC_MAGIC.as_bytes());
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Magic plus 13 fields of 8 hex digits.
    const NEWC_HEADER_LEN: usize = 6 + 13 * 8;

    /// One parsed newc entry: (name, mode, rdev major, rdev minor, data).
    type Entry = (String, u32, u32, u32, Vec<u8>);

    fn parse(archive: &[u8]) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(&archive[at..at + 6], NEWC_MAGIC.as_bytes(), "magic at {at}");
            assert_eq!(at % 4, 0, "headers are 4-byte aligned");
            let field = |i: usize| {
                let hex = std::str::from_utf8(&archive[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
                u32::from_str_radix(hex, 16).unwrap()
            };
            let (mode, size, rmajor, rminor, namesize) = (
                field(1),
                field(6) as usize,
                field(9),
                field(10),
                field(11) as usize,
            );
            let name_at = at + NEWC_HEADER_LEN;
            assert_eq!(archive[name_at + namesize - 1], 0, "names end with NUL");
            let name =
                String::from_utf8(archive[name_at..name_at + namesize - 1].to_vec()).unwrap();
            let data_at = (name_at + namesize).next_multiple_of(4);
            let data = archive[data_at..data_at + size].to_vec();
            at = (data_at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(at, archive.len(), "nothing after the trailer");
                return entries;
            }
            entries.push((name, mode, rmajor, rminor, data));
        }
    }

    #[test]
    fn newc_round_trips_names_modes_devices_and_data() {
        let init: Vec<u8> = (0..1001u32).map(|i| i as u8).collect();
        let entries = parse(&initramfs_image(&init));
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, [".", "dev", "dev/console", "proc", "init"]);
        let console = &entries[2];
        assert_eq!(
            (console.1, console.2, console.3),
            (CHAR_DEVICE | 0o600, 5, 1)
        );
        assert_eq!(entries[4].1, REGULAR | 0o755);
        assert_eq!(
            entries[4].4, init,
            "data survives, odd length and padding included"
        );
        assert!(entries[..4].iter().all(|e| e.4.is_empty()));
    }

    #[test]
    fn cmdline_carries_the_guest_parameters() {
        let line = cmdline(4096, 200, 7);
        for part in [
            "console=ttyS0",
            "rdinit=/init",
            "panic=-1",
            "ferry_mem=4096",
            "ferry_rate=200",
            "ferry_seed=7",
        ] {
            assert!(
                line.split(' ').any(|w| w == part),
                "{part} missing from {line}"
            );
        }
    }
}
