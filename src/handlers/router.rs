//! The registry: (topic, event type) → the handlers of that type. Type erasure happens here and
//! only here; everything downstream works on erased routes.

use super::batch::{BatchHandlerFn, BatchWindow, Batcher};
use super::breaker::BreakerConfig;
use super::erased::{handler_name, BoxFuture, ErasedEvent};
use super::layer::{layer_erased, AnyEvent, HandlerService, IntoHandler, Request};
use super::{BoxError, Ctx, HandlerError, RetryPolicy};
use crate::contracts::{
    decode_structured_as, DecodeError, DecodeLimits, Event, EventDescriptor, EventFactory,
    EventMeta, Headers, RawEnvelope,
};
use crate::telemetry::{Metrics, RouteSeries};
use serde::Deserialize;
use std::any::TypeId;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

type Decode = Box<dyn Fn(&RawEnvelope) -> Result<ErasedEvent, DecodeError> + Send + Sync>;
type DecodeOnePass = Box<
    dyn Fn(Option<&[u8]>, &Headers, &DecodeLimits) -> Option<(EventMeta, ErasedEvent)>
        + Send
        + Sync,
>;
/// Takes the event by value: the handler owns it without a copy when nothing else holds it.
pub(crate) type Call =
    Arc<dyn Fn(ErasedEvent, Ctx) -> BoxFuture<Result<(), HandlerError>> + Send + Sync>;

/// What to do with a record whose event type has no handler on its topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnhandledPolicy {
    /// Count it (`outcome="skipped"`) and move on: the topic carries types this service ignores.
    #[default]
    Skip,
    /// Treat it as a decode error (`unknown_event_type`) and dead-letter it.
    DeadLetter,
}

/// What to do when a handler fails with [`HandlerError::Acknowledged`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckPolicy {
    /// Publish the record to the dead-letter topic (the default: nothing is lost).
    #[default]
    DeadLetter,
    /// Count it as skipped and drop it: for handlers whose failures are expected and harmless.
    Drop,
}

/// Options for one registered handler; the router's defaults apply where unset.
#[derive(Debug, Clone, Default)]
pub struct HandlerOptions {
    name: Option<String>,
    topic: Option<String>,
    retry: Option<RetryPolicy>,
    timeout: Option<Duration>,
    on_acknowledged: Option<AckPolicy>,
    cpu_bound: bool,
    breaker: Option<BreakerConfig>,
}

impl HandlerOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// The name used in logs, metrics and the `weir.handler` dead-letter header.
    /// Defaults to the function's name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Consume this event type from another topic than `T::TOPIC`.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// A retry policy for this handler only.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Bounds each call; a call that overruns counts as a `Retryable` failure.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// What an `Acknowledged` failure of this handler leads to.
    pub fn on_acknowledged(mut self, policy: AckPolicy) -> Self {
        self.on_acknowledged = Some(policy);
        self
    }

    /// The handler burns CPU or blocks the thread (parsing, hashing, image work, a blocking
    /// client). It then runs on Tokio's blocking pool, at most one call per core at a time
    /// across all such handlers, so it can neither starve the consumer loop and the async
    /// handlers nor oversubscribe the cores however many keys are ready.
    pub fn cpu_bound(mut self) -> Self {
        self.cpu_bound = true;
        self
    }

    /// A circuit breaker for this handler (off by default): when its calls fail retryably
    /// over the configured ratio, the engine pauses the route, holds its in-flight records
    /// without spending attempts, and probes with one record after a cool-down. See
    /// [`BreakerConfig`].
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = Some(config);
        self
    }
}

/// One registered handler, its type erased.
pub(crate) struct Route {
    pub(crate) name: Arc<str>,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) on_acknowledged: Option<AckPolicy>,
    pub(crate) cpu_bound: bool,
    /// The route's circuit breaker, if configured.
    pub(crate) breaker: Option<BreakerConfig>,
    pub(crate) call: Call,
    /// Records of this route the engine is to run as tasks straight away, without calling the
    /// handler on its own thread first: set when such a call ran long (the handler computes
    /// or blocks its thread in its poll), counted down per record.
    pub(crate) spawn_next: std::sync::atomic::AtomicU32,
}

