//! A trace id survives publish → bus → handler, with the OpenTelemetry SDK's in-memory exporter:
//! on the memory bus and through a real broker (Tansu). The handler's span is a child of the
//! publisher's span, so one trace shows the whole path.

mod support;

use opentelemetry::trace::{SpanKind, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use std::time::Duration;
use support::broker::Tansu;
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use weir::seeds::CustomerCreated;
use weir::{
    Bus, ConsumerConfig, Ctx, Envelope, HandlerError, HandlerOptions, KafkaBus, KafkaConfig,
    MemoryBus, Router,
};

struct Tracing {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

/// Installs an OpenTelemetry layer for this (current-thread) test only.
fn tracing() -> Tracing {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("weir-test"));
    let subscriber = tracing_subscriber::registry().with(layer);
    Tracing {
        exporter,
        provider,
        _guard: tracing::subscriber::set_default(subscriber),
    }
}

/// Publishes one event inside a root span and returns (root trace id, the traceparent the
/// handler saw, the exported spans).
async fn publish_and_handle<B: Bus>(
    bus: B,
    topic: &str,
    t: &Tracing,
) -> (String, String, Vec<SpanData>) {
    let (tx, mut seen) = mpsc::unbounded_channel::<String>();
    let router = Router::new().on_with(
        move |_: CustomerCreated, ctx: Ctx| {
            let tx = tx.clone();
            async move {
                let parent = ctx
                    .trace()
                    .map(|t| t.traceparent.clone())
                    .unwrap_or_default();
                tx.send(parent).map_err(HandlerError::acknowledged)
            }
        },
        HandlerOptions::new().topic(topic),
    );
    let subscription = bus
        .subscribe(router, ConsumerConfig::new(format!("{topic}-group")))
        .expect("subscribe");
    let root = tracing::info_span!("checkout");
    let root_trace = format!("{:032x}", root.context().span().span_context().trace_id());
    let envelope = Envelope::new(CustomerCreated::new("c-1", serde_json::json!({})));
    let mut record = weir::OutboundRecord {
        topic: topic.to_owned(),
        key: Some(b"c-1".to_vec()),
        value: Some(envelope.to_structured().unwrap()),
        headers: weir::Headers::new(),
    };
    record
        .headers
        .insert("content-type", weir::CLOUDEVENTS_CONTENT_TYPE);
    weir::Publisher::publish_record(&bus, record)
        .instrument(root)
        .await
        .expect("publish");
    let traceparent = tokio::time::timeout(Duration::from_secs(30), seen.recv())
        .await
        .expect("handled in time")
        .expect("a traceparent");
    subscription.stop().await.expect("stop");
    t.provider.force_flush().expect("flush");
    let spans = t.exporter.get_finished_spans().expect("spans");
    (root_trace, traceparent, spans)
}

fn assert_one_trace(root_trace: &str, traceparent: &str, spans: &[SpanData]) {
    assert_eq!(
        traceparent.split('-').nth(1),
        Some(root_trace),
        "the handler saw {traceparent}"
    );
    let span = |name: &str| {
        spans
            .iter()
            .find(|s| s.name.contains(name))
            .unwrap_or_else(|| {
                panic!(
                    "no {name} span in {:?}",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            })
    };
    let publish = span("send");
    let process = span("process");
    let handle = span("handle");
    for s in [publish, process, handle] {
        assert_eq!(
            format!("{:032x}", s.span_context.trace_id()),
            root_trace,
            "{}",
            s.name
        );
    }
    assert_eq!(publish.span_kind, SpanKind::Producer);
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(
        process.parent_span_id,
        publish.span_context.span_id(),
        "process continues the publish span"
    );
    assert!(process.parent_span_is_remote);
    assert_eq!(handle.parent_span_id, process.span_context.span_id());
    let decode = span("decode");
    assert_eq!(
        decode.parent_span_id,
        process.span_context.span_id(),
        "decode runs inside process"
    );
    let attribute = |key: &str| {
        process
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    assert_eq!(attribute("messaging.system").as_deref(), Some("kafka"));
    assert_eq!(
        attribute("messaging.operation.type").as_deref(),
        Some("process")
    );
    assert!(attribute("messaging.message.id").is_some());
    assert_eq!(
        attribute("cloudevents.event_type").as_deref(),
        Some("customer.created")
    );
}

#[tokio::test]
async fn trace_context_survives_the_memory_bus() {
    let t = tracing();
    let (root, traceparent, spans) = publish_and_handle(MemoryBus::default(), "traced", &t).await;
    assert_one_trace(&root, &traceparent, &spans);
}

#[tokio::test]
async fn trace_context_survives_a_real_broker() {
    let t = tracing();
    let broker = Tansu::start_memory();
    broker.create_topic("traced", 1);
    let bus = KafkaBus::new(KafkaConfig::new(broker.brokers())).expect("bus");
    let (root, traceparent, spans) = publish_and_handle(bus, "traced", &t).await;
    assert_one_trace(&root, &traceparent, &spans);
}
