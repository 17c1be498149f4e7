//! Every metric the kernel records, named in one place.
//!
//! Labels: `kind` (the child's kind), `class` (failure class), `state` (child state),
//! `pool` (start-slot pool).

/// Counter: restarts decided, by `kind` and `class`.
pub const RESTARTS_TOTAL: &str = "warden_restarts_total";
/// Counter: children that gave up (parked, escalated or asked for exit), by `kind` and `action`.
pub const GIVE_UPS_TOTAL: &str = "warden_give_ups_total";
/// Gauge: children in each state, by `kind` and `state`.
pub const CHILDREN: &str = "warden_children";
/// Histogram: backoff delay before a restart, in seconds, by `kind`.
pub const BACKOFF_DELAY_SECONDS: &str = "warden_backoff_delay_seconds";
/// Histogram: time from asking for a start slot to getting it, in seconds, by `pool`.
pub const SLOT_WAIT_SECONDS: &str = "warden_start_slot_wait_seconds";
/// Gauge: current slot holders, by `pool`.
pub const SLOT_HOLDERS: &str = "warden_start_slot_holders";
/// Gauge: the most slot holders seen at once since start, by `pool`.
pub const SLOT_HOLDERS_PEAK: &str = "warden_start_slot_holders_peak";
/// Gauge: waiters queued for a slot, by `pool`.
pub const SLOT_QUEUE: &str = "warden_start_slot_queue";
/// Counter: slots force-released after their hold timeout, by `pool`.
pub const SLOT_HOLD_TIMEOUTS_TOTAL: &str = "warden_start_slot_hold_timeouts_total";
/// Counter: queued waiters that gave up before their turn, by `pool`.
pub const SLOT_CANCELLED_TOTAL: &str = "warden_start_slot_cancelled_total";

/// Registers descriptions with the installed recorder (call once after installing it).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(RESTARTS_TOTAL, "Restarts decided by supervisors.");
    describe_counter!(
        GIVE_UPS_TOTAL,
        "Children that gave up: parked, escalated or exit."
    );
    describe_gauge!(CHILDREN, "Supervised children in each state.");
    describe_histogram!(
        BACKOFF_DELAY_SECONDS,
        Unit::Seconds,
        "Backoff delay before a restart."
    );
    describe_histogram!(SLOT_WAIT_SECONDS, Unit::Seconds, "Wait for a start slot.");
    describe_gauge!(SLOT_HOLDERS, "Current start-slot holders.");
    describe_gauge!(SLOT_HOLDERS_PEAK, "Most start-slot holders seen at once.");
    describe_gauge!(SLOT_QUEUE, "Waiters queued for a start slot.");
    describe_counter!(
        SLOT_HOLD_TIMEOUTS_TOTAL,
        "Start slots force-released after their hold timeout."
    );
    describe_counter!(
        SLOT_CANCELLED_TOTAL,
        "Queued start-slot waiters that gave up before their turn."
    );
}
