//! Control-channel messages between source and destination engines.
