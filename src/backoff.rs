//! The one backoff: exponential from a base delay, with jitter, capped — used by every retry
//! loop (bulk requests and file downloads, token renewals, alert deliveries, queue steps), so
//! that a server's `Retry-After` and the cap are honoured the same way everywhere.
//!
//! A leaf: it imports nothing of the crate.

use std::time::Duration;

/// No single retry waits longer than this, whatever the server asks.
pub const MAX_DELAY: Duration = Duration::from_secs(300);

/// Exponential backoff with ±50 % jitter: retry n waits about `base × 2^(n-1)`, at most
/// [`MAX_DELAY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
}

impl Backoff {
    pub fn new(base: Duration) -> Backoff {
        Backoff { base }
    }

    /// The wait before retry number `retry` (1-based): the server's `Retry-After` when it
    /// gave one (capped), else the exponential delay with jitter, so that parallel workers do
    /// not retry in lockstep.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(hint) = retry_after {
            return hint.min(MAX_DELAY);
        }
        let nominal = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1).min(16)))
            .min(MAX_DELAY);
        nominal.mul_f64(rand::random_range(0.5..1.5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_and_honours_the_server_up_to_the_cap() {
        let backoff = Backoff::new(Duration::from_millis(100));
        for (retry, nominal) in [(1, 100u64), (2, 200), (3, 400)] {
            let delay = backoff.delay(retry, None);
            assert!(
                delay >= Duration::from_millis(nominal / 2)
                    && delay <= Duration::from_millis(nominal * 3 / 2),
                "retry {retry}: {delay:?}"
            );
        }
        assert_eq!(
            backoff.delay(1, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            backoff.delay(1, Some(Duration::from_secs(86_400))),
            MAX_DELAY
        );
        assert!(backoff.delay(40, None) <= MAX_DELAY.mul_f64(1.5));
    }
}
