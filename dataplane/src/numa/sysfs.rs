//! Which NUMA node a NIC or a disk hangs off, from sysfs, and which NIC or disk the agent
//! uses: the interface holding its listen address (`getifaddrs`), the disk holding its data
//! directory (`stat`'s device number).
//!
//! A device's node is the `numa_node` attribute of its bus device (PCI: the function, or a
//! bridge above it), found by walking up from `/sys/class/net/IFACE/device` or
//! `/sys/block/DISK/device`; `-1` or no attribute means the platform does not say.
//! [`Sysfs::at`] reads a fake tree instead of `/sys`, for tests.

use std::ffi::CStr;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::topology::{Device, DeviceKind, Topology};

/// Bus levels walked up from a device looking for `numa_node` (PCI nests a few bridges
/// deep; this is far more than any real tree).
const SYSFS_WALK_MAX: usize = 32;
/// Stacked block devices followed down to a physical disk (dm on md on a partition …).
const BLOCK_STACK_MAX: usize = 8;
/// Interfaces looked at in the `getifaddrs` list.
const INTERFACE_ADDRESSES_MAX: usize = 4096;

/// A sysfs tree: `/sys`, or a copy of its shape for tests.
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    /// The host's `/sys`.
    pub fn host() -> Self {
        Self::at("/sys")
    }

    /// A tree rooted at `root` (with `class/net`, `block`, `dev/block`, `devices` below).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The node of network interface `iface` (`None`: virtual, like `lo`, or not said).
    pub fn nic_node(&self, iface: &str) -> Option<u32> {
        self.device_node(&self.root.join("class/net").join(iface).join("device"))
    }

    /// The node of whole disk `disk` (`nvme0n1`, `sda`).
    pub fn disk_node(&self, disk: &str) -> Option<u32> {
        self.device_node(&self.root.join("block").join(disk).join("device"))
    }

    /// The NIC `iface` with its node: sysfs first, else hwloc's I/O object of that name.
    pub fn nic(&self, topology: &Topology, iface: &str) -> Device {
        Device {
            name: iface.to_string(),
            kind: DeviceKind::Nic,
            node: self
                .nic_node(iface)
                .or_else(|| topology.device_node(DeviceKind::Nic, iface)),
        }
    }

    /// The disk `disk` with its node: sysfs first, else hwloc's I/O object of that name.
    pub fn disk(&self, topology: &Topology, disk: &str) -> Device {
        Device {
            name: disk.to_string(),
            kind: DeviceKind::Disk,
            node: self
                .disk_node(disk)
                .or_else(|| topology.device_node(DeviceKind::Disk, disk)),
        }
    }

    /// The whole disk behind block device `major:minor`: a partition's disk, and for a
    /// stacked device (device-mapper, md) the disk of its first underlying device.
    pub fn disk_for_devnum(&self, major: u32, minor: u32) -> Option<String> {
        let mut dir =
            fs::canonicalize(self.root.join(format!("dev/block/{major}:{minor}"))).ok()?;
        for _ in 0..BLOCK_STACK_MAX {
            if dir.join("partition").exists() {
                dir = dir.parent()?.to_path_buf();
            }
            if dir.join("device").exists() {
                return Some(dir.file_name()?.to_string_lossy().into_owned());
            }
            // No bus device: a stacked device; follow its first underlying one.
            let mut slaves: Vec<PathBuf> = fs::read_dir(dir.join("slaves"))
                .ok()?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .collect();
            slaves.sort();
            dir = fs::canonicalize(slaves.first()?).ok()?;
        }
        None
    }

    /// The whole disk holding `path` (or its nearest existing ancestor): `None` on tmpfs,
    /// overlay or any file system without one block device.
    pub fn disk_for_path(&self, path: &Path) -> Option<String> {
        let existing = path.ancestors().find(|p| p.exists())?;
        let dev = fs::metadata(existing).ok()?.dev();
        let (major, minor) = split_devnum(dev);
        if major == 0 {
            // Anonymous device numbers: tmpfs, overlay, btrfs subvolumes.
            return None;
        }
        self.disk_for_devnum(major, minor)
    }

    /// Walks up from `device` (a symlink into `devices/`) to the first `numa_node` that
    /// names a node.
    fn device_node(&self, device: &Path) -> Option<u32> {
        let mut dir = fs::canonicalize(device).ok()?;
        let root = fs::canonicalize(&self.root).ok()?;
        for _ in 0..SYSFS_WALK_MAX {
            if !dir.starts_with(&root) || dir == root {
                return None;
            }
            if let Ok(text) = fs::read_to_string(dir.join("numa_node")) {
                // -1: this level does not know; a bridge above may.
                if let Ok(node) = text.trim().parse::<u32>() {
                    return Some(node);
                }
            }
            dir = dir.parent()?.to_path_buf();
        }
        None
    }
}

