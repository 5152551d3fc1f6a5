//! Tickets for requests that the destination acknowledges (disk chunks and mirrored
//! writes): the sender registers a ticket before sending, the link's ack reader completes
//! it, and whoever needs the outcome waits for it or polls it.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::TransportError;
use crate::wire::ACK_OK;

/// Outstanding tickets and their outcomes.
#[derive(Default)]
pub struct AckTable {
    state: Mutex<State>,
    changed: Condvar,
    /// Set in every ticket this table hands out (see [`AckTable::tagged`]).
    tag: u32,
}

/// The bit a tag may use; tickets count in the bits below it.
pub const TICKET_TAG_BIT: u32 = 1 << 31;

#[derive(Default)]
struct State {
    next: u32,
    /// Registered tickets: `None` until acknowledged, then the ack's status.
    pending: HashMap<u32, Option<u32>>,
    /// Set once the link is gone: every wait fails with this reason.
    closed: Option<String>,
}

impl AckTable {
    /// A table whose tickets all carry `tag` (0 or [`TICKET_TAG_BIT`]), so that two tables
    /// of one link can tell their tickets apart.
    pub fn tagged(tag: u32) -> Self {
        debug_assert!(tag & !TICKET_TAG_BIT == 0);
        Self {
            tag,
            ..Self::default()
        }
    }

