//! A trace id survives publish → bus → handler, with the OpenTelemetry SDK's in-memory exporter:
//! on the memory bus and through a real broker (Tansu). The handler's span is a child of the
//! publisher's span, so one trace shows the whole path.

mod reference;
mod support;

use crate::reference::CustomerCreated;
use opentelemetry::trace::{SpanKind, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use std::time::Duration;
use support::broker::Tansu;
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
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

/// Collects what a `fmt` layer writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// At the service's default level (`info`, JSON) no per-record span is built, so each line
/// about a record must carry where the record is, its event and its trace by itself.
#[tokio::test]
async fn a_failed_records_log_lines_carry_its_place_event_id_and_trace_id_at_info() {
    use tracing_subscriber::Layer as _;
    let captured = Captured::default();
    let layer = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(captured.clone())
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));

    let bus = MemoryBus::default();
    bus.create_topic("logged", 1);
    let (tx, mut called) = mpsc::unbounded_channel::<()>();
    let router = Router::new().on_with(
        move |_: CustomerCreated, _ctx: Ctx| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                Err::<(), _>(HandlerError::acknowledged("customer cannot be created"))
            }
        },
        HandlerOptions::new().topic("logged").name("create"),
    );
    let subscription = bus
        .subscribe(router, ConsumerConfig::new("logged-group"))
        .expect("subscribe");
    let trace_id = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
    let envelope = Envelope::new(CustomerCreated::new("c-9", serde_json::json!({})));
    let record = weir::OutboundRecord {
        topic: "logged".to_owned(),
        key: Some(b"c-9".to_vec()),
        value: Some(envelope.to_structured().unwrap()),
        headers: weir::Headers::new()
            .with("content-type", weir::CLOUDEVENTS_CONTENT_TYPE)
            .with("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01")),
    };
    weir::Publisher::publish_record(&bus, record)
        .await
        .expect("publish");
    tokio::time::timeout(Duration::from_secs(30), called.recv())
        .await
        .expect("handled in time");
    // Stopping drains the record: its dead letter is published and logged before this returns.
    subscription.stop().await.expect("stop");

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    for message in ["Handler failed for good.", "Record dead-lettered."] {
        let line = lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in\n{text}"));
        let fields = &line["fields"];
        assert_eq!(fields["topic"], "logged", "{line}");
        assert_eq!(fields["partition"], 0, "{line}");
        assert_eq!(fields["offset"], 0, "{line}");
        assert_eq!(fields["group"], "logged-group", "{line}");
        assert_eq!(fields["event_id"], envelope.meta.id.to_string(), "{line}");
        assert_eq!(fields["trace_id"], trace_id, "{line}");
        assert!(line.get("span").is_none(), "no span at info: {line}");
    }
}

/// Names of the spans a subscriber was asked to build.
#[derive(Clone, Default)]
struct SpanNames(std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpanNames {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.lock().unwrap().push(attrs.metadata().name());
    }
}

/// Handles one record carrying `traceparent` under a tracer (the SDK's default sampler, which
/// follows the parent) and returns the spans built for it.
async fn spans_built_for(traceparent: String) -> Vec<&'static str> {
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(InMemorySpanExporter::default())
        .build();
    let names = SpanNames::default();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("weir-test")))
        .with(names.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let bus = MemoryBus::default();
    bus.create_topic("sampled", 1);
    let (tx, mut called) = mpsc::unbounded_channel::<()>();
    let router = Router::new().on_with(
        move |_: CustomerCreated, _ctx: Ctx| {
            let tx = tx.clone();
            async move { tx.send(()).map_err(HandlerError::acknowledged) }
        },
        HandlerOptions::new().topic("sampled"),
    );
    let subscription = bus
        .subscribe(router, ConsumerConfig::new("sampled-group"))
        .expect("subscribe");
    let envelope = Envelope::new(CustomerCreated::new("c-5", serde_json::json!({})));
    let record = weir::OutboundRecord {
        topic: "sampled".to_owned(),
        key: Some(b"c-5".to_vec()),
        value: Some(envelope.to_structured().unwrap()),
        headers: weir::Headers::new()
            .with("content-type", weir::CLOUDEVENTS_CONTENT_TYPE)
            .with("traceparent", traceparent),
    };
    weir::Publisher::publish_record(&bus, record)
        .await
        .expect("publish");
    tokio::time::timeout(Duration::from_secs(30), called.recv())
        .await
        .expect("handled in time");
    subscription.stop().await.expect("stop");
    let built = names.0.lock().unwrap().clone();
    built
}

/// With a tracer, a record of a trace its producer did not sample keeps its `process` span
/// (which carries the context on to what its handler publishes) but gets no child spans that
/// nobody would export; a sampled one gets them all.
#[tokio::test]
async fn only_sampled_traces_get_decode_and_handle_spans() {
    let trace_id = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
    let sampled = spans_built_for(format!("00-{trace_id}-00f067aa0ba902b7-01")).await;
    for name in ["process", "decode", "handle"] {
        assert!(sampled.contains(&name), "{name} missing from {sampled:?}");
    }
    let unsampled = spans_built_for(format!("00-{trace_id}-00f067aa0ba902b7-00")).await;
    assert!(unsampled.contains(&"process"), "{unsampled:?}");
    assert!(
        !unsampled.contains(&"decode") && !unsampled.contains(&"handle"),
        "{unsampled:?}"
    );
}
