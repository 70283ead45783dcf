//! The bus semantic suite (`tests/semantics`) on the in-memory bus, plus the memory-only tests
//! that need tokio's paused clock.

mod semantics;

mod reference;

use semantics::Harness;
use std::collections::HashMap;
use std::time::Duration;
use weir::{MemoryBus, MemoryConfig, Metrics, ProcessingOrder, StoredRecord};

/// A fresh in-memory broker per test.
struct MemoryHarness {
    bus: MemoryBus,
}

impl MemoryHarness {
    fn new() -> Self {
        Self {
            bus: MemoryBus::new(MemoryConfig::default()),
        }
    }
}

impl Harness for MemoryHarness {
    type Bus = MemoryBus;

    fn bus(&self) -> MemoryBus {
        self.bus.clone()
    }

    fn metrics(&self) -> Metrics {
        self.bus.metrics().clone()
    }

    async fn create_topic(&self, topic: &str, partitions: i32) {
        self.bus.create_topic(topic, partitions);
    }

    async fn committed(&self, group: &str, topic: &str) -> HashMap<i32, i64> {
        self.bus.committed(group, topic)
    }

    async fn records(&self, topic: &str, at_least: usize) -> Vec<StoredRecord> {
        let deadline = tokio::time::Instant::now() + self.patience();
        loop {
            let records = self.bus.records(topic);
            if records.len() >= at_least || tokio::time::Instant::now() >= deadline {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

// 1. Round trips.

#[tokio::test]
async fn every_seed_event_round_trips_to_its_typed_handler() {
    semantics::every_seed_event_round_trips_to_its_typed_handler(&MemoryHarness::new()).await;
}

#[tokio::test]
async fn binary_mode_events_reach_the_handler_equal_to_structured_mode() {
    semantics::binary_mode_events_reach_the_handler_equal_to_structured_mode(&MemoryHarness::new())
        .await;
}

// 2. Malformed input.

#[tokio::test]
async fn dead_letters_malformed_records_and_keeps_consuming() {
    semantics::dead_letters_malformed_records_and_keeps_consuming(&MemoryHarness::new()).await;
}

#[tokio::test]
async fn skips_unhandled_event_types_by_default() {
    semantics::skips_unhandled_event_types_by_default(&MemoryHarness::new()).await;
}

// 3. Retries.

#[tokio::test(start_paused = true)]
async fn retries_with_exactly_the_policy_backoff_then_succeeds() {
    let policy = semantics::exact_retry(Duration::from_millis(100), 2.0, 5);
    let gaps =
        semantics::retries_retryable_failures_with_backoff(&MemoryHarness::new(), policy).await;
    assert_eq!(
        gaps,
        vec![Duration::from_millis(100), Duration::from_millis(200)]
    );
}

#[tokio::test(start_paused = true)]
async fn retry_delays_are_capped_at_the_maximum_interval() {
    let policy = weir::RetryPolicy {
        maximum_interval: Duration::from_millis(150),
        ..semantics::exact_retry(Duration::from_millis(100), 3.0, 5)
    };
    let gaps =
        semantics::retries_retryable_failures_with_backoff(&MemoryHarness::new(), policy).await;
    assert_eq!(
        gaps,
        vec![Duration::from_millis(100), Duration::from_millis(150)]
    );
}

#[tokio::test]
async fn dead_letters_after_retries_are_exhausted() {
    semantics::dead_letters_after_retries_are_exhausted(&MemoryHarness::new()).await;
}

#[tokio::test]
async fn dead_letters_acknowledged_failures_without_retrying() {
    semantics::dead_letters_acknowledged_failures_without_retrying(&MemoryHarness::new()).await;
}

#[tokio::test]
async fn dead_letters_panics_and_keeps_consuming() {
    semantics::dead_letters_panics_and_keeps_consuming(&MemoryHarness::new()).await;
}

#[tokio::test(start_paused = true)]
async fn stop_during_a_retry_backoff_abandons_the_record_at_once() {
    semantics::stop_during_a_retry_backoff_abandons_the_record_at_once(&MemoryHarness::new()).await;
}

// 4. Fan-out.

#[tokio::test]
async fn fan_out_dead_letters_only_the_failing_handler() {
    semantics::fan_out_dead_letters_only_the_failing_handler(&MemoryHarness::new()).await;
}

// 5. Per-key order under failures.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_per_key_order_under_retries() {
    semantics::keeps_per_key_order_under_retries(&MemoryHarness::new(), 1_000, 8).await;
}

// 6. Stop with an unfinished record.

#[tokio::test]
async fn stop_commits_only_finished_records_and_redelivers_the_rest() {
    semantics::stop_commits_only_finished_records_and_redelivers_the_rest(
        &MemoryHarness::new(),
        ProcessingOrder::Partition,
    )
    .await;
}

#[tokio::test]
async fn stop_never_commits_past_an_unfinished_record_even_when_later_ones_finished() {
    semantics::stop_commits_only_finished_records_and_redelivers_the_rest(
        &MemoryHarness::new(),
        ProcessingOrder::Key,
    )
    .await;
}

// 7. Volume.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_every_event_exactly_once_in_key_order() {
    semantics::handles_every_event_exactly_once_in_key_order(&MemoryHarness::new(), 10_000, 8, 100)
        .await;
}

// 8. Stop drains.

#[tokio::test]
async fn stop_lets_running_handlers_finish_and_commits_them() {
    semantics::stop_lets_running_handlers_finish_and_commits_them(&MemoryHarness::new()).await;
}

#[tokio::test]
async fn a_group_shares_the_partitions_and_moves_them_when_a_member_stops() {
    semantics::a_group_shares_the_partitions_and_moves_them_when_a_member_stops(
        &MemoryHarness::new(),
    )
    .await;
}

#[tokio::test]
async fn dropping_a_subscription_stops_it_and_it_leaves_its_group() {
    use crate::reference::CustomerCreated;
    use semantics::{numbered, publish, record, recv, seq_of, subscribe, Ends, Mode};
    use weir::{Ctx, HandlerOptions, Router};
    let h = MemoryHarness::new();
    let bus = h.bus();
    let topic = h.name("dropped");
    let group = h.name("dropped-group");
    h.create_topic(&topic, 1).await;
    let (tx, mut handled) = tokio::sync::mpsc::unbounded_channel::<(usize, u64)>();
    let member = |id: usize| {
        let tx = tx.clone();
        Router::new().on_with(
            move |event: CustomerCreated, _: Ctx| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((id, seq_of(&event.details)));
                    Ok(())
                }
            },
            HandlerOptions::new().topic(&topic),
        )
    };
    let mut ends = Ends::default();
    let dropped = subscribe(&h, &bus, member(0), &group, |c| c);
    publish(
        &bus,
        record(&topic, &numbered("k", 0), Mode::Structured),
        &mut ends,
    )
    .await;
    assert_eq!(recv(&mut handled, h.patience(), "record 0").await, (0, 0));
    drop(dropped);
    // Had the dropped member kept running, it would keep the group's only partition.
    let next = subscribe(&h, &bus, member(1), &group, |c| c);
    publish(
        &bus,
        record(&topic, &numbered("k", 1), Mode::Structured),
        &mut ends,
    )
    .await;
    assert_eq!(
        recv(&mut handled, h.patience(), "record 1").await,
        (1, 1),
        "record 1 went to the member that joined, and record 0 was not redelivered"
    );
    semantics::wait_committed(&h, &group, &topic, &ends).await;
    semantics::stop(next).await;
}