/// Everything registered for one (topic, event type): one decoder, one or more handlers.
pub(crate) struct TypeRoute {
    type_id: TypeId,
    /// The contract behind this route, for the documents of `weir::schema`.
    pub(crate) event: EventDescriptor,
    pub(crate) decode: Decode,
    /// Envelope and payload in one pass; see [`decode_structured_as`].
    pub(crate) decode_one_pass: DecodeOnePass,
    pub(crate) handlers: Vec<Route>,
    /// This route's metric series, resolved when a dispatcher takes the router.
    pub(crate) series: Option<RouteSeries>,
}

/// Maps (topic, event type) to handlers, with the defaults they share.
///
/// Several handlers for one type **fan out**: each gets the event, each has its own retries and
/// its own outcome, and one failing does not re-run the others. The record's offset is committed
/// once every handler's outcome is final; a handler that ends in the dead-letter topic gets its own
/// dead-letter record, naming it in the `weir.handler` header so it can be replayed alone.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # struct OrderPlaced { order_id: String, total_cents: u64 }
/// # impl weir::Event for OrderPlaced {
/// #     const TYPE: weir::EventType = weir::EventType::new("order.placed");
/// #     const TOPIC: &'static str = "orders";
/// #     fn key(&self) -> String { self.order_id.clone() }
/// # }
/// use weir::{Ctx, HandlerError, Router};
/// async fn reserve_stock(order: OrderPlaced, ctx: Ctx) -> Result<(), HandlerError> {
///     println!("order {} at offset {}", order.order_id, ctx.offset());
///     Ok(())
/// }
/// let router = Router::new().on(reserve_stock);
/// assert_eq!(router.topics(), vec!["orders".to_owned()]);
/// ```
///
/// State and layers work as in axum: [`Router::with_state`] gives handlers a [`State<S>`]
/// argument, and [`Router::layer`] (every route) or [`HandlerExt::layer`](crate::HandlerExt::layer)
/// (one route) wrap handlers in any `tower::Layer`.
///
/// [`State<S>`]: crate::State
pub struct Router<S = ()> {
    routes: BTreeMap<String, BTreeMap<String, TypeRoute>>,
    pub(crate) default_retry: RetryPolicy,
    pub(crate) on_unhandled: UnhandledPolicy,
    pub(crate) on_acknowledged: AckPolicy,
    pub(crate) limits: DecodeLimits,
    /// Where records go for durable retries (`Router::durable_retries`); `None`: no durable stage.
    pub(crate) parking: Option<Arc<dyn super::Parking>>,
    /// Sees every call and outcome; set by `weir::testing` only.
    pub(crate) observer: Option<Arc<dyn Observe>>,
    state: S,
}

/// What a test harness learns from the dispatcher: each handler call as it ends, and each
/// record's outcome once it is final.
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
pub(crate) trait Observe: Send + Sync {
    /// A call of `handler` on `rec` that started at `started` has just returned.
    fn call(
        &self,
        rec: &super::record::Inbound,
        handler: &str,
        attempt: u32,
        started: tokio::time::Instant,
    );
    /// The record's outcome.
    fn outcome(&self, rec: &super::record::Inbound, outcome: &super::record::Outcome);
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> std::fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for (topic, ty, route) in self.iter() {
            let names: Vec<&str> = route.handlers.iter().map(|h| &*h.name).collect();
            map.entry(&format!("{topic}/{ty} ({})", route.event.rust_type), &names);
        }
        map.finish()
    }
}

impl Router {
    /// An empty router with the default retry policy and no state.
    pub fn new() -> Self {
        Router::with_state(())
    }
}

impl<S> Router<S> {
    /// An empty router whose handlers can take `State<S>`: a clone of `state` goes into each
    /// call. Give the state first, then register the handlers that use it.
    pub fn with_state(state: S) -> Self {
        Self {
            routes: BTreeMap::new(),
            default_retry: RetryPolicy::default(),
            on_unhandled: UnhandledPolicy::default(),
            on_acknowledged: AckPolicy::default(),
            limits: DecodeLimits::default(),
            parking: None,
            observer: None,
            state,
        }
    }

    /// The same routes without the state: every handler already holds its copy.
    pub(crate) fn into_stateless(self) -> Router {
        Router {
            routes: self.routes,
            default_retry: self.default_retry,
            on_unhandled: self.on_unhandled,
            on_acknowledged: self.on_acknowledged,
            limits: self.limits,
            parking: self.parking,
            observer: self.observer,
            state: (),
        }
    }