    /// Whether `id` was handed out by this table.
    pub fn owns(&self, id: u32) -> bool {
        id & TICKET_TAG_BIT == self.tag
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh ticket, unless the link is closed.
    pub fn register(&self) -> Result<u32, TransportError> {
        let mut state = self.state();
        if let Some(reason) = &state.closed {
            return Err(TransportError::LinkClosed {
                reason: reason.clone(),
            });
        }
        let id = state.next | self.tag;
        state.next = state.next.wrapping_add(1) & !TICKET_TAG_BIT;
        state.pending.insert(id, None);
        Ok(id)
    }

    /// Drops a ticket whose request was never sent.
    pub fn forget(&self, id: u32) {
        self.state().pending.remove(&id);
    }

    /// The ack reader saw `id` acknowledged with `status`. An ack for a ticket nobody
    /// registered (or acknowledged twice) means the peer is confused or lying.
    pub fn complete(&self, id: u32, status: u32) -> Result<(), TransportError> {
        let mut state = self.state();
        match state.pending.get_mut(&id) {
            Some(slot @ None) => {
                *slot = Some(status);
                self.changed.notify_all();
                Ok(())
            }
            _ => Err(TransportError::UnexpectedAck { id }),
        }
    }

    /// Fails every current and future wait with `reason` (the first reason sticks).
    pub fn close(&self, reason: impl Into<String>) {
        let mut state = self.state();
        if state.closed.is_none() {
            state.closed = Some(reason.into());
        }
        self.changed.notify_all();
    }

    fn outcome(state: &mut State, id: u32) -> Option<Result<(), TransportError>> {
        match state.pending.get(&id) {
            Some(Some(status)) => {
                let status = *status;
                state.pending.remove(&id);
                Some(if status == ACK_OK {
                    Ok(())
                } else {
                    Err(TransportError::PeerWriteFailed { id, errno: status })
                })
            }
            Some(None) => state.closed.as_ref().map(|reason| {
                Err(TransportError::LinkClosed {
                    reason: reason.clone(),
                })
            }),
            None => Some(Err(TransportError::UnknownTicket { id })),
        }
    }

    /// The outcome of `id` if it is known, without waiting.
    pub fn poll(&self, id: u32) -> Option<Result<(), TransportError>> {
        Self::outcome(&mut self.state(), id)
    }

    /// Waits for the outcome of `id` until `deadline`.
    pub fn wait(&self, id: u32, deadline: Instant) -> Result<(), TransportError> {
        let mut state = self.state();
        loop {
            if let Some(outcome) = Self::outcome(&mut state, id) {
                return outcome;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::AckTimeout { id });
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The tickets of a disk link's two lanes: the bulk lane's plain, the mirror lane's
/// tagged, so a ticket says which table it belongs to.
pub struct LaneTickets {
    tables: [Arc<AckTable>; 2],
}

impl Default for LaneTickets {
    fn default() -> Self {
        Self {
            tables: [
                Arc::new(AckTable::tagged(0)),
                Arc::new(AckTable::tagged(TICKET_TAG_BIT)),
            ],
        }
    }
}

impl LaneTickets {
    /// Lane `lane`'s table (0 bulk, 1 mirror), for the thread that completes its tickets.
    pub fn lane(&self, lane: usize) -> &Arc<AckTable> {
        &self.tables[lane]
    }

    /// The table a ticket came from.
    fn table(&self, ticket: u32) -> &AckTable {
        let mirror = &self.tables[1];
        if mirror.owns(ticket) {
            mirror
        } else {
            &self.tables[0]
        }
    }

    /// Registers a ticket on `lane`, runs `send` with it, and forgets the ticket if the
    /// send fails.
    pub fn request<T>(
        &self,
        lane: usize,
        send: impl FnOnce(u32) -> Result<T, TransportError>,
    ) -> Result<u32, TransportError> {
        let table = &self.tables[lane];
        let id = table.register()?;
        send(id).inspect_err(|_| table.forget(id))?;
        Ok(id)
    }

    pub fn wait(&self, ticket: u32, deadline: Instant) -> Result<(), TransportError> {
        self.table(ticket).wait(ticket, deadline)
    }

    pub fn poll(&self, ticket: u32) -> Option<Result<(), TransportError>> {
        self.table(ticket).poll(ticket)
    }

    /// Fails every ticket of both lanes, now and from now on.
    pub fn close(&self, reason: &str) {
        for table in &self.tables {
            table.close(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::{self, ThreadRole};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn tagged_tables_hand_out_disjoint_tickets() {
        let (bulk, mirror) = (AckTable::tagged(0), AckTable::tagged(TICKET_TAG_BIT));
        let (b, m) = (bulk.register().unwrap(), mirror.register().unwrap());
        assert!(bulk.owns(b) && !bulk.owns(m) && mirror.owns(m) && !mirror.owns(b));
        assert!(matches!(
            mirror.complete(b, ACK_OK),
            Err(TransportError::UnexpectedAck { .. })
        ));
        mirror.complete(m, ACK_OK).unwrap();
        assert!(matches!(mirror.poll(m), Some(Ok(()))));
    }

    #[test]
    fn tickets_complete_fail_and_time_out() {
        let acks = Arc::new(AckTable::default());
        let a = acks.register().unwrap();
        let b = acks.register().unwrap();
        let c = acks.register().unwrap();
        assert_ne!(a, b);
        assert!(acks.poll(a).is_none());
        let waiter = {
            let acks = Arc::clone(&acks);
            numa::spawn(ThreadRole::Disk, "ferry-test-waiter", move || {
                acks.wait(a, Instant::now() + Duration::from_secs(5))
            })
            .unwrap()
        };
        acks.complete(a, ACK_OK).unwrap();
        waiter.join().unwrap().unwrap();
        acks.complete(b, 28).unwrap();
        assert!(matches!(
            acks.poll(b),
            Some(Err(TransportError::PeerWriteFailed { errno: 28, .. }))
        ));
        // Acknowledging twice, or something never registered, is the peer's error.
        assert!(matches!(
            acks.complete(b, ACK_OK),
            Err(TransportError::UnexpectedAck { .. })
        ));
        assert!(matches!(
            acks.complete(999, ACK_OK),
            Err(TransportError::UnexpectedAck { id: 999 })
        ));
        assert!(matches!(
            acks.wait(c, Instant::now() + Duration::from_millis(20)),
            Err(TransportError::AckTimeout { .. })
        ));
        acks.close("link dropped");
        assert!(matches!(
            acks.wait(c, Instant::now() + Duration::from_secs(5)),
            Err(TransportError::LinkClosed { .. })
        ));
        assert!(matches!(
            acks.register(),
            Err(TransportError::LinkClosed { .. })
        ));
    }
}
