//! The agent's disk images: where they live, which ones the agent owns, and how they are
//! made for a new VM or an incoming migration.
//!
//! Ownership is decided by where an image came from, never by where it lies:
//! - `vm create --disk SIZE` and every incoming migration create `DATA_DIR/disks/NAME.img`.
//!   Those images are the agent's: `vm destroy`, a completed outgoing migration (unless
//!   `--keep-source-disks`) and a failed incoming migration delete them.
//! - `vm create --disk PATH` uses an existing file or block device. The agent overwrites its
//!   content but never deletes it.
//!
//! An image is created with `O_CREAT|O_EXCL`: a file left behind under the name (by
//! `--keep-source-disks`, or a crash) is refused, never overwritten.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_dataplane::disk::{DirectIo, DiskError, DiskImage, VirtualDisk};
use tracing::{info, warn};

use crate::api::ErrorKind;

/// Directory of the agent's images, inside its data directory.
pub const DISKS_DIR: &str = "disks";
/// Extension of the agent's images (raw).
pub const IMAGE_EXTENSION: &str = "img";

#[derive(Debug, thiserror::Error)]
pub enum DiskStoreError {
    #[error("the VM name {name:?} cannot name a disk image file (it must not be \".\" or \"..\" nor contain '/' or NUL)")]
    BadName { name: String },
    #[error("a disk image for {name:?} already exists at {} (left by an earlier VM of that name, e.g. after `migrate --keep-source-disks`, or by a crash); the agent does not overwrite it: remove it, or use another name", path.display())]
    Leftover { name: String, path: PathBuf },
    #[error("the disk path {} must be absolute", path.display())]
    RelativePath { path: PathBuf },
    #[error("cannot resolve the disk path {}", path.display())]
    Resolve { path: PathBuf, source: io::Error },
    #[error("cannot create the disk image for {name:?}")]
    Create { name: String, source: DiskError },
    #[error("cannot open the disk {}", path.display())]
    Open { path: PathBuf, source: DiskError },
    #[error("cannot zero the disk {} before writing its boot content", path.display())]
    Zero { path: PathBuf, source: DiskError },
}

impl DiskStoreError {
    /// How the API reports this error: a request that cannot work as asked (a filesystem
    /// that refuses O_DIRECT under `required`, no room, a leftover image, a bad path) is
    /// the caller's to fix; an I/O failure is not.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DiskStoreError::Create { source, .. }
            | DiskStoreError::Open { source, .. }
            | DiskStoreError::Zero { source, .. } => match source {
                DiskError::Io { .. } | DiskError::Ring { .. } | DiskError::Mirror { .. } => {
                    ErrorKind::Internal
                }
                _ => ErrorKind::BadRequest,
            },
            DiskStoreError::Leftover { .. } => ErrorKind::AlreadyExists,
            _ => ErrorKind::BadRequest,
        }
    }
}

/// A VM's disk as the registry remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostedDisk {
    /// The image (canonical for a user-supplied path).
    pub path: PathBuf,
    /// Created by this agent under its disks directory: deleted with the VM.
    pub agent_owned: bool,
}

/// The agent's disks directory.
#[derive(Clone, Debug)]
pub struct DiskStore {
    dir: PathBuf,
}

impl DiskStore {
    /// Creates `data_dir/disks` if missing.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let dir = data_dir.join(DISKS_DIR);
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the agent keeps the image of VM `name`.
    pub fn image_path(&self, name: &str) -> Result<PathBuf, DiskStoreError> {
        check_file_name(name)?;
        Ok(self.dir.join(format!("{name}.{IMAGE_EXTENSION}")))
    }

    /// Creates the agent-owned image of VM `name` (reads as zero). A file already there is
    /// refused, not overwritten; `DiskImage::create` removes what it created if it fails.
    pub fn create(
        &self,
        name: &str,
        bytes: u64,
        direct_io: DirectIo,
    ) -> Result<DiskImage, DiskStoreError> {
        let path = self.image_path(name)?;
        match DiskImage::create(&path, bytes, direct_io) {
            Ok(image) => {
                info!(vm = %name, path = %path.display(), bytes, direct = image.is_direct(), "disk image created");
                Ok(image)
            }
            Err(DiskError::Exists { .. }) => Err(DiskStoreError::Leftover {
                name: name.into(),
                path,
            }),
            Err(source) => Err(DiskStoreError::Create {
                name: name.into(),
                source,
            }),
        }
    }

