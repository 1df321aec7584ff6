//! Flow control for byte relays that sit on an SSH connection's event loop.
//!
//! russh reopens a channel's window when data arrives, not when it is
//! consumed, so the only way to slow a sender down is to stop taking its
//! data off the connection: the loop waits on a full channel queue and stops
//! reading the socket. But the same loop also writes the other direction's
//! data. A relay that holds the loop while the other direction waits for it
//! can deadlock two loops against each other (the gateway's and the edge's)
//! when bulk data flows both ways through a target that only reads while its
//! output drains.
//!
//! A [`Valve`] bounds the bytes taken off a connection for one direction and
//! not yet passed on. Below `soft`, data is taken at once. Above it, the
//! taker waits for room, unless the loop has writes of its own waiting
//! ([`Valve::sending`]), in which case it goes on taking up to `hard`, so the
//! loop is free to write them. At `hard` it waits whatever happens: memory
//! per channel stays bounded by `hard` plus the loop's own queue.

use std::sync::Mutex;

use tokio::sync::Notify;

/// A bound on one direction's bytes in flight through a relay.
#[derive(Debug)]
pub struct Valve {
    soft: u64,
    hard: u64,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    held: u64,
    sending: u32,
}

/// Marks the loop as having writes waiting while it lives.
#[derive(Debug)]
pub struct Sending<'a>(&'a Valve);

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.lock().sending -= 1;
    }
}

impl Valve {
    /// # Panics
    /// If `soft` exceeds `hard`.
    pub fn new(soft: u64, hard: u64) -> Self {
        assert!(soft <= hard, "soft bound above the hard bound");
        Self {
            soft,
            hard,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes taken and not yet released.
    pub fn held(&self) -> u64 {
        self.lock().held
    }

    /// Waits until `n` more bytes may be taken, then counts them. A single
    /// take larger than the bound is let through when nothing else is held,
    /// so it cannot wait for ever.
    pub async fn take(&self, n: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                let after = s.held + n;
                let limit = if s.sending > 0 { self.hard } else { self.soft };
                if after <= limit || s.held == 0 {
                    s.held = after;
                    return;
                }
            }
            notified.await;
        }
    }

    /// The bytes left the relay.
    pub fn release(&self, n: u64) {
        {
            let mut s = self.lock();
            s.held = s.held.saturating_sub(n);
        }
        self.changed.notify_waiters();
    }

    /// Call around a write through the same loop: while the guard lives,
    /// takes run up to the hard bound.
    pub fn sending(&self) -> Sending<'_> {
        self.lock().sending += 1;
        self.changed.notify_waiters();
        Sending(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    async fn blocks(v: &Arc<Valve>, n: u64) -> bool {
        let v = v.clone();
        tokio::time::timeout(Duration::from_millis(50), async move { v.take(n).await })
            .await
            .is_err()
    }

    #[tokio::test]
    async fn takes_to_the_soft_bound_then_waits_for_room() {
        let v = Arc::new(Valve::new(10, 100));
        v.take(6).await;
        v.take(4).await;
        assert_eq!(v.held(), 10);
        assert!(
            blocks(&v, 1).await,
            "past the soft bound with no writes waiting"
        );
        let w = v.clone();
        let waiter = tokio::spawn(async move { w.take(5).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        v.release(5);
        waiter.await.unwrap();
        assert_eq!(v.held(), 10);
    }

    #[tokio::test]
    async fn writes_waiting_let_takes_run_to_the_hard_bound() {
        let v = Arc::new(Valve::new(10, 30));
        v.take(10).await;
        let w = v.clone();
        let waiter = tokio::spawn(async move { w.take(15).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        let g = v.sending();
        waiter.await.unwrap();
        assert_eq!(v.held(), 25);
        assert!(
            blocks(&v, 10).await,
            "the hard bound holds even while sending"
        );
        drop(g);
        assert!(blocks(&v, 1).await, "back to the soft bound");
    }

    #[tokio::test]
    async fn one_oversized_take_passes_when_nothing_is_held() {
        let v = Arc::new(Valve::new(10, 20));
        v.take(50).await;
        assert!(blocks(&v, 1).await);
        v.release(50);
        v.take(1).await;
    }
}