    /// Registers a handler for its event type on that type's topic: any `async fn(T, ...)`
    /// whose other arguments are `Ctx`, `State<S>` or [`FromCtx`](crate::FromCtx) types, or
    /// such a handler with layers.
    pub fn on<T: Event, M, H: IntoHandler<T, M, S>>(self, handler: H) -> Self {
        self.on_with(handler, HandlerOptions::default())
    }

    /// Gives every handler named `route` (its [`HandlerOptions::name`]) a circuit breaker,
    /// replacing any it had: the same as [`HandlerOptions::breaker`] at registration, for
    /// configuration read later (the `weir` binary's `[routes.<name>.breaker]`). Returns
    /// whether a handler has that name.
    pub fn set_breaker(&mut self, route: &str, config: BreakerConfig) -> bool {
        let mut found = false;
        for types in self.routes.values_mut() {
            for entry in types.values_mut() {
                for handler in entry.handlers.iter_mut().filter(|h| &*h.name == route) {
                    handler.breaker = Some(config.clone());
                    found = true;
                }
            }
        }
        found
    }

    /// Wraps every handler registered so far in `layer`, a `tower::Layer` over a handler's
    /// service of [`AnyEvent`]s (the route decodes the event before; the layer can
    /// [`downcast_ref`](AnyEvent::downcast_ref) it). As in axum, handlers registered after this
    /// call are not wrapped, and the last layer added runs first.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<HandlerService<AnyEvent>>,
        L::Service:
            tower::Service<Request<AnyEvent>, Response = ()> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<Request<AnyEvent>>>::Error: Into<BoxError>,
        <L::Service as tower::Service<Request<AnyEvent>>>::Future: Send + 'static,
    {
        for types in self.routes.values_mut() {
            for route in types.values_mut() {
                for handler in &mut route.handlers {
                    handler.call = layer_erased(handler.call.clone(), &layer);
                }
            }
        }
        self
    }

    /// Registers a handler with options (name, topic, retry policy, timeout).
    ///
    /// # Panics
    /// If another Rust type is already registered for the same topic and event type: one wire
    /// type has one contract, and mixing two would make decoding depend on registration order.
    pub fn on_with<T: Event, M, H: IntoHandler<T, M, S>>(
        mut self,
        handler: H,
        options: HandlerOptions,
    ) -> Self {
        let topic = options.topic.unwrap_or_else(|| T::TOPIC.to_owned());
        let entry = self
            .routes
            .entry(topic.clone())
            .or_default()
            .entry(T::TYPE.as_str().to_owned())
            .or_insert_with(|| TypeRoute {
                type_id: TypeId::of::<T>(),
                event: EventDescriptor::of::<T>(),
                decode: Box::new(|raw| {
                    let event: T = EventFactory::<T>::new().decode_data(raw)?;
                    Ok(Arc::new(event) as ErasedEvent)
                }),
                decode_one_pass: Box::new(|value, headers, limits| {
                    let (meta, event) = decode_structured_as::<T>(value, headers, limits)?;
                    Some((meta, Arc::new(event) as ErasedEvent))
                }),
                handlers: Vec::new(),
                series: None,
            });
        assert!(
            entry.type_id == TypeId::of::<T>(),
            "event type {} on topic {topic} is already registered as {}, not {}",
            T::TYPE,
            entry.event.rust_type,
            std::any::type_name::<T>()
        );
        let name: Arc<str> = Arc::from(options.name.unwrap_or_else(|| handler.name()));
        let service = handler.into_service(&self.state);
        entry.handlers.push(Route {
            name,
            retry: options.retry,
            timeout: options.timeout,
            on_acknowledged: options.on_acknowledged,
            cpu_bound: options.cpu_bound,
            breaker: options.breaker,
            spawn_next: std::sync::atomic::AtomicU32::new(0),
            call: Arc::new(move |event, ctx| {
                let event = event
                    .downcast::<T>()
                    .map(Arc::unwrap_or_clone)
                    .unwrap_or_else(|_| unreachable!("the route decoded this event as T"));
                service.call_once(event, ctx)
            }),
        });
        self
    }

    /// Registers a batch handler: `async fn(Vec<T>, ...) -> BatchResult`, called with the
    /// records of one partition that are ready together, up to the window's size and wait.
    /// Each element keeps its own outcome, retries, dead letter and offset; see
    /// [`BatchWindow`](crate::BatchWindow).
    pub fn on_batch<T: Event, M, H>(self, handler: H, window: BatchWindow) -> Self
    where
        H: BatchHandlerFn<T, M, S>,
        S: Clone + Send + Sync + 'static,
    {
        self.on_batch_with(handler, window, HandlerOptions::default())
    }

