//! Logs and traces for the binary: JSON lines (`serve`) or compact text (`demo`), filtered by
//! `RUST_LOG`; spans exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, with `OTEL_EXPORTER_OTLP_PROTOCOL` choosing
//! `grpc` or `http/protobuf` (the OTLP default) and `OTEL_SERVICE_NAME` naming the service.
//! Jaeger ingests OTLP directly (ports 4317 and 4318), so no Jaeger-specific exporter is needed.

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporter alive; dropping it flushes the spans still buffered, so short commands
/// (`publish`, `demo`) export theirs too.
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
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
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(if json {
            "info"
        } else {
            "warn,weir=info,librdkafka=error"
        })
    });
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
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("weir")));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .context("cannot install the log subscriber")?;
    Ok(Telemetry { provider })
}
