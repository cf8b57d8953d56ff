//! Request rate limits per caller: by JWT subject when the caller has a token, else by client
//! IP. A generic cell-rate algorithm from `governor`, kept in memory per process (each API
//! replica limits on its own; the budget per caller is per replica).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;

use crate::EdgeError;

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
    pub fn new(limit: RateLimit) -> Result<Self, EdgeError> {
        let limiter = match NonZeroU32::new(limit.per_second) {
            None => None,
            Some(rate) => {
                let burst = NonZeroU32::new(limit.burst).ok_or(EdgeError::InvalidSetting {
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
        self.charge(key, 1).map_err(|refusal| match refusal {
            Refusal::Wait(wait) => wait,
            // One token always fits a burst of at least one.
            Refusal::OverBurst { .. } => Duration::ZERO,
        })
    }

    /// Takes `tokens` from `key`'s budget at once, or none of them. 0 tokens always passes.
    pub fn charge(&self, key: &str, tokens: u32) -> Result<(), Refusal> {
        let (Some(limiter), Some(n)) = (&self.limiter, NonZeroU32::new(tokens)) else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            limiter.retain_recent();
        }
        match limiter.check_key_n(&key.to_owned(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Refusal::Wait(not_until.wait_time_from(self.clock.now()))),
            Err(governor::InsufficientCapacity(burst)) => Err(Refusal::OverBurst { burst }),
        }
    }
}

/// Why [`RateLimiter::charge`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The budget holds enough again after this long.
    Wait(Duration),
    /// More than the whole burst: no wait makes it pass; the caller must ask for less.
    OverBurst { burst: u32 },
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
    fn a_charge_takes_all_its_tokens_or_none_and_never_more_than_the_burst() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 1,
            burst: 10,
        })
        .unwrap();
        assert_eq!(
            limiter.charge("sub:alice", 11),
            Err(Refusal::OverBurst { burst: 10 })
        );
        assert!(limiter.charge("sub:alice", 7).is_ok());
        assert!(matches!(
            limiter.charge("sub:alice", 4),
            Err(Refusal::Wait(_))
        ));
        // The refused charge took nothing: three tokens are still there.
        assert!(limiter.charge("sub:alice", 3).is_ok());
        assert!(limiter.check("sub:alice").is_err());
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