#[tokio::test]
async fn committed_records_stay_readable_until_a_full_partition_needs_their_room() {
    use weir::{Bus as _, ConsumerConfig, Headers, OutboundRecord, PublishError, Publisher as _};
    let bus = MemoryBus::new(MemoryConfig {
        default_partitions: 1,
        capacity_per_partition: 2,
        publish_timeout: Duration::from_millis(50),
    });
    let topic = "retention";
    bus.create_topic(topic, 1);
    let record = |n: u8| OutboundRecord {
        topic: topic.to_owned(),
        key: None,
        value: Some(vec![n]),
        headers: Headers::new(),
    };
    let values = |bus: &MemoryBus| -> Vec<u8> {
        bus.records(topic)
            .iter()
            .map(|r| r.value.as_deref().unwrap()[0])
            .collect()
    };
    bus.publish_record(record(0)).await.unwrap();
    bus.publish_record(record(1)).await.unwrap();
    let full = bus.publish_record(record(2)).await;
    assert!(
        matches!(full, Err(PublishError::QueueFull { .. })),
        "nothing committed yet, so nothing makes room: {full:?}"
    );
    // A group reads both (they are not CloudEvents: dead-lettered) and commits them.
    let router = weir::Router::new().on_with(
        |_: crate::reference::CustomerCreated, _: weir::Ctx| async { Ok(()) },
        weir::HandlerOptions::new().topic(topic),
    );
    let subscription = bus.subscribe(router, ConsumerConfig::new("g")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bus.records(&format!("{topic}.dlq")).len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "both dead-lettered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    subscription.stop().await.unwrap();
    assert_eq!(bus.committed("g", topic), HashMap::from([(0, 2)]));
    assert_eq!(values(&bus), [0, 1], "committed, and still readable");
    bus.publish_record(record(2)).await.unwrap();
    assert_eq!(
        values(&bus),
        [2],
        "the committed records made room for record 2"
    );
}

// Pausing.

#[tokio::test(start_paused = true)]
async fn a_paused_topic_is_not_handled_while_another_flows_and_resumes_in_order() {
    semantics::a_paused_topic_is_not_handled_while_another_flows_and_resumes_in_order(
        &MemoryHarness::new(),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_topic_pause_covers_partitions_assigned_after_a_rebalance() {
    semantics::a_topic_pause_covers_partitions_assigned_after_a_rebalance(&MemoryHarness::new())
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_pause_holds_fetched_records_and_resume_hands_each_over_once_in_order() {
    semantics::a_pause_holds_fetched_records_and_resume_hands_each_over_once_in_order(
        &MemoryHarness::new(),
        300,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_route_pause_pauses_its_topics_and_unknown_targets_are_refused() {
    semantics::a_route_pause_pauses_its_topics_and_unknown_targets_are_refused(
        &MemoryHarness::new(),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_partition_revoked_while_paused_runs_when_it_comes_back_resumed() {
    semantics::a_partition_revoked_while_paused_runs_when_it_comes_back_resumed(
        &MemoryHarness::new(),
    )
    .await;
}
