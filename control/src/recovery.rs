//! What a restarted agent brings back: the VMs its journal says it holds, from their
//! persistent files.
//!
//! A VM's files live in `MEMORY_DIR/NAME/` (the reference VM's memory, registers and spec,
//! see `ReferenceVm::boot_persistent`) plus `placement.json` there, written by the agent:
//! where the VM's disk image is and how it is opened. The image itself is where it always
//! was (`DATA_DIR/disks/NAME.img`, or the user's `--disk` path).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_dataplane::disk::{DirectIo, DiskImage, VirtualDisk};
use ferry_dataplane::guest::reference::ReferenceVm;
use serde::{Deserialize, Serialize};

use crate::disks::HostedDisk;
use crate::error_chain;

/// Name of the placement file in a VM's files directory.
pub const PLACEMENT_FILE: &str = "placement.json";

/// Where a VM's disk image is and how it is opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub disk: Option<PlacedDisk>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedDisk {
    pub path: PathBuf,
    /// The agent created it (and deletes it with the VM).
    pub agent_owned: bool,
    pub direct_io: DirectIo,
}

impl Placement {
    pub fn new(disk: Option<&HostedDisk>, direct_io: DirectIo) -> Self {
        Self {
            disk: disk.map(|d| PlacedDisk {
                path: d.path.clone(),
                agent_owned: d.agent_owned,
                direct_io,
            }),
        }
    }

    pub fn hosted(&self) -> Option<HostedDisk> {
        self.disk.as_ref().map(|d| HostedDisk {
            path: d.path.clone(),
            agent_owned: d.agent_owned,
        })
    }

    /// Writes `dir/placement.json` (write, fsync, rename: never torn).
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let tmp = dir.join(format!("{PLACEMENT_FILE}.tmp"));
        {
            let mut file = fs::File::create(&tmp)?;
            io::Write::write_all(&mut file, &json)?;
            file.sync_all()?;
        }
        fs::rename(&tmp, dir.join(PLACEMENT_FILE))
    }

    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join(PLACEMENT_FILE);
        let bytes = fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("parsing {}: {e}", path.display()))
    }
}

/// Reopens the VM whose files are in `dir`, parked: its disk image, then its memory and
/// registers (the step a crash may have cut short is completed).
pub fn reopen(dir: &Path) -> Result<(Arc<ReferenceVm>, Option<HostedDisk>), String> {
    let spec = ReferenceVm::read_spec(dir).map_err(|e| error_chain(&e))?;
    let placement = Placement::load(dir)?;
    let disk = match (&spec.disk, &placement.disk) {
        (None, None) => None,
        (Some(_), Some(placed)) => {
            let image = DiskImage::open(&placed.path, placed.direct_io).map_err(|e| {
                format!(
                    "opening the disk image {}: {}",
                    placed.path.display(),
                    error_chain(&e)
                )
            })?;
            Some(Arc::new(VirtualDisk::new(image)))
        }
        (Some(_), None) => return Err("the VM has a disk but no disk is placed".into()),
        (None, Some(_)) => return Err("a disk is placed for a VM without one".into()),
    };
    let vm = ReferenceVm::recover(dir, disk).map_err(|e| error_chain(&e))?;
    Ok((Arc::new(vm), placement.hosted()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_round_trips_and_a_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Placement::load(dir.path()).is_err());
        let placement = Placement::new(
            Some(&HostedDisk {
                path: "/x/y.img".into(),
                agent_owned: true,
            }),
            DirectIo::Auto,
        );
        placement.save(dir.path()).unwrap();
        assert_eq!(Placement::load(dir.path()).unwrap(), placement);
        assert_eq!(
            placement.hosted(),
            Some(HostedDisk {
                path: "/x/y.img".into(),
                agent_owned: true
            })
        );
    }
}
