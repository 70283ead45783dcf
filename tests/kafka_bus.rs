//! The bus semantic suite (`tests/semantics`) on the Kafka bus, against a real Tansu broker
//! (one per test, so tests share nothing). Same functions as `memory_bus.rs`; only the retry
//! timing differs, since a real broker cannot run on tokio's paused clock.

mod reference;
mod semantics;
mod support;

use semantics::Harness;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use support::broker::Tansu;
use weir::{KafkaBus, KafkaConfig, Metrics, ProcessingOrder, StoredRecord};

struct KafkaHarness {
    broker: Arc<Tansu>,
    bus: KafkaBus,
}

impl KafkaHarness {
    fn new() -> Self {
        let broker = Tansu::start_memory();
        let bus = KafkaBus::new(KafkaConfig::new(broker.brokers())).expect("valid config");
        Self {
            broker: Arc::new(broker),
            bus,
        }
    }
}

impl Harness for KafkaHarness {
    type Bus = KafkaBus;

    fn bus(&self) -> KafkaBus {
        self.bus.clone()
    }

    fn metrics(&self) -> Metrics {
        self.bus.metrics().clone()
    }

    fn patience(&self) -> Duration {
        Duration::from_secs(30)
    }

    fn quiet(&self) -> Duration {
        // Watched after the other topic's later records were handled and committed: by then
        // a fetch of the paused partition would have delivered its records too.
        Duration::from_secs(2)
    }

    async fn create_topic(&self, topic: &str, partitions: i32) {
        let broker = self.broker.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || broker.create_topic(&topic, partitions))
            .await
            .expect("create_topic");
    }

    async fn committed(&self, group: &str, topic: &str) -> HashMap<i32, i64> {
        support::kafka::committed_offsets(&self.broker.brokers(), group, &[topic])
            .await
            .into_iter()
            .map(|((_, partition), offset)| (partition, offset))
            .collect()
    }

    async fn records(&self, topic: &str, at_least: usize) -> Vec<StoredRecord> {
        let quiet = Duration::from_millis(500);
        support::kafka::read_topic(
            &self.broker.brokers(),
            topic,
            at_least,
            quiet,
            self.patience(),
        )
        .await
    }
}

#[tokio::test]
async fn every_seed_event_round_trips_to_its_typed_handler() {
    semantics::every_seed_event_round_trips_to_its_typed_handler(&KafkaHarness::new()).await;
}

#[tokio::test]
async fn binary_mode_events_reach_the_handler_equal_to_structured_mode() {
    semantics::binary_mode_events_reach_the_handler_equal_to_structured_mode(&KafkaHarness::new())
        .await;
}

#[tokio::test]
async fn dead_letters_malformed_records_and_keeps_consuming() {
    semantics::dead_letters_malformed_records_and_keeps_consuming(&KafkaHarness::new()).await;
}

#[tokio::test]
async fn skips_unhandled_event_types_by_default() {
    semantics::skips_unhandled_event_types_by_default(&KafkaHarness::new()).await;
}

#[tokio::test]
async fn retries_retryable_failures_no_sooner_than_the_policy_says() {
    let policy = semantics::exact_retry(Duration::from_millis(50), 2.0, 5);
    let gaps =
        semantics::retries_retryable_failures_with_backoff(&KafkaHarness::new(), policy).await;
    assert_eq!(gaps.len(), 2);
    assert!(gaps[0] >= Duration::from_millis(50), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(100), "{gaps:?}");
}

#[tokio::test]
async fn dead_letters_after_retries_are_exhausted() {
    semantics::dead_letters_after_retries_are_exhausted(&KafkaHarness::new()).await;
}

#[tokio::test]
async fn dead_letters_acknowledged_failures_without_retrying() {
    semantics::dead_letters_acknowledged_failures_without_retrying(&KafkaHarness::new()).await;
}

#[tokio::test]
async fn dead_letters_panics_and_keeps_consuming() {
    semantics::dead_letters_panics_and_keeps_consuming(&KafkaHarness::new()).await;
}

#[tokio::test]
async fn stop_during_a_retry_backoff_abandons_the_record_at_once() {
    semantics::stop_during_a_retry_backoff_abandons_the_record_at_once(&KafkaHarness::new()).await;
}

#[tokio::test]
async fn fan_out_dead_letters_only_the_failing_handler() {
    semantics::fan_out_dead_letters_only_the_failing_handler(&KafkaHarness::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_per_key_order_under_retries() {
    semantics::keeps_per_key_order_under_retries(&KafkaHarness::new(), 200, 8).await;
}

#[tokio::test]
async fn stop_commits_only_finished_records_and_redelivers_the_rest() {
    semantics::stop_commits_only_finished_records_and_redelivers_the_rest(
        &KafkaHarness::new(),
        ProcessingOrder::Partition,
    )
    .await;
}

#[tokio::test]
async fn stop_never_commits_past_an_unfinished_record_even_when_later_ones_finished() {
    semantics::stop_commits_only_finished_records_and_redelivers_the_rest(
        &KafkaHarness::new(),
        ProcessingOrder::Key,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_every_event_exactly_once_in_key_order() {
    semantics::handles_every_event_exactly_once_in_key_order(&KafkaHarness::new(), 2_000, 8, 100)
        .await;
}

#[tokio::test]
async fn stop_lets_running_handlers_finish_and_commits_them() {
    semantics::stop_lets_running_handlers_finish_and_commits_them(&KafkaHarness::new()).await;
}

#[tokio::test]
async fn a_group_shares_the_partitions_and_moves_them_when_a_member_stops() {
    semantics::a_group_shares_the_partitions_and_moves_them_when_a_member_stops(
        &KafkaHarness::new(),
    )
    .await;
}

#[tokio::test]
async fn a_paused_topic_is_not_handled_while_another_flows_and_resumes_in_order() {
    semantics::a_paused_topic_is_not_handled_while_another_flows_and_resumes_in_order(
        &KafkaHarness::new(),
    )
    .await;
}

#[tokio::test]
async fn a_pause_holds_fetched_records_and_resume_hands_each_over_once_in_order() {
    // More than the hand-off holds (2 batches of 128), so some are in librdkafka's prefetch.
    semantics::a_pause_holds_fetched_records_and_resume_hands_each_over_once_in_order(
        &KafkaHarness::new(),
        600,
    )
    .await;
}

#[tokio::test]
async fn a_topic_pause_covers_partitions_assigned_after_a_rebalance() {
    semantics::a_topic_pause_covers_partitions_assigned_after_a_rebalance(&KafkaHarness::new())
        .await;
}

#[tokio::test]
async fn a_partition_revoked_while_paused_runs_when_it_comes_back_resumed() {
    semantics::a_partition_revoked_while_paused_runs_when_it_comes_back_resumed(
        &KafkaHarness::new(),
    )
    .await;
}
