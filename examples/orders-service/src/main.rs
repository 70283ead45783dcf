//! Runs the orders service on Kafka: `BROKERS=host:9092 cargo run -p orders-service`.
//! Metrics and health on `ADMIN_ADDR` (default 127.0.0.1:9464).

use orders_service::{router, Stock};
use weir::{Bus, ConsumerConfig, KafkaBus, KafkaConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let brokers = std::env::var("BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let admin = std::env::var("ADMIN_ADDR").unwrap_or_else(|_| "127.0.0.1:9464".to_owned());
    let bus = KafkaBus::new(KafkaConfig::new(brokers))?;
    let stock = Stock::with(&[("sku-1", 100), ("sku-2", 10)]);
    let subscription = bus.subscribe(router(stock), ConsumerConfig::new("orders-service"))?;

    let listener = tokio::net::TcpListener::bind(&admin).await?;
    let stop = subscription.shutdown_token();
    let admin = tokio::spawn(weir::serve_admin(
        listener,
        bus.metrics().clone(),
        subscription.health(),
        stop.clone().cancelled_owned(),
    ));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = stop.cancelled() => {}
    }
    let report = subscription.stop().await?;
    admin.await??;
    println!("stopped; committed {:?}", report.committed);
    Ok(())
}
