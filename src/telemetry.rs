//! Logging and tracing: tracing-subscriber (pretty or JSON) plus optional OTLP export.

use serde::Deserialize;

/// `[telemetry]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `pretty` (default) or `json`.
    pub log_format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG`, when set, wins. Default `info`.
    pub log_filter: String,
    /// OTLP/gRPC endpoint for traces, e.g. `http://127.0.0.1:4317`; empty = off.
    pub otlp_endpoint: String,
    /// Export and shutdown-flush timeout, in ms. Default 3000.
    pub otlp_timeout_ms: u64,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Pretty,
            log_filter: "info".to_string(),
            otlp_endpoint: String::new(),
            otlp_timeout_ms: 3000,
        }
    }
}

use std::error::Error as StdError;
use std::io::IsTerminal as _;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::filter::{Directive, EnvFilter, FilterFn, LevelFilter, ParseError};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::{SubscriberInitExt as _, TryInitError};

/// The `service.name` resource attribute of exported spans.
const SERVICE_NAME: &str = "warden";

/// The longest export timeout we accept: a flush at shutdown must not outlast
/// the container runtime's stop grace period (commonly 10 s).
const MAX_OTLP_TIMEOUT: Duration = Duration::from_millis(4_500);

/// Extra time `shutdown` grants the flush thread beyond the export timeout.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(1);

/// Where a log filter came from, for error messages.
const RUST_LOG: &str = "RUST_LOG";
const SETTINGS_KEY: &str = "telemetry.log_filter";

/// Crates whose spans and events the OTLP layer never sees: the exporter's own
/// stack (`opentelemetry_sdk`, `opentelemetry-otlp`, `hyper_util`, … match
/// too). Exporting them would export the export, forever.
const OTLP_QUIET_TARGETS: [&str; 6] = ["opentelemetry", "tonic", "h2", "hyper", "tower", "reqwest"];

/// Errors of [`init`].
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// One directive of the log filter does not parse.
    #[error("invalid log filter directive `{directive}` in {origin}: {source}")]
    InvalidFilter {
        /// The offending directive, as written.
        directive: String,
        /// `RUST_LOG` or `telemetry.log_filter`.
        origin: &'static str,
        /// What the parser said.
        #[source]
        source: ParseError,
    },
    /// The OTLP exporter could not be built.
    #[error("cannot set up OTLP trace export to `{endpoint}`: {source}")]
    Otlp {
        /// `telemetry.otlp_endpoint`.
        endpoint: String,
        /// The cause.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// A global tracing subscriber is already installed.
    #[error("telemetry is already initialised in this process: {0}")]
    AlreadyInitialized(#[source] TryInitError),
}

/// Installed telemetry. Keep it until the end of `main`, then call
/// [`Telemetry::shutdown`] to flush spans still buffered for OTLP.
#[derive(Debug)]
#[must_use = "dropping Telemetry without `shutdown` loses buffered spans"]
pub struct Telemetry {
    /// The OTLP tracer provider, when `otlp_endpoint` is set.
    provider: Option<SdkTracerProvider>,
    /// Bound on the shutdown flush.
    timeout: Duration,
}

/// Installs the global tracing subscriber: logs to stderr in the configured
/// format, filtered by `RUST_LOG` (when set) or `settings.log_filter`, plus
/// OTLP/gRPC span export when `settings.otlp_endpoint` is set.
///
/// Never blocks on the collector: the gRPC channel connects lazily, so a
/// collector that is down costs failed exports later, not a stalled start.
/// With OTLP on, call it from inside a tokio runtime (the channel's worker
/// runs there); outside one it returns [`TelemetryError::Otlp`].
///
/// # Errors
///
/// An invalid filter directive (named), an OTLP exporter that cannot be built,
/// or a second call in the same process.
pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
    let filter = build_filter(settings)?;
    let provider = otlp_provider(settings)?;
    let subscriber = subscriber(
        settings.log_format,
        filter,
        provider.as_ref(),
        std::io::stderr,
        std::io::stderr().is_terminal(),
    );
    if let Err(err) = subscriber.try_init() {
        if let Some(provider) = provider {
            // Nothing was exported yet; stop the batch thread quietly.
            let _ = provider.shutdown_with_timeout(Duration::ZERO);
        }
        return Err(TelemetryError::AlreadyInitialized(err));
    }
    Ok(Telemetry {
        provider,
        timeout: otlp_timeout(settings),
    })
}

