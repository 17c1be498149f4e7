//! Every metric the kernel records, named and described in one place; and [`declare!`], the
//! way every area of the crate declares its metrics.
//!
//! Labels: `kind` (the child's kind), `class` (failure class), `state` (child state),
//! `pool` (start-slot pool).

use metrics::Unit;

/// The type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    /// Only goes up; its name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution of observations, in seconds; its name ends in `_seconds`.
    Histogram,
}

/// One declared metric: its name, type and description (the scrape's `HELP` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// The name, `warden_…`.
    pub name: &'static str,
    /// Its type.
    pub kind: MetricType,
    /// What it counts, one sentence.
    pub help: &'static str,
}

impl Metric {
    /// Registers the description with the installed recorder.
    pub fn describe(&self) {
        match self.kind {
            MetricType::Counter => metrics::describe_counter!(self.name, self.help),
            MetricType::Gauge => metrics::describe_gauge!(self.name, self.help),
            MetricType::Histogram => {
                metrics::describe_histogram!(self.name, Unit::Seconds, self.help)
            }
        }
    }
}

/// Declares metrics, each as `/// doc`, `counter | gauge | histogram`, the constant, its
/// name and its description: a `pub const` per name, `ALL` (every [`Metric`] declared), and
/// `describe()`, which registers every description with the installed recorder. A name
/// cannot be declared without its description.
macro_rules! declare {
    ($(
        $(#[doc = $doc:literal])*
        $kind:ident $name:ident = $value:literal, $help:literal;
    )*) => {
        $(
            $(#[doc = $doc])*
            pub const $name: &str = $value;
        )*

        /// Every metric declared here.
        pub const ALL: &[$crate::supervision::metrics::Metric] = &[$(
            $crate::supervision::metrics::Metric {
                name: $name,
                kind: $crate::supervision::metrics::declare!(@type $kind),
                help: $help,
            },
        )*];

        /// Registers the description of every metric declared here with the installed
        /// recorder (call once, after installing it).
        pub fn describe() {
            for metric in ALL {
                metric.describe();
            }
        }
    };
    (@type counter) => { $crate::supervision::metrics::MetricType::Counter };
    (@type gauge) => { $crate::supervision::metrics::MetricType::Gauge };
    (@type histogram) => { $crate::supervision::metrics::MetricType::Histogram };
}
pub(crate) use declare;

declare! {
    /// Counter: config reloads, by `result` (`applied`, `rejected`).
    counter CONFIG_RELOADS_TOTAL = "warden_config_reloads_total",
        "Config reloads (SIGHUP, POST /admin/reload), applied or rejected.";
    /// Gauge: the generation of the config the tree runs: 1 at start, one more per applied
    /// reload.
    gauge CONFIG_GENERATION = "warden_config_generation",
        "Generation of the running config: 1 at start, one more per applied reload.";
    /// Counter: restarts decided, by `kind` and `class`.
    counter RESTARTS_TOTAL = "warden_restarts_total", "Restarts decided by supervisors.";
    /// Counter: children that gave up (parked, escalated or asked for exit), by `kind` and
    /// `action`.
    counter GIVE_UPS_TOTAL = "warden_give_ups_total",
        "Children that gave up: parked, escalated or exit.";
    /// Gauge: children in each state, by `kind` and `state`.
    gauge CHILDREN = "warden_children", "Supervised children in each state.";
    /// Histogram: backoff delay before a restart, in seconds, by `kind`.
    histogram BACKOFF_DELAY_SECONDS = "warden_backoff_delay_seconds",
        "Backoff delay before a restart.";
    /// Histogram: time from asking for a start slot to getting it, in seconds, by `pool`.
    histogram SLOT_WAIT_SECONDS = "warden_start_slot_wait_seconds", "Wait for a start slot.";
    /// Gauge: current slot holders, by `pool`.
    gauge SLOT_HOLDERS = "warden_start_slot_holders", "Current start-slot holders.";
    /// Gauge: the most slot holders seen at once since start, by `pool`.
    gauge SLOT_HOLDERS_PEAK = "warden_start_slot_holders_peak",
        "Most start-slot holders seen at once.";
    /// Gauge: waiters queued for a slot, by `pool`.
    gauge SLOT_QUEUE = "warden_start_slot_queue", "Waiters queued for a start slot.";
    /// Counter: slots force-released after their hold timeout, by `pool`.
    counter SLOT_HOLD_TIMEOUTS_TOTAL = "warden_start_slot_hold_timeouts_total",
        "Start slots force-released after their hold timeout.";
    /// Counter: queued waiters that gave up before their turn, by `pool`.
    counter SLOT_CANCELLED_TOTAL = "warden_start_slot_cancelled_total",
        "Queued start-slot waiters that gave up before their turn.";
}

/// The rules `promtool check metrics` applies to names and descriptions, for `metrics`:
/// `warden_` and snake case, `_total` exactly on counters, `_seconds` on histograms, a
/// description, every name once.
#[cfg(test)]
pub(crate) fn check_declared(metrics: &[Metric]) {
    let mut seen = std::collections::HashSet::new();
    for m in metrics {
        let name = m.name;
        assert!(seen.insert(name), "{name} declared twice");
        assert!(name.starts_with("warden_"), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}"
        );
        assert_eq!(
            name.ends_with("_total"),
            m.kind == MetricType::Counter,
            "{name}: `_total` is for counters, and every counter has it"
        );
        if m.kind == MetricType::Histogram {
            assert!(name.ends_with("_seconds"), "{name}");
        }
        assert!(
            !m.help.is_empty() && m.help.ends_with('.'),
            "{name}: {:?}",
            m.help
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use metrics::{
        Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };

    use super::*;

    /// What a recorder is told about one metric: name, type, unit, description.
    type Description = (String, MetricType, Option<Unit>, String);

    /// A recorder that keeps what it is told about each metric.
    #[derive(Default)]
    struct Descriptions(Mutex<Vec<Description>>);

    impl Descriptions {
        fn push(&self, key: KeyName, kind: MetricType, unit: Option<Unit>, help: SharedString) {
            let entry = (key.as_str().to_string(), kind, unit, help.to_string());
            self.0.lock().expect("descriptions").push(entry);
        }
    }

    impl Recorder for Descriptions {
        fn describe_counter(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.push(key, MetricType::Counter, unit, help);
        }
        fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.push(key, MetricType::Gauge, unit, help);
        }
        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.push(key, MetricType::Histogram, unit, help);
        }
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    /// Checks that `describe` tells a recorder exactly what `declared` says, in order.
    pub(crate) fn check_described(declared: &[Metric], describe: fn()) {
        let recorder = Descriptions::default();
        metrics::with_local_recorder(&recorder, describe);
        let told = recorder.0.into_inner().expect("descriptions");
        let expected: Vec<Description> = declared
            .iter()
            .map(|m| {
                let unit = (m.kind == MetricType::Histogram).then_some(Unit::Seconds);
                (m.name.to_string(), m.kind, unit, m.help.to_string())
            })
            .collect();
        assert_eq!(told, expected);
    }

    #[test]
    fn every_kernel_metric_is_declared_as_a_scraper_wants_and_described() {
        check_declared(ALL);
        check_described(ALL, describe);
    }
}
