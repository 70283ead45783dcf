//! The admin port of the background workers (`outbox-relay`, `retry-worker`): metrics and
//! liveness only. Readiness is a consumer's notion (joined, broker up); a worker that cannot do
//! its job shows in its own metrics (oldest pending or parked age) instead.

use anyhow::Context as _;
use axum::routing::get;
use std::future::IntoFuture as _;
use std::net::SocketAddr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir::Metrics;

/// Serves `/metrics` and `/healthz` on `addr` until `stop` is cancelled; returns the bound
/// address and the server's task.
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on admin_addr {addr}"))?;
    let bound = listener.local_addr()?;
    let routes = axum::Router::new()
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
        .route("/healthz", get(|| std::future::ready("ok")));
    let server = tokio::spawn(
        axum::serve(listener, routes)
            .with_graceful_shutdown(stop.cancelled_owned())
            .into_future(),
    );
    Ok((bound, server))
}
