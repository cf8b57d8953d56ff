//! The circuit breakers behind [`Resilient`](super::Resilient): one for the provider, and one
//! per failure domain (a charge's payment token).
//!
//! A card that keeps failing is that card's problem, not the provider's: its domain's breaker
//! opens and spares the provider its calls, while every other card goes on. A domain is blamed
//! only when other domains got through while it kept failing; when every domain fails at once,
//! its failures count toward the provider, whose breaker opens on a failure rate over the
//! recent stretch of calls. That rate counts each idempotency key once (its latest call), so an
//! order retried ten times weighs what an order tried once weighs, and it leaves out domains
//! already blamed, so the retries of bad cards in a quiet hour cannot open it either.
//!
//! Hand-written because it is a little state and the maintained crates (`failsafe`,
//! `recloser`) wrap futures in their own abstractions, know no failure domains and release
//! rarely; this one also exposes its state directly.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A circuit breaker's state, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls fail at once until the cool-down ends, sparing a provider that is down.
    Open,
    /// The cool-down ended: one probe call goes through; its outcome closes or reopens.
    HalfOpen,
}

/// Failure domains tracked at once. Tokens are per customer, so the map is bounded; past the
/// bound, domains that are not open are forgotten first, then new ones go untracked (their
/// failures still count toward the provider).
const MAX_DOMAINS: usize = 10_000;

/// When the breakers open, from [`Resilience`](super::Resilience).
#[derive(Debug, Clone, Copy)]
pub(super) struct Policy {
    pub domain_threshold: u32,
    pub cool_down: Duration,
    pub window: Duration,
    pub min_calls: u32,
    pub failure_rate: f64,
}

/// What one call is about.
#[derive(Debug, Clone, Copy)]
pub(super) struct Subject<'a> {
    /// Counted once in the provider's window however often it is retried.
    pub key: &'a str,
    /// The failure domain, for calls that have one (charges).
    pub domain: Option<&'a str>,
}

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    Provider,
    Domain,
}

/// Leave for one call, handed back with its outcome.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pass {
    /// The call is the provider's half-open probe.
    provider_probe: bool,
    /// The call is the probe of a domain already blamed: its failure says nothing new.
    domain_probe: bool,
}

/// How a call ended, as the breakers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The provider answered (a decline included): it is up.
    Answered,
    /// Timeout, outage, throttling: the kind of failure breakers exist for.
    Failed,
    /// The provider refused the request itself (a client error): not counted either way.
    Refused,
    /// The provider is still handling an earlier request with the same key (409): it is up,
    /// and the card's fate is not known yet. Not counted either way; the call is retried.
    InProgress,
}

pub(super) struct Breakers {
    policy: Policy,
    book: Mutex<Book>,
}

struct Book {
    provider: Trip,
    window: Window,
    successes: Successes,
    domains: HashMap<String, Domain>,
}

impl Breakers {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            book: Mutex::new(Book {
                provider: Trip::default(),
                window: Window::default(),
                successes: Successes::default(),
                domains: HashMap::new(),
            }),
        }
    }

    /// The provider's breaker: the one operators watch.
    pub fn state(&self) -> BreakerState {
        let Ok(book) = self.book.lock() else {
            return BreakerState::Open;
        };
        book.provider.state(Instant::now())
    }

    /// The breaker of one failure domain; closed when it is not tracked.
    pub fn domain_state(&self, domain: &str) -> BreakerState {
        let Ok(book) = self.book.lock() else {
            return BreakerState::Open;
        };
        book.domains
            .get(domain)
            .map_or(BreakerState::Closed, |d| d.trip.state(Instant::now()))
    }

    /// Whether a call may go out now. Both breakers must let it; each half-open one lets one
    /// probe out at a time.
    pub fn admit(&self, subject: Subject<'_>) -> Result<Pass, Refusal> {
        let now = Instant::now();
        let Ok(mut book) = self.book.lock() else {
            return Err(Refusal::Provider);
        };
        let book = &mut *book;
        let domain = subject.domain.and_then(|d| book.domains.get_mut(d));
        let domain_probe = match &domain {
            Some(domain) => domain.trip.admit(now).ok_or(Refusal::Domain)?,
            None => false,
        };
        let provider_probe = book.provider.admit(now).ok_or(Refusal::Provider)?;
        if let Some(domain) = domain {
            domain.trip.probing |= domain_probe;
        }
        book.provider.probing |= provider_probe;
        Ok(Pass {
            provider_probe,
            domain_probe,
        })
    }

    pub fn record(&self, subject: Subject<'_>, pass: Pass, outcome: Outcome) {
        let now = Instant::now();
        let Ok(mut book) = self.book.lock() else {
            return;
        };
        match outcome {
            Outcome::Answered => book.answered(&self.policy, subject, pass, now),
            Outcome::Failed => book.failed(&self.policy, subject, pass, now),
            Outcome::Refused | Outcome::InProgress => book.release(subject, pass),
        }
    }
}