/// Splits a Linux `dev_t` into major and minor (glibc's `gnu_dev_major`/`gnu_dev_minor`).
fn split_devnum(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// The whole disk holding `path` on this host (see [`Sysfs::disk_for_path`]).
pub fn disk_for_path(path: &Path) -> Option<String> {
    Sysfs::host().disk_for_path(path)
}

/// The interface holding local address `addr` (`lo` for 127.0.0.1; `None` for the
/// unspecified address, which is every interface, or an address this host does not have).
pub fn nic_for_addr(addr: IpAddr) -> Option<String> {
    let addr = addr.to_canonical();
    if addr.is_unspecified() {
        return None;
    }
    interface_addresses()
        .into_iter()
        .find(|(_, a)| *a == addr)
        .map(|(name, _)| name)
}

/// Every (interface, address) pair of the host (`getifaddrs`), IPv4 and IPv6.
fn interface_addresses() -> Vec<(String, IpAddr)> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid place for the kernel-side allocation's head pointer.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut entry = list;
    while !entry.is_null() && found.len() < INTERFACE_ADDRESSES_MAX {
        // SAFETY: `entry` is a non-null node of the list getifaddrs returned, which stays
        // valid until freeifaddrs below; nothing writes it meanwhile.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose sa_family says
        // which larger sockaddr it is; we read it as that type only. ifa_name is a
        // NUL-terminated string that lives as long as the list.
        let (family, name) = unsafe {
            (
                i32::from((*ifa.ifa_addr).sa_family),
                CStr::from_ptr(ifa.ifa_name),
            )
        };
        let addr = match family {
            libc::AF_INET => {
                // SAFETY: sa_family is AF_INET, so the address is a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: sa_family is AF_INET6, so the address is a sockaddr_in6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        found.push((name.to_string_lossy().into_owned(), addr));
    }
    // SAFETY: `list` came from getifaddrs and is freed once; no reference into it
    // survives (names were copied).
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Writes `text` to `root/rel`, creating directories.
    fn put(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn link(root: &Path, rel: &str, target: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        symlink(target, path).unwrap();
    }

    /// A fake sysfs: eth0 (virtio under a PCI function on node 1), nvme0n1 with partition
    /// p2 (NVMe controller on node 3), dm-0 stacked on nvme0n1p2, and vda (node -1).
    fn fake_sysfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // eth0: the numa_node is on the PCI function, one level above the virtio device.
        put(root, "devices/pci0000:40/0000:40:03.0/numa_node", "1\n");
        fs::create_dir_all(root.join("devices/pci0000:40/0000:40:03.0/virtio2/net/eth0")).unwrap();
        link(
            root,
            "class/net/eth0",
            "../../devices/pci0000:40/0000:40:03.0/virtio2/net/eth0",
        );
        link(
            root,
            "devices/pci0000:40/0000:40:03.0/virtio2/net/eth0/device",
            "../../../virtio2",
        );
        // lo: virtual, no device link.
        fs::create_dir_all(root.join("devices/virtual/net/lo")).unwrap();
        link(root, "class/net/lo", "../../devices/virtual/net/lo");
        // nvme0n1 and its partition p2.
        let nvme = "devices/pci0000:80/0000:80:01.0/nvme/nvme0";
        put(root, &format!("{nvme}/numa_node"), "3\n");
        put(root, &format!("{nvme}/nvme0n1/nvme0n1p2/partition"), "2\n");
        link(root, &format!("{nvme}/nvme0n1/device"), "../../nvme0");
        link(root, "block/nvme0n1", &format!("../{nvme}/nvme0n1"));
        link(root, "dev/block/259:0", &format!("../../{nvme}/nvme0n1"));
        link(
            root,
            "dev/block/259:2",
            &format!("../../{nvme}/nvme0n1/nvme0n1p2"),
        );
        // dm-0 on nvme0n1p2.
        fs::create_dir_all(root.join("devices/virtual/block/dm-0/slaves")).unwrap();
        link(
            root,
            "devices/virtual/block/dm-0/slaves/nvme0n1p2",
            &format!("../../../../../{nvme}/nvme0n1/nvme0n1p2"),
        );
        link(root, "dev/block/253:0", "../../devices/virtual/block/dm-0");
        // vda: the platform does not say.
        let vda = "devices/pci0000:00/0000:00:02.0";
        put(root, &format!("{vda}/numa_node"), "-1\n");
        fs::create_dir_all(root.join(format!("{vda}/virtio1/block/vda"))).unwrap();
        link(
            root,
            &format!("{vda}/virtio1/block/vda/device"),
            "../../../virtio1",
        );
        link(root, "block/vda", &format!("../{vda}/virtio1/block/vda"));
        dir
    }

    #[test]
    fn sysfs_nic_node_walks_up_to_the_pci_function() {
        let dir = fake_sysfs();
        let sysfs = Sysfs::at(dir.path());
        assert_eq!(sysfs.nic_node("eth0"), Some(1));
        assert_eq!(sysfs.nic_node("lo"), None);
        assert_eq!(sysfs.nic_node("missing0"), None);
    }

    #[test]
    fn sysfs_disk_node_and_minus_one() {
        let dir = fake_sysfs();
        let sysfs = Sysfs::at(dir.path());
        assert_eq!(sysfs.disk_node("nvme0n1"), Some(3));
        assert_eq!(sysfs.disk_node("vda"), None, "-1 is unknown");
    }

    #[test]
    fn sysfs_block_devices_resolve_to_their_whole_disk() {
        let dir = fake_sysfs();
        let sysfs = Sysfs::at(dir.path());
        assert_eq!(sysfs.disk_for_devnum(259, 0).as_deref(), Some("nvme0n1"));
        assert_eq!(sysfs.disk_for_devnum(259, 2).as_deref(), Some("nvme0n1"));
        assert_eq!(sysfs.disk_for_devnum(253, 0).as_deref(), Some("nvme0n1"));
        assert_eq!(sysfs.disk_for_devnum(8, 0), None);
    }

    #[test]
    fn sysfs_devices_fall_back_to_hwloc() {
        let dir = fake_sysfs();
        let sysfs = Sysfs::at(dir.path());
        let topology = Topology::synthetic(2, 2).with_device(Device {
            name: "vda".into(),
            kind: DeviceKind::Disk,
            node: Some(1),
        });
        assert_eq!(sysfs.disk(&topology, "vda").node, Some(1));
        assert_eq!(sysfs.disk(&topology, "nvme0n1").node, Some(3));
        assert_eq!(sysfs.nic(&topology, "lo").node, None);
    }

    #[test]
    fn devnum_split_matches_glibc() {
        // 259:2 (NVMe partition) and a large minor.
        assert_eq!(split_devnum((259 << 8) | 2), (259, 2));
        let dev = ((0x123u64 & 0xfff) << 8) | (0x45678u64 & 0xff) | ((0x45678u64 & !0xff) << 12);
        assert_eq!(split_devnum(dev), (0x123, 0x45678));
    }

    #[test]
    fn host_loopback_is_lo_and_unspecified_is_no_interface() {
        assert_eq!(
            nic_for_addr(IpAddr::V4(Ipv4Addr::LOCALHOST)).as_deref(),
            Some("lo")
        );
        assert_eq!(nic_for_addr(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), None);
        // Documentation range: on no interface.
        assert_eq!(nic_for_addr("192.0.2.77".parse().unwrap()), None);
        assert_eq!(Sysfs::host().nic_node("lo"), None);
    }

    #[test]
    fn host_disk_for_path_finds_a_disk_or_says_none() {
        // tmpfs has no disk; the working directory usually has one (not asserted: CI may
        // run on overlay).
        assert_eq!(disk_for_path(Path::new("/dev/shm")), None);
        if let Some(disk) = disk_for_path(Path::new(env!("CARGO_MANIFEST_DIR"))) {
            assert!(Path::new("/sys/block").join(&disk).exists(), "{disk}");
        }
        // A path that does not exist yet: its nearest existing ancestor.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            disk_for_path(&dir.path().join("not/yet")),
            disk_for_path(dir.path())
        );
    }
}