impl Telemetry {
    /// Flushes and stops OTLP export, waiting at most `otlp_timeout_ms` plus a
    /// second. Never hangs when the collector is down; a flush that fails or
    /// runs out of time is logged and dropped. Safe on a `current_thread`
    /// runtime: the blocking flush runs on its own thread while this task
    /// yields, so the runtime keeps driving the gRPC channel.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        flush_and_stop(provider, self.timeout).await;
    }
}

/// Runs `provider.shutdown_with_timeout` on a named OS thread and waits for it
/// at most `timeout + SHUTDOWN_SLACK`.
///
/// An OS thread rather than `spawn_blocking`: dropping a tokio runtime waits
/// for every blocking task, so a flush wedged in the SDK would hang the
/// process exit. A thread we stop waiting for dies with the process instead.
async fn flush_and_stop(provider: SdkTracerProvider, timeout: Duration) {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("warden-otlp-shutdown".to_string())
        .spawn(move || {
            let _ = done_tx.send(provider.shutdown_with_timeout(timeout));
        });
    let thread = match spawned {
        Ok(thread) => thread,
        Err(err) => {
            tracing::warn!(error = %err, "Could not start the OTLP flush thread; buffered spans are lost.");
            return;
        }
    };
    match tokio::time::timeout(timeout + SHUTDOWN_SLACK, done_rx).await {
        Ok(Ok(Ok(()))) => {
            let _ = thread.join();
            tracing::debug!("Flushed and stopped OTLP trace export.");
        }
        Ok(Ok(Err(err))) => {
            let _ = thread.join();
            tracing::warn!(error = %err, "OTLP trace export did not flush cleanly at shutdown.");
        }
        Ok(Err(_closed)) => {
            let _ = thread.join();
            tracing::warn!("The OTLP flush thread ended without a result.");
        }
        Err(_elapsed) => {
            tracing::warn!(
                timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                "OTLP flush did not finish in time; leaving it behind."
            );
        }
    }
}

/// The export timeout from settings, capped at [`MAX_OTLP_TIMEOUT`].
fn otlp_timeout(settings: &TelemetrySettings) -> Duration {
    Duration::from_millis(settings.otlp_timeout_ms).min(MAX_OTLP_TIMEOUT)
}

/// The log filter: `RUST_LOG` when set and not blank, else `settings.log_filter`.
fn build_filter(settings: &TelemetrySettings) -> Result<EnvFilter, TelemetryError> {
    match std::env::var(RUST_LOG) {
        Ok(from_env) if !from_env.trim().is_empty() => parse_filter(&from_env, RUST_LOG),
        _ => parse_filter(&settings.log_filter, SETTINGS_KEY),
    }
}