    /// Deletes an image the agent owns (a missing file is not an error: it is gone already).
    /// Returns whether a file was removed.
    pub fn remove(&self, disk: &HostedDisk, why: &str) -> bool {
        if !disk.agent_owned {
            return false;
        }
        // Defence in depth: the agent deletes only files inside its own disks directory.
        if disk.path.parent() != Some(self.dir.as_path()) {
            warn!(path = %disk.path.display(), "not deleting a disk image outside the agent's disks directory");
            return false;
        }
        match std::fs::remove_file(&disk.path) {
            Ok(()) => {
                info!(path = %disk.path.display(), reason = why, "disk image deleted");
                true
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => false,
            Err(err) => {
                warn!(path = %disk.path.display(), error = %err, reason = why, "cannot delete the disk image");
                false
            }
        }
    }
}

/// A user-supplied disk: the canonical path (so that two VMs cannot share one image through
/// different names for it) and the opened image.
pub fn open_user_disk(
    path: &Path,
    direct_io: DirectIo,
) -> Result<(PathBuf, DiskImage), DiskStoreError> {
    if !path.is_absolute() {
        return Err(DiskStoreError::RelativePath { path: path.into() });
    }
    let canonical = std::fs::canonicalize(path).map_err(|source| DiskStoreError::Resolve {
        path: path.into(),
        source,
    })?;
    let image = DiskImage::open(&canonical, direct_io).map_err(|source| DiskStoreError::Open {
        path: canonical.clone(),
        source,
    })?;
    Ok((canonical, image))
}

/// Makes a user-supplied image read as zero everywhere (the reference VM's boot writes only
/// its filled extents) and wraps it for the guest.
pub fn zero_for_boot(image: DiskImage) -> Result<Arc<VirtualDisk>, DiskStoreError> {
    image
        .zero_range(0, image.size())
        .map_err(|source| DiskStoreError::Zero {
            path: image.path().to_path_buf(),
            source,
        })?;
    Ok(Arc::new(VirtualDisk::new(image)))
}

/// A VM name that is safe as a file name in the disks directory.
fn check_file_name(name: &str) -> Result<(), DiskStoreError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(DiskStoreError::BadName { name: name.into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths_stay_inside_the_disks_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        assert!(store.dir().is_dir());
        assert_eq!(
            store.image_path("web1").unwrap(),
            dir.path().join("disks/web1.img")
        );
        for bad in ["", ".", "..", "../x", "a/b", "a\0b"] {
            assert!(
                matches!(store.image_path(bad), Err(DiskStoreError::BadName { .. })),
                "{bad:?}"
            );
        }
        // Dots inside a name are fine: the result is still one file in the directory.
        assert_eq!(store.image_path("..a").unwrap().parent(), Some(store.dir()));
    }

    #[test]
    fn create_refuses_a_leftover_and_remove_deletes_only_owned_images() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let image = store.create("a", 1 << 20, DirectIo::Auto).unwrap();
        let path = image.path().to_path_buf();
        drop(image);
        let err = store.create("a", 1 << 20, DirectIo::Auto).unwrap_err();
        assert!(matches!(err, DiskStoreError::Leftover { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        assert!(path.exists(), "a leftover is never overwritten or removed");

        let user = HostedDisk {
            path: path.clone(),
            agent_owned: false,
        };
        assert!(!store.remove(&user, "test"));
        assert!(path.exists());
        let outside = HostedDisk {
            path: dir.path().join("elsewhere.img"),
            agent_owned: true,
        };
        std::fs::write(&outside.path, b"x").unwrap();
        assert!(!store.remove(&outside, "test"));
        assert!(outside.path.exists());
        let owned = HostedDisk {
            path: path.clone(),
            agent_owned: true,
        };
        assert!(store.remove(&owned, "test"));
        assert!(!path.exists());
        assert!(!store.remove(&owned, "test"), "already gone");
    }

    #[test]
    fn user_disks_must_be_absolute_existing_and_are_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            open_user_disk(Path::new("rel/disk.img"), DirectIo::Off),
            Err(DiskStoreError::RelativePath { .. })
        ));
        let missing = open_user_disk(&dir.path().join("missing.img"), DirectIo::Off).unwrap_err();
        assert!(
            matches!(missing, DiskStoreError::Resolve { .. }),
            "{missing:?}"
        );
        assert_eq!(missing.kind(), ErrorKind::BadRequest);

        let path = dir.path().join("user.img");
        std::fs::write(&path, vec![0xabu8; 1 << 20]).unwrap();
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let (canonical, image) = open_user_disk(&link, DirectIo::Off).unwrap();
        assert_eq!(canonical, std::fs::canonicalize(&path).unwrap());
        assert_eq!(image.size(), 1 << 20);
        let disk = zero_for_boot(image).unwrap();
        assert_eq!(disk.size(), 1 << 20);
        drop(disk);
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    }
}
