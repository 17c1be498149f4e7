//! Restart policy: what a child's exit means, and the one function that decides what to do.
//!
//! Every exit of a child — a classified failure, a panic, a kill, a missed heartbeat, a
//! normal stop — is turned into an [`Exit`] and passed through [`decide`] together with the
//! child's [`Restart`] kind, its [`Policy`] and its [`History`]. Nothing else in the kernel
//! decides whether a child comes back.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use ractor::ActorProcessingErr;
use tokio::time::Instant;

use super::backoff::Backoff;

/// Process exit code when a restart budget ran out and the policy said `exit` (EX_TEMPFAIL).
pub const EXIT_BUDGET_EXHAUSTED: i32 = 75;
/// Process exit code when a fatal failure's policy said `exit` (EX_CONFIG).
pub const EXIT_FATAL: i32 = 78;

/// When a child is brought back after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Always, whether it failed or stopped on its own.
    Permanent,
    /// Only after a failure; a normal stop leaves it stopped.
    Transient,
    /// Never; a dynamic temporary child is removed from the tree when it exits.
    Temporary,
}

impl From<Restart> for super::snapshot::RestartKind {
    fn from(r: Restart) -> Self {
        match r {
            Restart::Permanent => Self::Permanent,
            Restart::Transient => Self::Transient,
            Restart::Temporary => Self::Temporary,
        }
    }
}

impl Restart {
    /// The lower-case name used in snapshots and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::Permanent => "permanent",
            Restart::Transient => "transient",
            Restart::Temporary => "temporary",
        }
    }
}

/// What happens when a child's restart budget is spent, or it failed fatally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The child stays down in state `parked` with its reason; its siblings keep running.
    Park,
    /// The supervisor stops its children in order and fails to its own parent.
    Escalate,
    /// The whole tree shuts down gracefully and the process exits (75 or 78).
    Exit,
}

impl Action {
    /// The lower-case name used in config, snapshots and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Park => "park",
            Action::Escalate => "escalate",
            Action::Exit => "exit",
        }
    }
}

/// The class of a failure, which decides whether a restart can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Network, timeout, 5xx, 429, a panic, a kill, or an unclassified error: restart with backoff.
    Transient,
    /// Bad credentials, revoked token, invalid config: a restart cannot help.
    Fatal,
    /// No heartbeat within the child's liveness timeout; the supervisor killed it.
    Hung,
}

impl FailureClass {
    /// The lower-case name used in snapshots, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Transient => "transient",
            FailureClass::Fatal => "fatal",
            FailureClass::Hung => "hung",
        }
    }
}

/// A classified failure. Actors return it (boxed) from a handler to fail with a class;
/// any other error, a panic or a kill is classified as transient.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Whether a restart can help.
    pub class: FailureClass,
    /// What went wrong, for operators: shown in the tree and logged.
    pub reason: String,
    /// The earliest the next start may happen (e.g. a server's `Retry-After`). The backoff
    /// delay is raised to it, even beyond the backoff's `max`.
    pub retry_after: Option<Duration>,
    /// The cause is expected to clear soon (a peer announced a restart): wait at most about
    /// this long, jittered like the backoff, whatever the attempt count. `retry_after`
    /// still wins.
    pub retry_within: Option<Duration>,
}

impl Failure {
    /// A failure that a restart with backoff may cure.
    pub fn transient(reason: impl Into<String>) -> Self {
        Self {
            class: FailureClass::Transient,
            reason: reason.into(),
            retry_after: None,
            retry_within: None,
        }
    }

    /// A failure that no restart can cure.
    pub fn fatal(reason: impl Into<String>) -> Self {
        Self {
            class: FailureClass::Fatal,
            reason: reason.into(),
            retry_after: None,
            retry_within: None,
        }
    }

    /// Sets the earliest time of the next start.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Caps the next delay: the cause is expected to clear within about `cap`.
    pub fn retry_within(mut self, cap: Duration) -> Self {
        self.retry_within = Some(cap);
        self
    }

    /// Classifies an error that ended an actor: a boxed [`Failure`] keeps its class,
    /// anything else (a plain error, a panic message) is transient.
    ///
    /// A `Box<Failure>` that went through `?` is boxed twice; both forms are recognised.
    pub fn classify(err: &ActorProcessingErr) -> Self {
        if let Some(failure) = err.downcast_ref::<Failure>() {
            return failure.clone();
        }
        if let Some(failure) = err.downcast_ref::<Box<Failure>>() {
            return failure.as_ref().clone();
        }
        Failure::transient(chain(err.as_ref()))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class.as_str(), self.reason)
    }
}

impl StdError for Failure {}

/// An error and its sources, joined by ": ".
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// How a child incarnation ended, as seen by its supervisor.
#[derive(Debug, Clone, PartialEq)]
pub enum Exit {
    /// It stopped on its own, with an optional reason.
    Normal(Option<String>),
    /// It failed.
    Failed(Failure),
}

