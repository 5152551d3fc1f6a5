//! Placeholder replaced by the tracker implementation.
use super::bitmap::DirtyBitmap;

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("placeholder")]
    Placeholder,
}

pub trait DirtyTracker: Send {
    fn start(&mut self) -> Result<(), TrackerError>;
    fn collect(&mut self) -> Result<DirtyBitmap, TrackerError>;
    fn put_back(&mut self, pages: &DirtyBitmap);
    fn name(&self) -> &'static str;
}
