//! Reserve stock for each placed order: one event type, one handler with state, one layer.
//!
//! The handler is a plain `async fn`; the stock it writes to is the router's state; a tower
//! concurrency limit keeps at most a few reservations in flight against the stock service.
//! `main.rs` runs it on Kafka; `tests/` runs it on Weir's test kit.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tower::limit::ConcurrencyLimitLayer;
use weir::{Ctx, Event, EventType, HandlerError, HandlerExt, Router, State};

/// An order was placed: the event this service consumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// The order's id: the record key, so one order's events stay in order.
    pub order_id: String,
    /// The product ordered.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

impl Event for OrderPlaced {
    const TYPE: EventType = EventType::new("order.placed");
    const TOPIC: &'static str = "orders";

    fn key(&self) -> String {
        self.order_id.clone()
    }
}

/// Units on hand per SKU, and which orders hold a reservation.
///
/// In memory for the example; a real service keeps this in its database.
#[derive(Debug, Clone, Default)]
pub struct Stock {
    inner: Arc<Mutex<StockInner>>,
}

#[derive(Debug, Default)]
struct StockInner {
    on_hand: HashMap<String, u32>,
    reserved: HashMap<String, u32>,
}

impl Stock {
    /// Stock with these units on hand.
    pub fn with(units: &[(&str, u32)]) -> Self {
        let stock = Self::default();
        {
            let mut inner = stock.inner.lock().expect("stock lock");
            for (sku, n) in units {
                inner.on_hand.insert((*sku).to_owned(), *n);
            }
        }
        stock
    }

    /// Units of `sku` still on hand.
    pub fn on_hand(&self, sku: &str) -> u32 {
        let inner = self.inner.lock().expect("stock lock");
        inner.on_hand.get(sku).copied().unwrap_or(0)
    }

    /// Whether `order_id` holds a reservation.
    pub fn is_reserved(&self, order_id: &str) -> bool {
        let inner = self.inner.lock().expect("stock lock");
        inner.reserved.contains_key(order_id)
    }
}

/// Reserves the order's units. A redelivered order is reserved once (idempotent by order id);
/// an unknown SKU is a permanent error (dead-lettered); too little stock is transient (retried:
/// a delivery may be on its way).
pub async fn reserve_stock(
    order: OrderPlaced,
    State(stock): State<Stock>,
    ctx: Ctx,
) -> Result<(), HandlerError> {
    let mut inner = stock.inner.lock().expect("stock lock");
    if inner.reserved.contains_key(&order.order_id) {
        return Ok(());
    }
    let Some(on_hand) = inner.on_hand.get_mut(&order.sku) else {
        return Err(HandlerError::acknowledged(format!(
            "unknown SKU {}",
            order.sku
        )));
    };
    if *on_hand < order.quantity {
        return Err(HandlerError::retryable(format!(
            "{} units of {} wanted, {} on hand (attempt {})",
            order.quantity,
            order.sku,
            on_hand,
            ctx.attempt()
        )));
    }
    *on_hand -= order.quantity;
    inner.reserved.insert(order.order_id, order.quantity);
    Ok(())
}

/// The service's router: what `main` subscribes and what the tests run.
pub fn router(stock: Stock) -> Router<Stock> {
    Router::with_state(stock).on(reserve_stock.layer(ConcurrencyLimitLayer::new(4)))
}
