//! ferry's control plane: the agent service that hosts VMs and runs both ends of a
//! migration, and the `ferry` CLI that talks to agents.
//!
//! - [`api`]: CLI ↔ agent requests and responses; [`peer`]: what opens a connection and the
//!   agent ↔ agent migration handshake.
//! - [`agent`]: the service; [`registry`]: the VMs it hosts; [`disks`]: their disk images
//!   and who owns them; [`migration`]: one migration's coordination on either side, around
//!   the data plane's engine.
//! - [`client`]: the CLI's side of the API; [`cli`]: flags; [`commands`]: running them;
//!   [`progress`] and [`output`]: what people (or scripts, with `--json`) see; [`demo`]:
//!   two agents and a migration in one command; [`sigint`]: Ctrl-C as a polled flag.

pub mod agent;
pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod commands;
pub mod demo;
pub mod disks;
pub mod journal;
pub mod migration;
pub mod output;
pub mod ownership;
pub mod peer;
pub mod plot;
pub mod progress;
pub mod recovery;
pub mod registry;
pub mod sigint;
pub mod simulation;

/// An error and its sources on one line (the dataplane's, so both halves word it alike).
pub use ferry_dataplane::engine::error_chain;

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_walks_sources() {
        let io = std::io::Error::other("disk on fire");
        let err = ferry_dataplane::wire::WireError::Io {
            op: "writing a message",
            source: io,
        };
        assert_eq!(
            super::error_chain(&err),
            "i/o error while writing a message: disk on fire"
        );
    }
}
