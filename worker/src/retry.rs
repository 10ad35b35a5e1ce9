//! How a worker waits between attempts to reach its master, and which
//! failures are worth another attempt.
//!
//! A master that is not up yet, restarting, overloaded, or something else
//! answering on its port (closing at once, sending garbage, never speaking)
//! is worth retrying: exponential backoff with jitter, so a fleet of
//! workers that lost one master does not come back in lock step. A master
//! that refuses this worker (wrong password, other protocol version) says
//! so in words, and will say the same next time: that ends the worker.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The first wait after a failure.
pub(crate) const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between attempts.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a master has to finish the handshake once connected.
pub(crate) const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// A failure that another attempt would only repeat (the master refused
/// this worker): the worker stops instead of retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Fatal(pub(crate) String);

/// Whether `e` is worth another attempt.
pub(crate) fn is_retryable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Fatal>().is_none()
}

/// Exponential backoff, doubling from [`BACKOFF_FIRST`] to [`BACKOFF_MAX`],
/// each wait jittered by up to a quarter either way.
pub(crate) struct Backoff {
    next: Duration,
    seed: u64,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        // Jitter needs to differ between workers, not be unpredictable:
        // the pid and the clock's nanoseconds are enough.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Backoff {
            next: BACKOFF_FIRST,
            seed: u64::from(std::process::id()) << 32 | u64::from(nanos) | 1,
        }
    }

    /// Back to the first wait (after a connection that worked).
    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    /// The wait before the next attempt.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        // xorshift64: a different jitter at every call.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        // A factor in [0.75, 1.25).
        let factor = 0.75 + (self.seed % 1000) as f64 / 2000.0;
        base.mul_f64(factor).min(BACKOFF_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new();
        let waits: Vec<Duration> = (0..10).map(|_| b.next_wait()).collect();
        for (i, w) in waits.iter().enumerate() {
            let base = (BACKOFF_FIRST * 2u32.pow(i as u32)).min(BACKOFF_MAX);
            assert!(
                *w >= base.mul_f64(0.75) && *w <= base.mul_f64(1.25).min(BACKOFF_MAX),
                "wait {i}: {w:?} around {base:?}"
            );
        }
        assert!(waits.windows(2).any(|p| p[0] != p[1]));
        b.reset();
        assert!(b.next_wait() <= BACKOFF_FIRST.mul_f64(1.25));
    }

    #[test]
    fn only_a_refusal_is_fatal() {
        assert!(!is_retryable(&anyhow::Error::new(Fatal(
            "wrong password".into()
        ))));
        assert!(is_retryable(&anyhow::anyhow!("connection closed")));
    }
}