impl Book {
    fn answered(&mut self, policy: &Policy, subject: Subject<'_>, pass: Pass, now: Instant) {
        // The domain works again: forgetting it is closing it.
        if let Some(domain) = subject.domain {
            self.domains.remove(domain);
        }
        // Only the probe closes: a call let out before the breaker opened proves less.
        if pass.provider_probe {
            tracing::info!("payment provider breaker closed");
            self.provider.close();
            self.window.clear();
        }
        self.window.expire(now, policy.window);
        self.window.record(now, subject.key, false);
        self.successes.record(now, subject.domain);
    }

    fn failed(&mut self, policy: &Policy, subject: Subject<'_>, pass: Pass, now: Instant) {
        if let Some(name) = subject.domain {
            self.domain_failed(policy, name, pass, now);
        }
        if pass.domain_probe {
            // A card already blamed failed again: nothing new about the provider.
            self.provider.probing &= !pass.provider_probe;
            return;
        }
        if pass.provider_probe {
            self.provider.open(now, policy.cool_down);
            return;
        }
        self.window.expire(now, policy.window);
        self.window.record(now, subject.key, true);
        // A call let out before the breaker opened that fails leaves the cool-down alone.
        if self.provider.state(now) == BreakerState::Closed && self.window.trips(policy) {
            tracing::warn!(
                keys = self.window.keys(),
                failed = self.window.failed,
                "payment provider breaker opened"
            );
            self.provider.open(now, policy.cool_down);
        }
    }

    /// Counts the failure against the domain, and opens its breaker once it failed often
    /// enough while other domains went through (or again, in a probe).
    fn domain_failed(&mut self, policy: &Policy, name: &str, pass: Pass, now: Instant) {
        if !self.domains.contains_key(name) && !self.make_room(now) {
            return;
        }
        let domain = self.domains.entry(name.to_owned()).or_insert(Domain {
            failures: 0,
            failing_since: now,
            last_failure: now,
            trip: Trip::default(),
        });
        // Failures further apart than the window are not one streak.
        if domain.trip.state(now) == BreakerState::Closed
            && now.duration_since(domain.last_failure) > policy.window
        {
            domain.failures = 0;
            domain.failing_since = now;
        }
        domain.failures = domain.failures.saturating_add(1);
        domain.last_failure = now;
        let blamed = domain.failures >= policy.domain_threshold
            && self.successes.elsewhere_since(name, domain.failing_since);
        if pass.domain_probe || blamed {
            if !pass.domain_probe {
                tracing::info!(
                    failures = domain.failures,
                    "breaker of one payment method opened"
                );
            }
            domain.trip.open(now, policy.cool_down);
        }
    }

    /// Whether a new domain may be tracked; forgets domains that are not open if it must.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.domains.len() >= MAX_DOMAINS {
            self.domains
                .retain(|_, domain| domain.trip.state(now) == BreakerState::Open);
        }
        self.domains.len() < MAX_DOMAINS
    }

    /// Gives back the probes a call held, changing nothing else.
    fn release(&mut self, subject: Subject<'_>, pass: Pass) {
        self.provider.probing &= !pass.provider_probe;
        if let Some(domain) = subject.domain.and_then(|d| self.domains.get_mut(d)) {
            domain.trip.probing &= !pass.domain_probe;
        }
    }
}

/// One failure domain's failures since its last success.
struct Domain {
    failures: u32,
    /// When the streak began: only successes elsewhere after it blame this domain.
    failing_since: Instant,
    last_failure: Instant,
    trip: Trip,
}

/// Closed, open until a time, or half-open with at most one probe out.
#[derive(Debug, Default)]
struct Trip {
    open_until: Option<Instant>,
    probing: bool,
}

impl Trip {
    fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// `Some(is_probe)` when a call may go out, `None` when it must not.
    fn admit(&self, now: Instant) -> Option<bool> {
        match self.state(now) {
            BreakerState::Closed => Some(false),
            BreakerState::Open => None,
            BreakerState::HalfOpen if self.probing => None,
            BreakerState::HalfOpen => Some(true),
        }
    }

    fn open(&mut self, now: Instant, cool_down: Duration) {
        self.open_until = Some(now + cool_down);
        self.probing = false;
    }

    fn close(&mut self) {
        *self = Self::default();
    }
}

/// The latest outcome of every key called within the window, for the provider's failure rate.
#[derive(Default)]
struct Window {
    /// Per key: the sequence number of its latest call and whether it failed.
    latest: HashMap<String, (u64, bool)>,
    /// Every call in time order, to expire them; a call superseded by a later one of its key
    /// expires without effect.
    calls: VecDeque<(Instant, u64, String)>,
    /// Keys whose latest call failed.
    failed: usize,
    next: u64,
}