impl Exit {
    /// The failure this exit counts as for a child of `restart` kind: a failure is itself;
    /// a normal stop of a permanent child is a transient failure (it must not stop); a
    /// normal stop of any other child is no failure.
    pub fn effective_failure(&self, restart: Restart) -> Option<Failure> {
        match (self, restart) {
            (Exit::Failed(failure), _) => Some(failure.clone()),
            (Exit::Normal(reason), Restart::Permanent) => Some(Failure::transient(match reason {
                Some(reason) => format!("stopped on its own: {reason}"),
                None => "stopped on its own".to_string(),
            })),
            (Exit::Normal(_), _) => None,
        }
    }
}

/// The restart rules of one child.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Delays between restarts.
    pub backoff: Backoff,
    /// Failures allowed within `window` before the budget is spent; 0 means unlimited.
    pub max_restarts: u32,
    /// The sliding window of the restart budget.
    pub window: Duration,
    /// What to do when the budget is spent.
    pub on_exhausted: Action,
    /// What to do after a fatal failure.
    pub on_fatal: Action,
    /// The child must report progress within this long, or it is killed as hung.
    pub liveness_timeout: Option<Duration>,
    /// How long a graceful stop may take before the child is killed.
    pub shutdown_timeout: Duration,
    /// Log one named warning after this many consecutive failures; 0 means never.
    pub warn_after: u32,
}

impl Policy {
    /// 1 s → 60 s, ×2, 20 % jitter, reset after 60 s, unlimited restarts, park on both, no
    /// liveness check, 5 s to stop. Kinds declare their own policy as changes to this one
    /// (`Policy { warn_after: 5, ..Policy::DEFAULT }`).
    pub const DEFAULT: Policy = Policy {
        backoff: Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
            reset_after: Duration::from_secs(60),
        },
        max_restarts: 0,
        window: Duration::from_secs(60),
        on_exhausted: Action::Park,
        on_fatal: Action::Park,
        liveness_timeout: None,
        shutdown_timeout: Duration::from_secs(5),
        warn_after: 0,
    };
}

impl Default for Policy {
    /// [`Policy::DEFAULT`].
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What a supervisor does about one exit.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start the child again after `delay`; `attempt` counts consecutive failures (1-based).
    Restart {
        /// Time to wait before the start.
        delay: Duration,
        /// How many failures in a row this is.
        attempt: u32,
    },
    /// Leave it stopped (or, for a dynamic temporary child, remove it).
    Stop,
    /// No restart: apply `action`.
    GiveUp {
        /// Park, escalate or exit.
        action: Action,
        /// The process exit code if `action` is [`Action::Exit`].
        exit_code: i32,
        /// Why, for operators.
        reason: String,
    },
}

/// With an unlimited budget, failures in the window are counted up to this many.
pub const TRACKED_FAILURES: usize = 256;

/// The restart history of one child, across its incarnations.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Consecutive failures since the child last ran `reset_after` without failing.
    pub consecutive: u32,
    /// When each failure inside the current window happened.
    failures: VecDeque<Instant>,
    /// Restarts decided over the child's whole life.
    pub restarts_total: u64,
}

impl History {
    /// Failures within `window` before `now`.
    pub fn in_window(&self, window: Duration, now: Instant) -> usize {
        self.failures
            .iter()
            .filter(|t| now.duration_since(**t) < window)
            .count()
    }

    /// When the failures of the current window happened.
    pub fn failure_times(&self) -> Vec<Instant> {
        self.failures.iter().copied().collect()
    }

    /// Forgets the budget and the consecutive count (an operator `start`).
    pub fn reset_budget(&mut self) {
        self.consecutive = 0;
        self.failures.clear();
    }
}

