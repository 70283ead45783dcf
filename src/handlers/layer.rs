//! Middleware as tower layers. A handler becomes a [`HandlerService<T>`], a
//! `tower::Service<Request<T>>`; a layer on a route wraps that typed service, and a layer on the
//! whole router wraps each route's service over an [`AnyEvent`]. Either can look at the event
//! and its [`Ctx`] and answer with a [`HandlerError`] without calling the handler.
//!
//! Cross-cutting behaviour reads best here: tower's `ConcurrencyLimitLayer`, `TimeoutLayer`,
//! rate limits, or a layer of your own. An error a layer returns that is not a `HandlerError`
//! (tower's timeout, say) counts as [`HandlerError::Retryable`], since a layer's own failures
//! (overload, a deadline) are transient.

use super::erased::{handler_name, BoxFuture, ErasedEvent};
use super::{BoxError, Ctx, HandlerError, HandlerFn};
use std::any::Any;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

/// What a handler's service receives: the decoded event and its context.
#[derive(Debug, Clone)]
pub struct Request<T> {
    /// The event, already decoded.
    pub event: T,
    /// The record's context (topic, partition, offset, attempt, event id, ...).
    pub ctx: Ctx,
}

/// An event whose type is known only to its route: what router-wide layers see.
#[derive(Clone)]
pub struct AnyEvent(pub(crate) ErasedEvent);

impl AnyEvent {
    /// The event, if it is a `T`.
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

impl std::fmt::Debug for AnyEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnyEvent")
    }
}

type PlainFn<T> = Arc<dyn Fn(T, Ctx) -> BoxFuture<Result<(), HandlerError>> + Send + Sync>;

/// A handler as a `tower::Service<Request<T>>`: what a route's layers wrap.
///
/// A handler without layers stays a plain function call, with no service machinery per record.
pub struct HandlerService<T> {
    inner: Inner<T>,
}

enum Inner<T> {
    Plain(PlainFn<T>),
    Boxed(BoxCloneSyncService<Request<T>, (), HandlerError>),
}

impl<T> Clone for HandlerService<T> {
    fn clone(&self) -> Self {
        let inner = match &self.inner {
            Inner::Plain(f) => Inner::Plain(f.clone()),
            Inner::Boxed(s) => Inner::Boxed(s.clone()),
        };
        Self { inner }
    }
}

impl<T> std::fmt::Debug for HandlerService<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            Inner::Plain(_) => "HandlerService(handler)",
            Inner::Boxed(_) => "HandlerService(layered)",
        })
    }
}

impl<T: Send + 'static> HandlerService<T> {
    pub(crate) fn plain(f: PlainFn<T>) -> Self {
        Self {
            inner: Inner::Plain(f),
        }
    }

    /// Wraps any service whose errors convert into a [`HandlerError`] (see the module docs).
    fn layered<Svc>(service: Svc) -> Self
    where
        Svc: Service<Request<T>, Response = ()> + Clone + Send + Sync + 'static,
        Svc::Error: Into<BoxError>,
        Svc::Future: Send + 'static,
    {
        let service = service.map_err(|e| HandlerError::from_boxed(e.into()));
        Self {
            inner: Inner::Boxed(BoxCloneSyncService::new(service)),
        }
    }

    /// One call, as the router makes it.
    pub(crate) fn call_once(&self, event: T, ctx: Ctx) -> BoxFuture<Result<(), HandlerError>> {
        match &self.inner {
            Inner::Plain(f) => f(event, ctx),
            Inner::Boxed(service) => Box::pin(service.clone().oneshot(Request { event, ctx })),
        }
    }
}

impl<T: Send + 'static> Service<Request<T>> for HandlerService<T> {
    type Response = ();
    type Error = HandlerError;
    type Future = BoxFuture<Result<(), HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        match &mut self.inner {
            Inner::Plain(_) => Poll::Ready(Ok(())),
            Inner::Boxed(service) => service.poll_ready(cx),
        }
    }

    fn call(&mut self, request: Request<T>) -> Self::Future {
        match &mut self.inner {
            Inner::Plain(f) => f(request.event, request.ctx),
            Inner::Boxed(service) => service.call(request),
        }
    }
}