impl Window {
    fn record(&mut self, now: Instant, key: &str, failed: bool) {
        let seq = self.next;
        self.next += 1;
        if let Some((_, before)) = self.latest.insert(key.to_owned(), (seq, failed)) {
            self.failed -= usize::from(before);
        }
        self.failed += usize::from(failed);
        self.calls.push_back((now, seq, key.to_owned()));
    }

    fn expire(&mut self, now: Instant, span: Duration) {
        while let Some((at, seq, key)) = self.calls.pop_front() {
            if now.duration_since(at) <= span {
                self.calls.push_front((at, seq, key));
                return;
            }
            if self
                .latest
                .get(&key)
                .is_some_and(|(latest, _)| *latest == seq)
            {
                let failed = self.latest.remove(&key).is_some_and(|(_, failed)| failed);
                self.failed -= usize::from(failed);
            }
        }
    }

    fn keys(&self) -> usize {
        self.latest.len()
    }

    /// Enough distinct keys, and a large enough share of them failing.
    fn trips(&self, policy: &Policy) -> bool {
        let keys = self.keys();
        keys >= policy.min_calls.max(1) as usize
            && self.failed as f64 >= policy.failure_rate * keys as f64
    }

    fn clear(&mut self) {
        *self = Self {
            next: self.next,
            ..Self::default()
        };
    }
}

/// The latest successful call, and the latest of a domain other than its: enough to tell
/// whether any domain other than a given one succeeded since a given time. Calls without a
/// domain (refunds, lookups) count as a domain of their own.
#[derive(Default)]
struct Successes {
    latest: Option<(Instant, Option<String>)>,
    /// Invariant: the latest success whose domain differs from `latest`'s.
    other: Option<(Instant, Option<String>)>,
}

impl Successes {
    fn record(&mut self, now: Instant, domain: Option<&str>) {
        let same = self
            .latest
            .as_ref()
            .is_some_and(|(_, latest)| latest.as_deref() == domain);
        if !same {
            self.other = self.latest.take();
        }
        self.latest = Some((now, domain.map(str::to_owned)));
    }

    fn elsewhere_since(&self, domain: &str, since: Instant) -> bool {
        [&self.latest, &self.other]
            .into_iter()
            .flatten()
            .any(|(at, other)| *at >= since && other.as_deref() != Some(domain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            domain_threshold: 2,
            cool_down: Duration::from_secs(60),
            window: Duration::from_secs(60),
            min_calls: 4,
            failure_rate: 0.5,
        }
    }

    fn call(breakers: &Breakers, key: &str, domain: &str, outcome: Outcome) -> bool {
        let subject = Subject {
            key,
            domain: Some(domain),
        };
        match breakers.admit(subject) {
            Ok(pass) => {
                breakers.record(subject, pass, outcome);
                true
            }
            Err(_) => false,
        }
    }

    #[test]
    fn one_key_failing_again_and_again_counts_once_toward_the_provider() {
        let breakers = Breakers::new(policy());
        for _ in 0..10 {
            call(&breakers, "order-1", "tok_a", Outcome::Failed);
        }
        assert_eq!(breakers.state(), BreakerState::Closed, "one key of four");
        for key in ["order-2", "order-3", "order-4"] {
            call(&breakers, key, "tok_b", Outcome::Failed);
        }
        assert_eq!(breakers.state(), BreakerState::Open);
    }

    #[test]
    fn a_domain_is_blamed_only_when_another_went_through_meanwhile() {
        let breakers = Breakers::new(policy());
        call(&breakers, "order-1", "tok_bad", Outcome::Failed);
        call(&breakers, "order-1", "tok_bad", Outcome::Failed);
        assert_eq!(breakers.domain_state("tok_bad"), BreakerState::Closed);
        call(&breakers, "order-2", "tok_good", Outcome::Answered);
        call(&breakers, "order-3", "tok_bad", Outcome::Failed);
        assert_eq!(breakers.domain_state("tok_bad"), BreakerState::Open);
        assert!(!call(&breakers, "order-4", "tok_bad", Outcome::Failed));
        assert!(call(&breakers, "order-5", "tok_good", Outcome::Answered));
    }

    #[test]
    fn a_superseded_call_expires_without_taking_its_key_out() {
        let mut window = Window::default();
        let start = Instant::now();
        window.record(start, "order-1", true);
        window.record(start + Duration::from_secs(30), "order-1", false);
        window.expire(start + Duration::from_secs(61), Duration::from_secs(60));
        assert_eq!((window.keys(), window.failed), (1, 0));
        window.expire(start + Duration::from_secs(91), Duration::from_secs(60));
        assert_eq!((window.keys(), window.failed), (0, 0));
    }
}
