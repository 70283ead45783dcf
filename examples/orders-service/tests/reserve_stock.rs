//! The service's handler, tested in process with Weir's test kit: no broker, no sleeps.

use orders_service::{router, OrderPlaced, Stock};
use weir::testing::TestApp;

fn order(id: &str, sku: &str, quantity: u32) -> OrderPlaced {
    OrderPlaced {
        order_id: id.to_owned(),
        sku: sku.to_owned(),
        quantity,
    }
}

#[tokio::test(start_paused = true)]
async fn a_placed_order_reserves_its_units() {
    let stock = Stock::with(&[("sku-1", 5)]);
    let mut app = TestApp::new(router(stock.clone()));

    app.publish(order("o-1", "sku-1", 2)).await;
    let outcome = app.next_outcome().await;

    assert!(outcome.is_success(), "{outcome:?}");
    assert_eq!(stock.on_hand("sku-1"), 3);
    assert!(stock.is_reserved("o-1"));
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unknown_sku_is_dead_lettered_without_retries() {
    let mut app = TestApp::new(router(Stock::default()));

    app.publish(order("o-1", "no-such-sku", 1)).await;
    let outcome = app.next_outcome().await;

    assert!(outcome.is_dead_lettered_with("acknowledged"), "{outcome:?}");
    assert_eq!(outcome.attempts(), 1);
    assert_eq!(app.dead_letters("orders").len(), 1);
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn too_little_stock_is_retried_with_backoff_then_dead_lettered() {
    let stock = Stock::with(&[("sku-1", 1)]);
    let mut app = TestApp::new(router(stock.clone()));

    app.publish(order("o-1", "sku-1", 3)).await;
    let outcome = app.next_outcome().await;

    assert!(
        outcome.is_dead_lettered_with("retries_exhausted"),
        "{outcome:?}"
    );
    assert_eq!(outcome.attempts(), 5, "the default policy's five attempts");
    assert_eq!(outcome.delays().len(), 4);
    assert!(
        outcome.delays().windows(2).all(|w| w[1] > w[0]),
        "backoff grows: {:?}",
        outcome.delays()
    );
    assert_eq!(stock.on_hand("sku-1"), 1, "nothing reserved");
    app.stop().await;
}