/// What [`Router::on`](crate::Router::on) takes: a [`HandlerFn`], or one with layers
/// ([`HandlerExt::layer`]). The router turns it into its service once, at registration.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Weir handler for `{T}` events with router state `{S}`",
    label = "not an `async fn({T}, ...) -> Result<(), HandlerError>`",
    note = "a handler takes the event first, then up to three of `Ctx`, `State<S>` or your own `FromCtx` types, and returns `Result<(), HandlerError>`",
    note = "`State<X>` needs `Router::with_state(x)` with the same `X`; its future must be `Send + 'static` (clone what it borrows)"
)]
pub trait IntoHandler<T, M, S>: Send + 'static {
    /// The service this handler is, with the router's state in it.
    fn into_service(self, state: &S) -> HandlerService<T>;

    /// A readable name for logs and metrics: the function's own name by default.
    fn name(&self) -> String;
}

impl<T, M, S, H> IntoHandler<T, M, S> for H
where
    T: Send + 'static,
    S: Clone + Send + Sync + 'static,
    H: HandlerFn<T, M, S>,
{
    fn into_service(self, state: &S) -> HandlerService<T> {
        let state = state.clone();
        HandlerService::plain(Arc::new(move |event, ctx| {
            Box::pin(self.call(event, ctx, &state))
        }))
    }

    fn name(&self) -> String {
        handler_name::<H>()
    }
}

/// Keeps a layered handler's type parameters without owning any of them.
type Types<T, M, S> = PhantomData<fn() -> (T, M, S)>;

/// A handler with a layer around it; see [`HandlerExt::layer`].
pub struct Layered<L, H, T, M, S> {
    layer: L,
    handler: H,
    _types: Types<T, M, S>,
}

/// Marks the [`IntoHandler`] implementation of [`Layered`].
#[derive(Debug)]
pub struct WithLayer<M>(PhantomData<M>);

impl<L, H, T, M, S> IntoHandler<T, WithLayer<M>, S> for Layered<L, H, T, M, S>
where
    T: Send + 'static,
    M: 'static,
    S: 'static,
    H: IntoHandler<T, M, S>,
    L: Layer<HandlerService<T>> + Send + 'static,
    L::Service: Service<Request<T>, Response = ()> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request<T>>>::Error: Into<BoxError>,
    <L::Service as Service<Request<T>>>::Future: Send + 'static,
{
    fn into_service(self, state: &S) -> HandlerService<T> {
        HandlerService::layered(self.layer.layer(self.handler.into_service(state)))
    }

    fn name(&self) -> String {
        self.handler.name()
    }
}

/// `.layer(L)` on any handler: `router.on(reserve.layer(ConcurrencyLimitLayer::new(4)))`.
pub trait HandlerExt<T, M, S>: IntoHandler<T, M, S> + Sized {
    /// Wraps this handler's service in `layer`, applied once, when the router registers it.
    fn layer<L>(self, layer: L) -> Layered<L, Self, T, M, S> {
        Layered {
            layer,
            handler: self,
            _types: PhantomData,
        }
    }
}

impl<T, M, S, H: IntoHandler<T, M, S>> HandlerExt<T, M, S> for H {}

impl HandlerError {
    /// The error a layer returned: a boxed `HandlerError` is itself again; anything else (a
    /// timeout, an overload) is retryable.
    pub fn from_boxed(error: BoxError) -> Self {
        match error.downcast::<HandlerError>() {
            Ok(error) => *error,
            Err(other) => HandlerError::Retryable {
                source: other,
                kind: Some("layer".into()),
            },
        }
    }
}

/// Wraps an erased route's call for a router-wide layer, and back.
pub(crate) fn layer_erased<L>(call: PlainFn<ErasedEvent>, layer: &L) -> PlainFn<ErasedEvent>
where
    L: Layer<HandlerService<AnyEvent>>,
    L::Service: Service<Request<AnyEvent>, Response = ()> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request<AnyEvent>>>::Error: Into<BoxError>,
    <L::Service as Service<Request<AnyEvent>>>::Future: Send + 'static,
{
    let inner = HandlerService::plain(Arc::new(move |event: AnyEvent, ctx| call(event.0, ctx)));
    let layered = HandlerService::layered(layer.layer(inner));
    Arc::new(move |event, ctx| layered.call_once(AnyEvent(event), ctx))
}