/// Parses a comma-separated filter with `EnvFilter`'s own semantics, but
/// names the first directive that does not parse (`EnvFilter` reports only the
/// error). Blank pieces are ignored; an empty filter means `info`.
fn parse_filter(text: &str, origin: &'static str) -> Result<EnvFilter, TelemetryError> {
    let invalid = |directive: &str, source| TelemetryError::InvalidFilter {
        directive: directive.to_string(),
        origin,
        source,
    };
    let directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|piece| !piece.is_empty())
        .collect();
    for directive in &directives {
        directive
            .parse::<Directive>()
            .map_err(|source| invalid(directive, source))?;
    }
    let mut joined = directives.join(",");
    // No bare level (e.g. only `warden=debug`, or nothing): everything else logs at info.
    if !directives
        .iter()
        .any(|d| !d.contains('=') && !d.contains('['))
    {
        joined = if joined.is_empty() {
            "info".to_string()
        } else {
            format!("info,{joined}")
        };
    }
    // ractor wraps every actor's loop in an INFO span named `Actor{id=…}`, which would
    // prefix each line with opaque ids next to our own `actor{actor.kind, actor.path}`
    // spans. Quiet it unless the operator's filter says something about ractor.
    if !joined.contains("ractor") {
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str("ractor=warn");
    }
    // matrix-sdk logs its own progress at INFO and every failed request at ERROR (a 404 of
    // optional account data included). warden logs what matters — each failure, once, with
    // the kernel's restart line — so the SDK is quiet below WARN, its request log off and
    // two routine crypto warnings below ERROR, unless the operator's filter names
    // matrix_sdk.
    if !joined.contains("matrix_sdk") {
        joined.push_str(",matrix_sdk=warn,matrix_sdk_base=warn,matrix_sdk_crypto=warn");
        joined.push_str(",matrix_sdk_sqlite=warn,matrix_sdk::http_client=off");
        // Two WARNs nobody can act on: "no backup key was found" twice per login, and
        // "our own device might have been deleted", a race while a new device is set up.
        joined.push_str(",matrix_sdk_crypto::backups=error,matrix_sdk_crypto::identities=error");
    }
    EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse(&joined)
        .map_err(|source| invalid(&joined, source))
}

/// The OTLP/gRPC tracer provider, or `None` when `otlp_endpoint` is empty.
/// Connects lazily: building it never waits for the collector.
fn otlp_provider(
    settings: &TelemetrySettings,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let endpoint = settings.otlp_endpoint.trim();
    if endpoint.is_empty() {
        return Ok(None);
    }
    let otlp_error = |source: Box<dyn StdError + Send + Sync>| TelemetryError::Otlp {
        endpoint: endpoint.to_string(),
        source,
    };
    // tonic spawns the channel's worker on the current runtime and panics
    // without one; say so instead.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(otlp_error(
            "OTLP export must be set up inside a tokio runtime".into(),
        ));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(otlp_timeout(settings))
        .build()
        .map_err(|err| otlp_error(Box::new(err)))?;
    let resource = Resource::builder().with_service_name(SERVICE_NAME).build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// The whole subscriber: global filter, a log layer writing to `writer`, and
/// the OTLP layer when `provider` is set. Not installed: [`init`] does that,
/// tests use it with `tracing::subscriber::with_default`.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    provider: Option<&SdkTracerProvider>,
    writer: W,
    ansi: bool,
) -> impl Subscriber + Send + Sync + for<'a> LookupSpan<'a>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let otlp = provider.map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(SERVICE_NAME))
            .with_filter(FilterFn::new(|meta| !is_exporter_target(meta.target())))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(log_layer(format, writer, ansi))
        .with(otlp)
}

/// Whether `target` belongs to the OTLP exporter's own stack.
fn is_exporter_target(target: &str) -> bool {
    OTLP_QUIET_TARGETS.iter().any(|quiet| {
        target
            .strip_prefix(quiet)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '_', '-']))
    })
}

