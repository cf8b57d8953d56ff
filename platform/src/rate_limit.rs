//! Request rate limits per caller: by JWT subject when the caller has a token, else by client
//! IP. A generic cell-rate algorithm from `governor`, kept in memory per process (each API
//! replica limits on its own; the budget per caller is per replica).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;

use crate::PlatformError;

/// After this many checks the limiter forgets callers whose budget is full again, so the
/// key table does not grow with every IP address ever seen.
const PRUNE_EVERY: u64 = 10_000;

/// How many requests a caller may send: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// 0 turns limiting off.
    pub per_second: u32,
    pub burst: u32,
}

type Keyed = governor::RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

pub struct RateLimiter {
    limiter: Option<Keyed>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Result<Self, PlatformError> {
        let limiter = match NonZeroU32::new(limit.per_second) {
            None => None,
            Some(rate) => {
                let burst = NonZeroU32::new(limit.burst).ok_or(PlatformError::InvalidSetting {
                    name: "rate_limit_burst",
                    reason: "must be at least 1 when rate limiting is on".into(),
                })?;
                Some(governor::RateLimiter::keyed(
                    Quota::per_second(rate).allow_burst(burst),
                ))
            }
        };
        Ok(Self {
            limiter,
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        })
    }

    /// `Ok` when `key` may go ahead; `Err(wait)` says how long until it may.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            limiter.retain_recent();
        }
        limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_past_its_burst_waits_while_others_go_on() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 1,
            burst: 2,
        })
        .unwrap();
        assert!(limiter.check("sub:alice").is_ok());
        assert!(limiter.check("sub:alice").is_ok());
        let wait = limiter.check("sub:alice").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(limiter.check("sub:bob").is_ok());
    }

    #[test]
    fn a_zero_rate_turns_limiting_off() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 0,
            burst: 0,
        })
        .unwrap();
        assert!((0..1000).all(|_| limiter.check("ip:1.2.3.4").is_ok()));
    }
}
