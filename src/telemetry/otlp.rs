//! OTLP trace export, configured the way every OpenTelemetry SDK is: by the standard `OTEL_*`
//! variables, so a deployment sets an endpoint and nothing Weir-specific. Jaeger, Tempo and the
//! OpenTelemetry Collector all ingest OTLP (ports 4317 for gRPC, 4318 for HTTP).
//!
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): where to send;
//!   unset means no exporter at all.
//! - `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`): `grpc` or `http/protobuf` (the
//!   OTLP default).
//! - `OTEL_SERVICE_NAME`: the service's name; `default_service` when unset.

use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

/// Why the OTLP exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The protocol variable names a protocol Weir does not build in.
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0:?} is not supported; use grpc or http/protobuf")]
    Protocol(String),
    /// The exporter could not be built (a malformed endpoint, say).
    #[error("cannot create the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// A tracer provider exporting in batches over OTLP, or `None` when no endpoint is configured.
///
/// Install it with `tracing_opentelemetry::layer().with_tracer(provider.tracer(..))`, and call
/// `shutdown()` on it before exit so buffered spans are flushed.
pub fn tracer_provider_from_env(
    default_service: &'static str,
) -> Result<Option<SdkTracerProvider>, OtlpError> {
    if !env_set("OTEL_EXPORTER_OTLP_ENDPOINT") && !env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "http/protobuf".to_owned());
    let exporter = match protocol.as_str() {
        "grpc" => SpanExporter::builder().with_tonic().build()?,
        "http/protobuf" => SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()?,
        other => return Err(OtlpError::Protocol(other.to_owned())),
    };
    let mut resource = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(default_service);
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}