/// Decides what to do about one exit. The only place a restart is decided.
///
/// * `ran_for` — how long the incarnation that exited had been running; a run of at least
///   `policy.backoff.reset_after` restarts the backoff sequence from `initial`.
/// * `unit` — a uniform draw in `[0, 1)` for the jitter.
///
/// Failures are counted against the budget when they happen, not when the replacement
/// starts, so a long backoff cannot hide a crash loop.
pub fn decide(
    exit: &Exit,
    restart: Restart,
    policy: &Policy,
    history: &mut History,
    ran_for: Duration,
    now: Instant,
    unit: f64,
) -> Decision {
    if restart == Restart::Temporary {
        return Decision::Stop;
    }
    let Some(failure) = exit.effective_failure(restart) else {
        return Decision::Stop;
    };

    if ran_for >= policy.backoff.reset_after {
        history.consecutive = 0;
    }
    history.consecutive = history.consecutive.saturating_add(1);
    history.failures.push_back(now);
    // Keep the window's failures, but no more than the budget needs: an unlimited budget
    // would otherwise make every restart of a crash-looping child copy a growing list
    // into the published view.
    let keep = usize::try_from(policy.max_restarts)
        .unwrap_or(usize::MAX)
        .saturating_add(1)
        .max(TRACKED_FAILURES);
    while history.failures.len() > keep
        || history
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) >= policy.window)
    {
        history.failures.pop_front();
    }

    if failure.class == FailureClass::Fatal {
        return Decision::GiveUp {
            action: policy.on_fatal,
            exit_code: EXIT_FATAL,
            reason: failure.to_string(),
        };
    }
    let max = usize::try_from(policy.max_restarts).unwrap_or(usize::MAX);
    if max > 0 && history.failures.len() > max {
        return Decision::GiveUp {
            action: policy.on_exhausted,
            exit_code: EXIT_BUDGET_EXHAUSTED,
            reason: format!(
                "restart budget spent: {} failures within {} ms, last {failure}",
                history.failures.len(),
                policy.window.as_millis()
            ),
        };
    }

    let mut delay = policy.backoff.delay(history.consecutive - 1, unit);
    if let Some(cap) = failure.retry_within {
        // Jittered like the backoff, so peers told the same thing do not retry in step.
        let cut = policy.backoff.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0);
        delay = delay.min(cap.mul_f64(1.0 - cut));
    }
    if let Some(floor) = failure.retry_after {
        delay = delay.max(floor);
    }
    history.restarts_total += 1;
    Decision::Restart {
        delay,
        attempt: history.consecutive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_restarts: u32, window_s: u64) -> Policy {
        Policy {
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
                multiplier: 2.0,
                jitter: 0.0,
                reset_after: Duration::from_secs(60),
            },
            max_restarts,
            window: Duration::from_secs(window_s),
            on_exhausted: Action::Exit,
            on_fatal: Action::Park,
            ..Policy::default()
        }
    }

    fn failed() -> Exit {
        Exit::Failed(Failure::transient("connection reset by peer"))
    }

    fn delay_of(d: Decision) -> Duration {
        match d {
            Decision::Restart { delay, .. } => delay,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn restart_kinds() {
        let p = policy(0, 60);
        let now = Instant::now();
        let mut h = History::default();
        let normal = Exit::Normal(None);
        assert_eq!(
            decide(
                &normal,
                Restart::Transient,
                &p,
                &mut h,
                Duration::ZERO,
                now,
                0.0
            ),
            Decision::Stop
        );
        assert_eq!(
            decide(
                &failed(),
                Restart::Temporary,
                &p,
                &mut h,
                Duration::ZERO,
                now,
                0.0
            ),
            Decision::Stop
        );
        assert!(matches!(
            decide(
                &failed(),
                Restart::Transient,
                &p,
                &mut h,
                Duration::ZERO,
                now,
                0.0
            ),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            decide(
                &normal,
                Restart::Permanent,
                &p,
                &mut h,
                Duration::ZERO,
                now,
                0.0
            ),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn backoff_grows_then_resets_after_a_healthy_run() {
        let p = policy(0, 60);
        let now = Instant::now();
        let mut h = History::default();
        let short = Duration::from_secs(1);
        let delays: Vec<u64> = (0..8)
            .map(|_| {
                delay_of(decide(
                    &failed(),
                    Restart::Permanent,
                    &p,
                    &mut h,
                    short,
                    now,
                    0.0,
                ))
                .as_secs()
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        let healthy = Duration::from_secs(60);
        assert_eq!(
            delay_of(decide(
                &failed(),
                Restart::Permanent,
                &p,
                &mut h,
                healthy,
                now,
                0.0
            ))
            .as_secs(),
            1
        );
        assert_eq!(h.consecutive, 1);
        assert_eq!(h.restarts_total, 9);
    }

    #[test]
    fn fatal_gives_up_with_on_fatal_and_code_78() {
        let p = policy(0, 60);
        let mut h = History::default();
        let exit = Exit::Failed(Failure::fatal("M_FORBIDDEN: invalid password"));
        match decide(
            &exit,
            Restart::Permanent,
            &p,
            &mut h,
            Duration::ZERO,
            Instant::now(),
            0.0,
        ) {
            Decision::GiveUp {
                action,
                exit_code,
                reason,
            } => {
                assert_eq!(action, Action::Park);
                assert_eq!(exit_code, EXIT_FATAL);
                assert_eq!(reason, "fatal: M_FORBIDDEN: invalid password");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(h.restarts_total, 0);
    }

    #[test]
    fn budget_counts_failures_when_they_happen_not_after_backoff() {
        // 3 failures per 10 s, but the backoff alone would space them 1, 2, 4, 8 s apart:
        // the 4th failure inside 10 s of the first must exhaust the budget.
        let p = policy(3, 10);
        let start = Instant::now();
        let mut h = History::default();
        let mut t = start;
        for expected in [1, 2, 4] {
            let d = delay_of(decide(
                &failed(),
                Restart::Permanent,
                &p,
                &mut h,
                Duration::ZERO,
                t,
                0.0,
            ));
            assert_eq!(d.as_secs(), expected);
            t += Duration::from_millis(100);
        }
        match decide(
            &failed(),
            Restart::Permanent,
            &p,
            &mut h,
            Duration::ZERO,
            t,
            0.0,
        ) {
            Decision::GiveUp {
                action: Action::Exit,
                exit_code: EXIT_BUDGET_EXHAUSTED,
                reason,
            } => {
                assert!(
                    reason.starts_with("restart budget spent: 4 failures within 10000 ms"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failures_leave_the_window() {
        let p = policy(2, 10);
        let mut h = History::default();
        let t0 = Instant::now();
        for i in 0..10u64 {
            // One failure every 6 s: never more than 2 inside a 10 s window.
            let t = t0 + Duration::from_secs(6 * i);
            assert!(matches!(
                decide(
                    &failed(),
                    Restart::Permanent,
                    &p,
                    &mut h,
                    Duration::ZERO,
                    t,
                    0.0
                ),
                Decision::Restart { .. }
            ));
            assert!(h.in_window(p.window, t) <= 2);
        }
    }

    #[test]
    fn unlimited_budget_tracks_a_bounded_number_of_failures() {
        let p = policy(0, 3600);
        let mut h = History::default();
        let t0 = Instant::now();
        for i in 0..1000u64 {
            let t = t0 + Duration::from_millis(i);
            decide(
                &failed(),
                Restart::Permanent,
                &p,
                &mut h,
                Duration::ZERO,
                t,
                0.0,
            );
        }
        assert_eq!(
            h.in_window(p.window, t0 + Duration::from_secs(1)),
            TRACKED_FAILURES
        );
        // A budget larger than the cap keeps what it needs to be enforced.
        let p = policy(500, 3600);
        let mut h = History::default();
        let mut last = None;
        for i in 0..501u64 {
            last = Some(decide(
                &failed(),
                Restart::Permanent,
                &p,
                &mut h,
                Duration::ZERO,
                t0 + Duration::from_millis(i),
                0.0,
            ));
        }
        assert!(matches!(last, Some(Decision::GiveUp { .. })));
    }

    #[test]
    fn retry_after_raises_the_delay() {
        let p = policy(0, 60);
        let mut h = History::default();
        let exit = Exit::Failed(Failure::transient("429").retry_after(Duration::from_secs(90)));
        let d = delay_of(decide(
            &exit,
            Restart::Permanent,
            &p,
            &mut h,
            Duration::ZERO,
            Instant::now(),
            0.0,
        ));
        assert_eq!(d, Duration::from_secs(90));
    }

    #[test]
    fn retry_within_caps_a_grown_delay_with_jitter() {
        let p = policy(0, 60);
        let mut h = History::default();
        let now = Instant::now();
        for _ in 0..6 {
            decide(
                &failed(),
                Restart::Permanent,
                &p,
                &mut h,
                Duration::ZERO,
                now,
                0.0,
            );
        }
        // The 7th delay would be 60 s; the peer said it will be back soon.
        let exit =
            Exit::Failed(Failure::transient("refused").retry_within(Duration::from_millis(500)));
        let mut jittered = policy(0, 60);
        jittered.backoff.jitter = 0.2;
        let d = delay_of(decide(
            &exit,
            Restart::Permanent,
            &jittered,
            &mut h,
            Duration::ZERO,
            now,
            0.5,
        ));
        assert_eq!(d, Duration::from_millis(450));
        // A server's Retry-After still wins over the cap.
        let exit = Exit::Failed(
            Failure::transient("busy")
                .retry_within(Duration::from_millis(500))
                .retry_after(Duration::from_secs(2)),
        );
        let d = delay_of(decide(
            &exit,
            Restart::Permanent,
            &p,
            &mut h,
            Duration::ZERO,
            now,
            0.0,
        ));
        assert_eq!(d, Duration::from_secs(2));
    }

    #[test]
    fn classify_keeps_class_and_defaults_to_transient() {
        let boxed: ActorProcessingErr = Box::new(Failure::fatal("bad token"));
        assert_eq!(Failure::classify(&boxed).class, FailureClass::Fatal);
        let twice: ActorProcessingErr = From::from(Box::new(Failure::fatal("boxed twice")));
        assert_eq!(Failure::classify(&twice), Failure::fatal("boxed twice"));
        let plain: ActorProcessingErr = From::from("panicked at boom");
        let f = Failure::classify(&plain);
        assert_eq!(f.class, FailureClass::Transient);
        assert_eq!(f.reason, "panicked at boom");
    }
}