/// The log layer for `format`.
fn log_layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_target(false)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(writer)
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use super::*;

    /// Captures what a log layer writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// Logs one event inside a span through a subscriber of `format`.
    fn log_one(format: LogFormat) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let filter = parse_filter("info", SETTINGS_KEY).unwrap();
        let subscriber = subscriber(format, filter, None, move || writer.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("actor", actor.path = "root/gateway");
            let _entered = span.enter();
            tracing::info!(attempt = 3, delay_ms = 250, "Restarting after failure.");
            tracing::debug!("filtered out");
        });
        out.text()
    }

    /// A loopback port nobody listens on.
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn otlp_settings(timeout_ms: u64) -> TelemetrySettings {
        TelemetrySettings {
            otlp_endpoint: format!("http://127.0.0.1:{}", closed_port()),
            otlp_timeout_ms: timeout_ms,
            ..TelemetrySettings::default()
        }
    }

    #[test]
    fn invalid_directive_is_named_with_its_origin() {
        let err = parse_filter("info, warden=loud ,tower=warn", SETTINGS_KEY).unwrap_err();
        match &err {
            TelemetryError::InvalidFilter {
                directive, origin, ..
            } => {
                assert_eq!(directive, "warden=loud");
                assert_eq!(*origin, "telemetry.log_filter");
            }
            other => panic!("unexpected error: {other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains("`warden=loud`"), "{message}");
        assert!(message.contains("telemetry.log_filter"), "{message}");

        let err = parse_filter("[unclosed", RUST_LOG).unwrap_err();
        assert!(err.to_string().contains("`[unclosed` in RUST_LOG"), "{err}");
    }

    #[test]
    fn valid_filters_parse_and_blank_means_info() {
        for blank in ["", " , "] {
            let shown = parse_filter(blank, SETTINGS_KEY).unwrap().to_string();
            assert!(
                shown.contains("info") && shown.contains("ractor=warn"),
                "{shown}"
            );
        }
        // Only a target directive: everything else still logs at info.
        let shown = parse_filter("warden=debug", SETTINGS_KEY)
            .unwrap()
            .to_string();
        assert!(
            shown.contains("info") && shown.contains("warden=debug"),
            "{shown}"
        );
        // ractor's per-actor spans are quiet by default, unless the operator asks for them.
        let shown = parse_filter("debug,ractor=trace", SETTINGS_KEY)
            .unwrap()
            .to_string();
        assert!(
            shown.contains("ractor=trace") && !shown.contains("ractor=warn"),
            "{shown}"
        );
        let filter = parse_filter(" warn , warden_actors=debug ", SETTINGS_KEY).unwrap();
        let shown = filter.to_string();
        assert!(shown.contains("warden_actors=debug"), "{shown}");
        assert!(shown.contains("warn"), "{shown}");
    }

    #[test]
    fn pretty_logs_show_fields_without_target() {
        let text = log_one(LogFormat::Pretty);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("Restarting after failure."), "{text}");
        assert!(text.contains("attempt=3"), "{text}");
        assert!(text.contains("delay_ms=250"), "{text}");
        assert!(text.contains("root/gateway"), "{text}");
        assert!(!text.contains("warden::telemetry"), "{text}");
        assert!(
            !text.contains('\u{1b}'),
            "no ANSI codes when not a terminal: {text}"
        );
    }

    #[test]
    fn json_logs_are_one_flat_object_per_line() {
        let text = log_one(LogFormat::Json);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let event: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(event["message"], "Restarting after failure.");
        assert_eq!(event["attempt"], 3);
        assert_eq!(event["delay_ms"], 250);
        assert_eq!(event["level"], "INFO");
        assert_eq!(event["span"]["name"], "actor");
        assert_eq!(event["span"]["actor.path"], "root/gateway");
    }

    #[test]
    fn exporter_stack_is_kept_out_of_otlp() {
        for target in [
            "opentelemetry",
            "opentelemetry_sdk",
            "opentelemetry-otlp",
            "tonic::transport",
            "h2::proto",
            "hyper_util::client",
        ] {
            assert!(is_exporter_target(target), "{target}");
        }
        for target in ["warden", "warden_actors::supervision", "hyperion", "towerd"] {
            assert!(!is_exporter_target(target), "{target}");
        }
    }

    #[test]
    fn no_endpoint_means_no_provider() {
        assert!(
            otlp_provider(&TelemetrySettings::default())
                .unwrap()
                .is_none()
        );
        let blank = TelemetrySettings {
            otlp_endpoint: "  ".to_string(),
            ..TelemetrySettings::default()
        };
        assert!(otlp_provider(&blank).unwrap().is_none());
    }

    #[test]
    fn otlp_outside_a_runtime_is_an_error_not_a_panic() {
        let err = otlp_provider(&otlp_settings(1000)).unwrap_err();
        assert!(matches!(err, TelemetryError::Otlp { .. }), "{err:?}");
        assert!(err.to_string().contains("tokio runtime"), "{err}");
    }

    #[tokio::test]
    async fn bad_endpoint_is_an_otlp_error() {
        let settings = TelemetrySettings {
            otlp_endpoint: "not a uri".to_string(),
            ..TelemetrySettings::default()
        };
        let err = otlp_provider(&settings).unwrap_err();
        assert!(err.to_string().contains("`not a uri`"), "{err}");
    }

    #[test]
    fn timeout_is_capped_under_five_seconds() {
        let settings = TelemetrySettings {
            otlp_timeout_ms: 60_000,
            ..TelemetrySettings::default()
        };
        assert!(otlp_timeout(&settings) < Duration::from_secs(5));
        assert_eq!(
            otlp_timeout(&TelemetrySettings::default()),
            Duration::from_millis(3000)
        );
    }

    /// Builds the OTLP stack against a closed port, exports a span, shuts down.
    /// Returns (time to build, time to shut down).
    async fn export_to_closed_port(timeout_ms: u64) -> (Duration, Duration) {
        let settings = otlp_settings(timeout_ms);
        let started = Instant::now();
        let provider = otlp_provider(&settings).unwrap();
        let filter = parse_filter("info", SETTINGS_KEY).unwrap();
        let subscriber = subscriber(LogFormat::Json, filter, provider.as_ref(), io::sink, false);
        let built = started.elapsed();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("supervise", actor.kind = "test");
            let _entered = span.enter();
            tracing::info!("Inside a span that the collector will never get.");
        });
        let telemetry = Telemetry {
            provider,
            timeout: otlp_timeout(&settings),
        };
        let stopping = Instant::now();
        telemetry.shutdown().await;
        (built, stopping.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_with_collector_down_is_bounded() {
        let (built, shutdown) = export_to_closed_port(2000).await;
        assert!(built < Duration::from_secs(1), "building took {built:?}");
        assert!(
            shutdown < Duration::from_secs(6),
            "shutdown took {shutdown:?}"
        );
    }

    #[tokio::test]
    async fn shutdown_on_current_thread_runtime_is_bounded() {
        let (_, shutdown) = export_to_closed_port(1000).await;
        assert!(
            shutdown < Duration::from_secs(6),
            "shutdown took {shutdown:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_with_a_silent_collector_is_bounded() {
        // Accepts connections and never answers: the export hangs until its
        // timeout, and shutdown must not wait longer than timeout + slack.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let settings = TelemetrySettings {
            otlp_endpoint: format!("http://127.0.0.1:{port}"),
            otlp_timeout_ms: 1000,
            ..TelemetrySettings::default()
        };
        let provider = otlp_provider(&settings).unwrap();
        let subscriber = subscriber(
            LogFormat::Json,
            parse_filter("info", SETTINGS_KEY).unwrap(),
            provider.as_ref(),
            io::sink,
            false,
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info_span!("held").in_scope(|| tracing::info!("Never delivered."));
        });
        let telemetry = Telemetry {
            provider,
            timeout: otlp_timeout(&settings),
        };
        let started = Instant::now();
        telemetry.shutdown().await;
        let took = started.elapsed();
        silent.abort();
        assert!(took < Duration::from_millis(2500), "shutdown took {took:?}");
    }

    #[tokio::test]
    async fn shutdown_without_otlp_is_immediate() {
        let telemetry = Telemetry {
            provider: None,
            timeout: Duration::from_secs(3),
        };
        let started = Instant::now();
        telemetry.shutdown().await;
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
