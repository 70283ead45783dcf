//! Logs and traces for the binary: JSON lines (`serve`) or compact text (`demo`), filtered by
//! `RUST_LOG`; spans exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, with `OTEL_EXPORTER_OTLP_PROTOCOL` choosing
//! `grpc` or `http/protobuf` (the OTLP default) and `OTEL_SERVICE_NAME` naming the service.
//! Jaeger ingests OTLP directly (ports 4317 and 4318), so no Jaeger-specific exporter is needed.
//!
//! Each output has a filter of its own. The logs follow `RUST_LOG`; the tracer also gets Weir's
//! per-record spans (`process`, `decode`, `handle`, at `debug` under `weir::record`), which the
//! logs at `info` do not build: a trace still shows producer → process → handle, and a service
//! without an OTLP endpoint pays nothing for them.

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer};

/// The target of Weir's per-record spans (the library's `trace::RECORD_SPANS`).
const RECORD_SPANS: &str = "weir::record";

type SetLogFilter = Box<dyn Fn(&str) -> anyhow::Result<()> + Send + Sync>;

/// Keeps the exporter alive; dropping it flushes the spans still buffered, so short commands
/// (`publish`, `demo`) export theirs too.
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The log filter in force at start: `RUST_LOG`, or the default.
    log_filter: String,
    set_log_filter: SetLogFilter,
}

// Only `weir bench` switches the filter; without the `bench` feature nothing calls these.
#[cfg_attr(not(feature = "bench"), allow(dead_code))]
impl Telemetry {
    /// The log filter the process started with.
    pub(crate) fn log_filter(&self) -> &str {
        &self.log_filter
    }

    /// Replaces the log filter (`weir bench` runs some arms at `error`); `None` restores the
    /// one the process started with.
    pub(crate) fn set_log_filter(&self, directives: Option<&str>) -> anyhow::Result<()> {
        (self.set_log_filter)(directives.unwrap_or(&self.log_filter))
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(error) = provider.shutdown() {
                eprintln!("could not flush traces: {error}");
            }
        }
    }
}

/// Installs the global subscriber. `json` for services, compact text for people.
pub(crate) fn init(json: bool) -> anyhow::Result<Telemetry> {
    let default = if json {
        "info"
    } else {
        "warn,weir=info,librdkafka=error"
    };
    let log_filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty() && EnvFilter::try_new(v).is_ok())
        .unwrap_or_else(|| default.to_owned());
    let (filter, reload) = reload::Layer::new(EnvFilter::new(&log_filter));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour && !json);
    let fmt = if json {
        fmt.json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        fmt.compact().boxed()
    };
    let provider = weir::otlp::tracer_provider_from_env("weir")?;
    let otel = provider.as_ref().map(|p| {
        let spans = EnvFilter::new(format!("{log_filter},{RECORD_SPANS}=debug"));
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("weir"))
            .with_filter(spans)
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .context("cannot install the log subscriber")?;
    Ok(Telemetry {
        provider,
        log_filter,
        set_log_filter: Box::new(move |directives| {
            let filter = EnvFilter::try_new(directives)
                .with_context(|| format!("invalid log filter {directives:?}"))?;
            reload
                .reload(filter)
                .context("cannot change the log filter")
        }),
    })
}

/// Weir's metrics for a long-running command (`serve`, `outbox-relay`, `retry-worker`), with
/// the standard `process_*` series beside them (resident memory, CPU seconds, open file
/// descriptors; prometheus' process collector, which reads `/proc`): what a dashboard's memory
/// panel and a container's OOM investigation need, in the same scrape as the rest. The library
/// leaves this to the service: a process has one such collector, a test process many buses.
pub(crate) fn process_metrics() -> anyhow::Result<weir::Metrics> {
    let metrics = weir::Metrics::new();
    #[cfg(target_os = "linux")]
    metrics
        .registry()
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .context("cannot register the process collector")?;
    Ok(metrics)
}