    /// A batch handler with options (name, topic, retry policy applied to each element).
    pub fn on_batch_with<T: Event, M, H>(
        self,
        handler: H,
        window: BatchWindow,
        options: HandlerOptions,
    ) -> Self
    where
        H: BatchHandlerFn<T, M, S>,
        S: Clone + Send + Sync + 'static,
    {
        let name = options.name.clone().unwrap_or_else(handler_name::<H>);
        let batcher = Arc::new(Batcher::new(handler, self.state.clone(), window));
        let element = move |event: T, ctx: Ctx| batcher.clone().submit(event, ctx);
        self.on_with(element, options.name(name))
    }

    /// The retry policy of handlers registered without their own.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.default_retry = policy;
        self
    }

    /// What to do with event types that have no handler (default: skip).
    pub fn unhandled(mut self, policy: UnhandledPolicy) -> Self {
        self.on_unhandled = policy;
        self
    }

    /// What `Acknowledged` failures lead to, for handlers that do not say (default: dead-letter).
    pub fn on_acknowledged(mut self, policy: AckPolicy) -> Self {
        self.on_acknowledged = policy;
        self
    }

    /// Limits applied to every record before decoding.
    pub fn decode_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The topics that have at least one handler: what a consumer subscribes to.
    pub fn topics(&self) -> Vec<String> {
        self.routes.keys().cloned().collect()
    }

    /// The handler registered under `name` for any event type of `topic`.
    #[cfg(feature = "postgres")]
    pub(crate) fn handler(&self, topic: &str, name: &str) -> Option<&Route> {
        self.routes
            .get(topic)?
            .values()
            .flat_map(|r| r.handlers.iter())
            .find(|h| &*h.name == name)
    }

    pub(crate) fn route(&self, topic: &str, event_type: &str) -> Option<&TypeRoute> {
        self.routes.get(topic)?.get(event_type)
    }

    /// The route of a topic that carries exactly one registered type, with that type's wire name.
    pub(crate) fn sole_route(&self, topic: &str) -> Option<(&str, &TypeRoute)> {
        let types = self.routes.get(topic)?;
        if types.len() != 1 {
            return None;
        }
        types.iter().next().map(|(t, r)| (t.as_str(), r))
    }

    /// Resolves every route's metric series in `metrics`.
    pub(crate) fn bind_metrics(&mut self, metrics: &Metrics) {
        for (topic, types) in &mut self.routes {
            for (event_type, route) in types {
                route.series = Some(metrics.route_series(topic, event_type));
            }
        }
    }

    /// Every (topic, event type, route), ordered by topic then type.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &str, &TypeRoute)> {
        self.routes.iter().flat_map(|(t, types)| {
            types
                .iter()
                .map(move |(ty, r)| (t.as_str(), ty.as_str(), r))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::erased::handler_name;
    use super::*;

    /// A neutral event of the tests' own: the library's tests use no reference-service type.
    #[derive(Clone, serde::Serialize, serde::Deserialize)]
    struct TaskCreated {}

    impl Event for TaskCreated {
        const TYPE: crate::EventType = crate::EventType::new("task.created");
        const TOPIC: &'static str = "tasks";
        fn key(&self) -> String {
            String::new()
        }
    }

    async fn handle_task(_: TaskCreated, _: Ctx) -> Result<(), HandlerError> {
        Ok(())
    }

    fn named<T, M, H: super::super::HandlerFn<T, M>>(_: &H) -> String {
        handler_name::<H>()
    }

    #[test]
    fn default_handler_names_are_short() {
        assert_eq!(named(&handle_task), "handle_task");
        let closure = |_: TaskCreated, _: Ctx| async { Ok(()) };
        assert_eq!(
            named(&closure),
            "default_handler_names_are_short::{{closure}}"
        );
    }

    #[test]
    #[should_panic(expected = "already registered")]
    fn refuses_two_rust_types_for_one_wire_type() {
        #[derive(Clone, serde::Serialize, serde::Deserialize)]
        struct OtherTaskCreated {}
        impl Event for OtherTaskCreated {
            const TYPE: crate::EventType = TaskCreated::TYPE;
            const TOPIC: &'static str = TaskCreated::TOPIC;
            fn key(&self) -> String {
                String::new()
            }
        }
        let _ = Router::new()
            .on(handle_task)
            .on(|_: OtherTaskCreated, _: Ctx| async { Ok(()) });
    }
}
