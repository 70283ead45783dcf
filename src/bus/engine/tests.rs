//! The engine against a scripted source: records, rebalances and commit answers exactly when a
//! test says, on Tokio's paused clock unless a test needs real threads.

use super::*;
use crate::bus::{Delivery, OutboundRecord, PublishError};
use crate::contracts::{Envelope, Event, EventType, Headers, CLOUDEVENTS_CONTENT_TYPE};
use crate::handlers::{Ctx, HandlerError, HandlerOptions, RetryPolicy, Router};
use crate::telemetry::Metrics;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Job {
    id: u32,
    slow: bool,
}

impl Event for Job {
    const TYPE: EventType = EventType::new("test.job");
    const TOPIC: &'static str = "jobs";
    fn key(&self) -> String {
        self.id.to_string()
    }
}

fn job(partition: i32, offset: i64, slow: bool) -> Inbound {
    let envelope = Envelope::new(Job {
        id: offset as u32,
        slow,
    });
    Inbound {
        topic: Arc::from("jobs"),
        partition,
        offset,
        key: Some(envelope.key().into_bytes().into()),
        value: Some(envelope.to_structured().expect("serializes").into()),
        headers: Headers::new().with("content-type", CLOUDEVENTS_CONTENT_TYPE),
        timestamp_ms: None,
    }
}

fn tp(partition: i32) -> Tp {
    ("jobs".to_owned(), partition)
}

/// What the test sees of the source.
#[derive(Default)]
struct Seen {
    committed: HashMap<Tp, i64>,
    /// Every position the engine handed over, in order.
    stored: Vec<(Tp, i64)>,
    /// Answers the broker gives the next commits; `Ok` once they run out.
    answers: VecDeque<Result<(), BusError>>,
}

/// A source the test drives: records go into per-partition queues (taken under the engine's
/// flow rule, like the real sources), control events are passed through in order.
struct Scripted {
    feed: mpsc::UnboundedReceiver<SourceEvent>,
    queues: BTreeMap<i32, VecDeque<Inbound>>,
    closed: HashSet<PartitionKey>,
    stored: HashMap<Tp, i64>,
    seen: Arc<Mutex<Seen>>,
}

impl Scripted {
    /// Sorts what the test sent into the queues; returns the first control event.
    fn sort(&mut self) -> Result<Option<SourceEvent>, ()> {
        loop {
            match self.feed.try_recv() {
                Ok(SourceEvent::Record(rec)) => {
                    self.queues.entry(rec.partition).or_default().push_back(rec)
                }
                Ok(control) => return Ok(Some(self.control(control))),
                Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(()),
            }
        }
    }

    fn control(&mut self, event: SourceEvent) -> SourceEvent {
        if let SourceEvent::Revoked { partitions, .. } = &event {
            for (_, p) in partitions {
                self.queues.remove(p);
            }
        }
        event
    }

    fn take(&mut self, pool_open: bool) -> Option<Inbound> {
        for (p, queue) in self.queues.iter_mut() {
            if !pool_open && self.closed.contains(&(Arc::from("jobs"), *p)) {
                continue;
            }
            if let Some(rec) = queue.pop_front() {
                return Some(rec);
            }
        }
        None
    }
}

impl Source for Scripted {
    async fn next(&mut self, pool_open: bool) -> Option<SourceEvent> {
        loop {
            match self.sort() {
                Ok(Some(control)) => return Some(control),
                Ok(None) => {}
                Err(()) => return None,
            }
            if let Some(rec) = self.take(pool_open) {
                return Some(SourceEvent::Record(rec));
            }
            match self.feed.recv().await {
                Some(SourceEvent::Record(rec)) => {
                    self.queues.entry(rec.partition).or_default().push_back(rec)
                }
                Some(control) => return Some(self.control(control)),
                None => return None,
            }
        }
    }

    fn try_record(&mut self, pool_open: bool) -> Option<Inbound> {
        self.take(pool_open)
    }

    fn set_open(&mut self, tp: &PartitionKey, open: bool) {
        if open {
            self.closed.remove(tp);
        } else {
            self.closed.insert(tp.clone());
        }
    }

    fn set_paused(&mut self, _tp: &PartitionKey, _paused: bool) {}

    fn store(&mut self, tp: &Tp, next_offset: i64) {
        self.stored.insert(tp.clone(), next_offset);
        self.seen
            .lock()
            .unwrap()
            .stored
            .push((tp.clone(), next_offset));
    }

    async fn commit(&mut self, _sync: bool) -> Option<Result<(), BusError>> {
        let mut seen = self.seen.lock().unwrap();
        let answer = seen.answers.pop_front().unwrap_or(Ok(()));
        if answer.is_ok() {
            seen.committed.extend(self.stored.drain());
        }
        Some(answer)
    }

    fn confirmed(&self) -> Vec<(String, i32, i64)> {
        let seen = self.seen.lock().unwrap();
        seen.committed
            .iter()
            .map(|((t, p), o)| (t.clone(), *p, *o))
            .collect()
    }
}

/// A dead-letter publisher that panics on its first `panics` calls, then keeps what it gets.
#[derive(Default)]
struct DeadLetters {
    panics: AtomicUsize,
    records: Mutex<Vec<OutboundRecord>>,
    published: Notify,
}

impl Publisher for DeadLetters {
    fn publish_record(&self, record: OutboundRecord) -> super::super::publish::PublishFuture<'_> {
        if self
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("the dead-letter publisher broke");
        }
        Box::pin(async move {
            let delivery = Delivery {
                topic: record.topic.clone(),
                partition: 0,
                offset: 0,
            };
            self.records.lock().unwrap().push(record);
            self.published.notify_one();
            Ok::<_, PublishError>(delivery)
        })
    }
}

struct Harness {
    feed: mpsc::UnboundedSender<SourceEvent>,
    seen: Arc<Mutex<Seen>>,
    metrics: Metrics,
    stop: CancellationToken,
    run: tokio::task::JoinHandle<StopReport>,
}

fn start(router: Router, config: ConsumerConfig, dead_letters: Arc<DeadLetters>) -> Harness {
    let (feed, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let source = Scripted {
        feed: rx,
        queues: BTreeMap::new(),
        closed: HashSet::new(),
        stored: HashMap::new(),
        seen: seen.clone(),
    };
    let metrics = Metrics::new();
    let dispatcher = Arc::new(Dispatcher::new(router, metrics.clone(), "group"));
    let stop = CancellationToken::new();
    let engine = Engine::new(
        source,
        dispatcher,
        dead_letters,
        config,
        stop.clone(),
        Health::default(),
    );
    let run = tokio::spawn(async move { engine.run().await.0 });
    Harness {
        feed,
        seen,
        metrics,
        stop,
        run,
    }
}

fn config() -> ConsumerConfig {
    ConsumerConfig {
        commit_interval: Duration::from_millis(50),
        revoke_timeout: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(1),
        ..ConsumerConfig::new("group")
    }
}

fn quick_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial_interval: Duration::from_millis(1),
        backoff_coefficient: 1.0,
        maximum_interval: Duration::from_millis(1),
        maximum_attempts: attempts,
        jitter: 0.0,
        ..RetryPolicy::default()
    }
}

impl Harness {
    fn send(&self, event: SourceEvent) {
        self.feed.send(event).expect("the engine is running");
    }

    async fn revoke(&self, partition: i32) {
        let (done, answered) = oneshot::channel();
        self.send(SourceEvent::Revoked {
            partitions: vec![tp(partition)],
            done,
        });
        answered.await.expect("the engine answers a revoke");
    }

    /// The latest position the engine handed the source for `partition`, with its partition
    /// (positions are stored per partition in no set order).
    fn last_stored(&self, partition: i32) -> Option<(Tp, i64)> {
        self.seen
            .lock()
            .unwrap()
            .stored
            .iter()
            .rev()
            .find(|(t, _)| *t == tp(partition))
            .cloned()
    }

    async fn stop(self) -> (StopReport, Arc<Mutex<Seen>>) {
        self.stop.cancel();
        (self.run.await.expect("the engine ends"), self.seen)
    }
}

/// Set when dropped: tells whether a handler's future is gone.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_revoked_partitions_running_handler_is_cancelled_before_the_partition_is_released() {
    let started = Arc::new(Notify::new());
    let dropped = Arc::new(AtomicBool::new(false));
    let router = {
        let (started, dropped) = (started.clone(), dropped.clone());
        Router::new().on(move |_: Job, _: Ctx| {
            let flag = DropFlag(dropped.clone());
            let started = started.clone();
            async move {
                let _flag = flag;
                started.notify_one();
                // Stuck: only an abort ends it.
                std::future::pending::<()>().await;
                Ok(())
            }
        })
    };
    let h = start(router, config(), Arc::default());
    h.send(SourceEvent::Assigned(vec![tp(0)]));
    h.send(SourceEvent::Record(job(0, 0, false)));
    started.notified().await;
    h.revoke(0).await;
    // The partition is released now: its handler must be gone, so the new owner's
    // redelivery of the record cannot overlap it.
    assert!(
        dropped.load(Ordering::SeqCst),
        "the revoked partition's handler was still running when the revoke was answered"
    );
    let (report, seen) = h.stop().await;
    assert!(
        !seen.lock().unwrap().committed.contains_key(&tp(0)),
        "an aborted record must not be committed"
    );
    assert_eq!(
        report.abandoned, 0,
        "a revoked record is the new owner's, not abandoned"
    );
}

#[tokio::test(start_paused = true)]
async fn a_revoke_ends_the_partitions_retry_backoffs_at_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Notify::new());
    let router = {
        let (calls, failed) = (calls.clone(), failed.clone());
        Router::new()
            .retry(RetryPolicy {
                initial_interval: Duration::from_secs(3600),
                maximum_interval: Duration::from_secs(3600),
                ..quick_retries(10)
            })
            .on(move |_: Job, _: Ctx| {
                calls.fetch_add(1, Ordering::SeqCst);
                failed.notify_one();
                async { Err(HandlerError::retryable("try later")) }
            })
    };
    let h = start(router, config(), Arc::default());
    h.send(SourceEvent::Record(job(0, 0, false)));
    failed.notified().await;
    let before = Instant::now();
    h.revoke(0).await;
    assert!(
        before.elapsed() < Duration::from_secs(1),
        "the revoke waited for an hour-long backoff ({:?})",
        before.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no retry after the revoke");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_cpu_bound_call_is_never_overlapped_by_its_retry() {
    let log = Arc::new(Mutex::new(Vec::<(&'static str, u32)>::new()));
    let done = Arc::new(Notify::new());
    let router = {
        let (log, done) = (log.clone(), done.clone());
        Router::new().retry(quick_retries(3)).on_with(
            move |_: Job, ctx: Ctx| {
                let (log, done) = (log.clone(), done.clone());
                async move {
                    log.lock().unwrap().push(("enter", ctx.attempt()));
                    if ctx.attempt() == 1 {
                        // Computes far past its timeout; nothing can interrupt it.
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    log.lock().unwrap().push(("exit", ctx.attempt()));
                    if ctx.attempt() > 1 {
                        done.notify_one();
                    }
                    Ok(())
                }
            },
            HandlerOptions::new()
                .cpu_bound()
                .timeout(Duration::from_millis(20)),
        )
    };
    let h = start(router, config(), Arc::default());
    h.send(SourceEvent::Record(job(0, 0, false)));
    tokio::time::timeout(Duration::from_secs(10), done.notified())
        .await
        .expect("the retry ran");
    let log = log.lock().unwrap().clone();
    // On a loaded machine the first call may time out before a blocking thread starts it; it
    // then never runs. Either way each call ends before the next one starts.
    let expected: &[(&str, u32)] = if log[0].1 == 1 {
        &[("enter", 1), ("exit", 1), ("enter", 2), ("exit", 2)]
    } else {
        &[("enter", 2), ("exit", 2)]
    };
    assert_eq!(
        log, expected,
        "the retry started while the timed-out call was still running"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_dead_letter_path_still_completes_the_record_and_the_partition_commits_past_it(
) {
    let router = Router::new().on(|job: Job, _: Ctx| async move {
        if job.id == 0 {
            Err(HandlerError::acknowledged("bad job"))
        } else {
            Ok(())
        }
    });
    let dead_letters = Arc::new(DeadLetters {
        panics: AtomicUsize::new(1),
        ..DeadLetters::default()
    });
    let h = start(router, config(), dead_letters.clone());
    h.send(SourceEvent::Record(job(0, 0, false)));
    h.send(SourceEvent::Record(job(0, 1, false)));
    dead_letters.published.notified().await;
    let (report, seen) = h.stop().await;
    let records = dead_letters.records.lock().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0]
            .headers
            .get(crate::bus::dead_letter::header::ERROR_KIND),
        Some(&b"panic"[..]),
        "dead-lettered with kind panic"
    );
    assert_eq!(seen.lock().unwrap().committed.get(&tp(0)), Some(&2));
    assert_eq!(report.abandoned, 0);
}

#[tokio::test(start_paused = true)]
async fn a_refused_commit_is_counted_as_a_failure() {
    let handled = Arc::new(Notify::new());
    let router = {
        let handled = handled.clone();
        Router::new().on(move |_: Job, _: Ctx| {
            handled.notify_one();
            async { Ok(()) }
        })
    };
    let h = start(router, config(), Arc::default());
    h.seen
        .lock()
        .unwrap()
        .answers
        .push_back(Err(BusError::Transport(
            "commit refused: rebalance in progress".into(),
        )));
    h.send(SourceEvent::Record(job(0, 0, false)));
    handled.notified().await;
    let failures = h.metrics.commits.with_label_values(&["failure"]);
    let successes = h.metrics.commits.with_label_values(&["success"]);
    while successes.get() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(failures.get(), 1, "the refused commit");
    let (_, seen) = h.stop().await;
    assert_eq!(
        seen.lock().unwrap().committed.get(&tp(0)),
        Some(&1),
        "the next commit carries the refused offsets"
    );
}

#[tokio::test(start_paused = true)]
async fn the_stop_report_tells_only_what_the_broker_confirmed() {
    let handled = Arc::new(Notify::new());
    let router = {
        let handled = handled.clone();
        Router::new().on(move |_: Job, _: Ctx| {
            handled.notify_one();
            async { Ok(()) }
        })
    };
    let h = start(router, config(), Arc::default());
    h.seen.lock().unwrap().answers.extend(
        std::iter::repeat_with(|| Err(BusError::Transport("coordinator unavailable".into())))
            .take(1_000),
    );
    h.send(SourceEvent::Record(job(0, 0, false)));
    handled.notified().await;
    let failures = h.metrics.commits.with_label_values(&["failure"]);
    let (report, seen) = h.stop().await;
    assert!(failures.get() >= 1, "the final commit was refused");
    assert!(seen.lock().unwrap().committed.is_empty());
    assert_eq!(
        report.committed,
        Vec::<(String, i32, i64)>::new(),
        "nothing was confirmed, though the record is done"
    );
}

#[tokio::test(start_paused = true)]
async fn with_a_slow_partition_the_fast_ones_records_finish_without_waiting_for_the_slow_ones() {
    let slow_done = Arc::new(AtomicUsize::new(0));
    let fast_done = Arc::new(AtomicUsize::new(0));
    let all_fast = Arc::new(Notify::new());
    const FAST: usize = 100;
    let router = {
        let (slow_done, fast_done, all_fast) =
            (slow_done.clone(), fast_done.clone(), all_fast.clone());
        Router::new().on(move |job: Job, _: Ctx| {
            let (slow_done, fast_done, all_fast) =
                (slow_done.clone(), fast_done.clone(), all_fast.clone());
            async move {
                if job.slow {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    slow_done.fetch_add(1, Ordering::SeqCst);
                } else if fast_done.fetch_add(1, Ordering::SeqCst) + 1 == FAST {
                    all_fast.notify_one();
                }
                Ok(())
            }
        })
    };
    let config = ConsumerConfig {
        order: ProcessingOrder::Partition,
        max_in_flight: 64,
        ..config()
    };
    let h = start(router, config, Arc::default());
    h.send(SourceEvent::Assigned(vec![tp(0), tp(1)]));
    // The slow partition's whole backlog is there first, as a fetched batch would be.
    for offset in 0..1_000 {
        h.send(SourceEvent::Record(job(0, offset, true)));
    }
    for offset in 0..FAST as i64 {
        h.send(SourceEvent::Record(job(1, offset, false)));
    }
    let started = Instant::now();
    all_fast.notified().await;
    let slow = slow_done.load(Ordering::SeqCst);
    assert!(
        slow < 10,
        "the fast partition waited for {slow} slow records ({:?})",
        started.elapsed()
    );
    h.stop().await;
}

/// A router whose handler waits for the gate on the records `held` picks (by partition and
/// offset), then reports each record it handled.
fn gated(
    held: impl Fn(i32, i64) -> bool + Clone + Send + Sync + 'static,
) -> (Router, Arc<Notify>, mpsc::UnboundedReceiver<(i32, i64)>) {
    let gate = Arc::new(Notify::new());
    let (tx, handled) = mpsc::unbounded_channel::<(i32, i64)>();
    let router = {
        let gate = gate.clone();
        Router::new().on(move |_: Job, ctx: Ctx| {
            let (gate, tx, held) = (gate.clone(), tx.clone(), held.clone());
            async move {
                if held(ctx.partition(), ctx.offset()) {
                    gate.notified().await;
                }
                let _ = tx.send((ctx.partition(), ctx.offset()));
                Ok(())
            }
        })
    };
    (router, gate, handled)
}

#[tokio::test(start_paused = true)]
async fn a_rebalance_mid_flight_hands_the_revoked_partitions_waiting_records_to_the_next_owner() {
    let (router, gate, mut handled) = gated(|partition, offset| (partition, offset) == (0, 0));
    let config = ConsumerConfig {
        order: ProcessingOrder::Partition,
        ..config()
    };
    let h = Arc::new(start(router, config, Arc::default()));
    h.send(SourceEvent::Assigned(vec![tp(0), tp(1)]));
    for offset in 0..5 {
        h.send(SourceEvent::Record(job(0, offset, false)));
    }
    for offset in 0..3 {
        h.send(SourceEvent::Record(job(1, offset, false)));
    }
    // Partition 1 flows while partition 0's first record is stuck.
    for offset in 0..3 {
        assert_eq!(handled.recv().await, Some((1, offset)));
    }
    let revoking = tokio::spawn({
        let h = h.clone();
        async move { h.revoke(0).await }
    });
    tokio::task::yield_now().await;
    gate.notify_one();
    revoking.await.expect("the revoke is answered");
    assert_eq!(
        handled.recv().await,
        Some((0, 0)),
        "the running record finished"
    );
    assert!(
        handled.try_recv().is_err(),
        "records of partition 0 that had not started ran after its revoke"
    );
    let stored_for_0 = h.last_stored(0);
    assert_eq!(
        stored_for_0,
        Some((tp(0), 1)),
        "partition 0's position was with the source when the revoke was answered"
    );
    // The partition comes back (to this member, as the next owner): from its committed offset.
    h.send(SourceEvent::Assigned(vec![tp(0)]));
    for offset in 1..5 {
        h.send(SourceEvent::Record(job(0, offset, false)));
    }
    for offset in 1..5 {
        assert_eq!(handled.recv().await, Some((0, offset)));
    }
    let h = Arc::into_inner(h).expect("the revoke task is done");
    let (report, seen) = h.stop().await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.committed.get(&tp(0)), Some(&5));
    assert_eq!(seen.committed.get(&tp(1)), Some(&3));
    assert_eq!(report.abandoned, 0);
}

#[tokio::test(start_paused = true)]
async fn records_done_in_their_first_call_are_in_the_metrics_before_their_offsets_are_committed() {
    let router = Router::new().on(|_: Job, _: Ctx| async { Ok(()) });
    let h = start(router, config(), Arc::default());
    // Each record names its topic in an `Arc` of its own, as a source that re-created the
    // name would: they must still count in the one series of their topic.
    for offset in 0..3 {
        h.send(SourceEvent::Record(job(0, offset, false)));
    }
    while h.seen.lock().unwrap().committed.get(&tp(0)) != Some(&3) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received = h.metrics.received.with_label_values(&["jobs"]).get();
    let handled = h.metrics.handled_count("jobs", "test.job", "success");
    let timed = h
        .metrics
        .handler_duration
        .with_label_values(&["jobs", "test.job"])
        .get_sample_count();
    assert_eq!((received, handled, timed), (3, 3, 3));
    h.stop().await;
}

/// Panics when dropped: a handler future whose cleanup breaks when it is cancelled.
struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("cleanup failed while the handler was cancelled");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_escaping_an_aborted_record_task_still_ends_the_record_and_frees_its_partition() {
    let started = Arc::new(Notify::new());
    let (tx, mut handled) = mpsc::unbounded_channel::<i64>();
    let stuck_once = Arc::new(AtomicBool::new(true));
    let router = {
        let started = started.clone();
        Router::new().on(move |_: Job, ctx: Ctx| {
            let (started, tx) = (started.clone(), tx.clone());
            let stuck = stuck_once.swap(false, Ordering::SeqCst);
            async move {
                if stuck {
                    let _guard = PanicsOnDrop;
                    started.notify_one();
                    // Stuck: only an abort ends it, and its drop panics.
                    std::future::pending::<()>().await;
                }
                let _ = tx.send(ctx.offset());
                Ok(())
            }
        })
    };
    let config = ConsumerConfig {
        order: ProcessingOrder::Partition,
        ..config()
    };
    let h = start(router, config, Arc::default());
    h.send(SourceEvent::Assigned(vec![tp(0)]));
    h.send(SourceEvent::Record(job(0, 0, false)));
    started.notified().await;
    // The revoke reaches its deadline, aborts the stuck record, and must still be answered.
    h.revoke(0).await;
    assert!(
        !h.seen.lock().unwrap().committed.contains_key(&tp(0)),
        "the aborted record must not be committed"
    );
    // The partition comes back: its lane and slot are free, so the record runs again.
    h.send(SourceEvent::Assigned(vec![tp(0)]));
    for offset in 0..3 {
        h.send(SourceEvent::Record(job(0, offset, false)));
    }
    for offset in 0..3 {
        assert_eq!(handled.recv().await, Some(offset));
    }
    let (report, seen) = h.stop().await;
    assert_eq!(seen.lock().unwrap().committed.get(&tp(0)), Some(&3));
    assert_eq!(report.abandoned, 0);
}

#[cfg(feature = "testing")]
#[tokio::test(start_paused = true)]
async fn a_panic_after_the_handler_returned_counts_as_the_attempt_that_ran() {
    /// Panics on every call it is told of: a panic after the handler has returned.
    struct PanickingObserver;
    impl crate::handlers::Observe for PanickingObserver {
        fn call(&self, _: &Inbound, _: &str, _: u32, _: Instant) {
            panic!("the observer broke");
        }
        fn outcome(&self, _: &Inbound, _: &crate::handlers::Outcome) {}
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let mut router = {
        let calls = calls.clone();
        Router::new().on(move |_: Job, _: Ctx| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
    };
    router.observer = Some(Arc::new(PanickingObserver));
    let dead_letters = Arc::new(DeadLetters::default());
    let h = start(router, config(), dead_letters.clone());
    h.send(SourceEvent::Record(job(0, 0, false)));
    while h.seen.lock().unwrap().committed.get(&tp(0)) != Some(&1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (report, _) = h.stop().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the handler ran again for attempt 1 after a panic that followed its return"
    );
    let records = dead_letters.records.lock().unwrap();
    assert_eq!(records.len(), 1, "the record ends dead-lettered, once");
    assert_eq!(
        records[0]
            .headers
            .get(crate::bus::dead_letter::header::ERROR_KIND),
        Some(&b"panic"[..])
    );
    assert_eq!(report.abandoned, 0);
}

/// A `cpu_bound` handler that blocks its thread until the test lets it go, and says when it
/// entered and when it returned.
struct Blocker {
    entered: Arc<Notify>,
    release: Arc<(Mutex<bool>, std::sync::Condvar)>,
    returned: Arc<AtomicBool>,
}

impl Blocker {
    fn new() -> Self {
        Self {
            entered: Arc::default(),
            release: Arc::default(),
            returned: Arc::default(),
        }
    }

    fn router(&self) -> Router {
        let (entered, release, returned) = (
            self.entered.clone(),
            self.release.clone(),
            self.returned.clone(),
        );
        Router::new().on_with(
            move |_: Job, _: Ctx| {
                let (entered, release, returned) =
                    (entered.clone(), release.clone(), returned.clone());
                async move {
                    entered.notify_one();
                    let (lock, wake) = &*release;
                    let mut go = lock.lock().unwrap();
                    while !*go {
                        go = wake.wait(go).unwrap();
                    }
                    returned.store(true, Ordering::SeqCst);
                    Ok(())
                }
            },
            HandlerOptions::new().cpu_bound(),
        )
    }

    fn release(&self) {
        let (lock, wake) = &*self.release;
        *lock.lock().unwrap() = true;
        wake.notify_all();
    }
}

/// A failing test still lets the call go, or the runtime would wait for its thread forever.
impl Drop for Blocker {
    fn drop(&mut self) {
        self.release();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_waits_for_its_partitions_cpu_bound_call_to_return() {
    let blocker = Blocker::new();
    let h = Arc::new(start(blocker.router(), config(), Arc::default()));
    h.send(SourceEvent::Assigned(vec![tp(0)]));
    h.send(SourceEvent::Record(job(0, 0, false)));
    blocker.entered.notified().await;
    let revoking = tokio::spawn({
        let h = h.clone();
        async move { h.revoke(0).await }
    });
    // Past the revoke's deadline (1 s), the call still runs on its blocking thread: the
    // partition must not be given up yet.
    let mut revoking = std::pin::pin!(revoking);
    assert!(
        tokio::time::timeout(Duration::from_millis(1_500), &mut revoking)
            .await
            .is_err(),
        "the revoke was answered while its partition's cpu_bound call was still running"
    );
    blocker.release();
    revoking.await.expect("the revoke is answered");
    assert!(blocker.returned.load(Ordering::SeqCst));
    let h = Arc::into_inner(h).expect("the revoke task is done");
    let (report, _) = h.stop().await;
    assert_eq!(report.orphaned, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_bound_call_that_outlives_its_revoke_is_reported_as_an_orphan() {
    let blocker = Blocker::new();
    let config = ConsumerConfig {
        revoke_timeout: Duration::from_millis(100),
        ..config()
    };
    let h = start(blocker.router(), config, Arc::default());
    h.send(SourceEvent::Assigned(vec![tp(0)]));
    h.send(SourceEvent::Record(job(0, 0, false)));
    blocker.entered.notified().await;
    h.revoke(0).await;
    assert!(
        !blocker.returned.load(Ordering::SeqCst),
        "the call is still blocked"
    );
    let orphaned = h.metrics.orphaned_calls.with_label_values(&["jobs"]).get();
    let (report, _) = h.stop().await;
    blocker.release();
    assert_eq!(orphaned, 1, "the orphan is counted");
    assert_eq!(report.orphaned, 1, "the orphan is in the stop report");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_a_cpu_bound_call_to_return_before_committing() {
    let blocker = Blocker::new();
    let h = start(blocker.router(), config(), Arc::default());
    h.send(SourceEvent::Assigned(vec![tp(0)]));
    h.send(SourceEvent::Record(job(0, 0, false)));
    blocker.entered.notified().await;
    let returned = blocker.returned.clone();
    let stopping = tokio::spawn(h.stop());
    let mut stopping = std::pin::pin!(stopping);
    // Past the drain timeout (1 s) the call still runs: the drain must not end yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(1_500), &mut stopping)
            .await
            .is_err(),
        "the drain ended while a cpu_bound call was still running"
    );
    blocker.release();
    let (report, _) = stopping.await.expect("the drain ends");
    assert!(returned.load(Ordering::SeqCst));
    assert_eq!(report.orphaned, 0);
}

/// An event of a second route, on a topic of its own.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Blocking {
    id: u32,
}

impl Event for Blocking {
    const TYPE: EventType = EventType::new("test.blocking");
    const TOPIC: &'static str = "blocking";
    fn key(&self) -> String {
        self.id.to_string()
    }
}

/// Fast records of partitions 0..4 of `jobs` handled per second of a `window`, with (or
/// without) a backlog of records on another route whose handler blocks its thread 200 ms in
/// its poll.
async fn fast_rate_beside(blocking_route: bool, window: Duration) -> (f64, u64) {
    let fast = Arc::new(AtomicUsize::new(0));
    let blocked = Arc::new(Notify::new());
    let router = {
        let (fast, blocked) = (fast.clone(), blocked.clone());
        Router::new()
            .on(move |_: Job, _: Ctx| {
                let fast = fast.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    fast.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .on_with(
                move |_: Blocking, _: Ctx| {
                    let blocked = blocked.clone();
                    async move {
                        // Synchronous I/O in an async fn.
                        std::thread::sleep(Duration::from_millis(200));
                        blocked.notify_one();
                        Ok(())
                    }
                },
                HandlerOptions::new().name("blocker"),
            )
    };
    let config = ConsumerConfig {
        order: ProcessingOrder::Partition,
        ..config()
    };
    let h = start(router, config, Arc::default());
    let partitions = 0..4;
    for offset in 0..2_000 {
        for partition in partitions.clone() {
            h.send(SourceEvent::Record(job(partition, offset, false)));
        }
    }
    if blocking_route {
        for offset in 0..40 {
            let envelope = Envelope::new(Blocking { id: offset as u32 });
            h.send(SourceEvent::Record(Inbound {
                topic: Arc::from("blocking"),
                partition: 9,
                offset,
                key: Some(envelope.key().into_bytes().into()),
                value: Some(envelope.to_structured().expect("serializes").into()),
                headers: Headers::new().with("content-type", CLOUDEVENTS_CONTENT_TYPE),
                timestamp_ms: None,
            }));
        }
        // The first blocking poll is where the engine learns of it.
        blocked.notified().await;
    } else {
        while fast.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    }
    let (before, started) = (fast.load(Ordering::SeqCst), std::time::Instant::now());
    tokio::time::sleep(window).await;
    let handled = fast.load(Ordering::SeqCst) - before;
    let rate = handled as f64 / started.elapsed().as_secs_f64();
    let warned = h
        .metrics
        .blocking_polls
        .with_label_values(&["blocking", "test.blocking", "blocker"])
        .get();
    h.stop.cancel();
    (rate, warned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_blocks_its_thread_does_not_stall_the_other_partitions() {
    let window = Duration::from_secs(2);
    let (alone, _) = fast_rate_beside(false, window).await;
    let (beside, warned) = fast_rate_beside(true, window).await;
    assert!(
        beside >= 0.8 * alone,
        "the other partitions fell to {beside:.0} records/s beside a blocking route, from {alone:.0} alone"
    );
    assert!(warned >= 1, "the blocking route was not reported");
}

#[tokio::test(start_paused = true)]
async fn while_a_revoked_partition_drains_the_partitions_that_stay_keep_handling_and_committing() {
    // The moved partition's records are slow: they hold the revoke.
    let (router, gate, mut handled) = gated(|partition, _| partition == 0);
    let config = ConsumerConfig {
        revoke_timeout: Duration::from_secs(20),
        ..config()
    };
    let h = Arc::new(start(router, config, Arc::default()));
    h.send(SourceEvent::Assigned(vec![tp(0), tp(1)]));
    h.send(SourceEvent::Record(job(0, 0, false)));
    h.send(SourceEvent::Record(job(1, 0, false)));
    assert_eq!(handled.recv().await, Some((1, 0)));
    let answered = Arc::new(AtomicBool::new(false));
    let revoking = tokio::spawn({
        let (h, answered) = (h.clone(), answered.clone());
        async move {
            h.revoke(0).await;
            answered.store(true, Ordering::SeqCst);
        }
    });
    tokio::task::yield_now().await;
    // Partition 1 stays: its new records run and commit while partition 0 drains.
    for offset in 1..4 {
        h.send(SourceEvent::Record(job(1, offset, false)));
    }
    for offset in 1..4 {
        assert_eq!(handled.recv().await, Some((1, offset)));
    }
    let committed_1 = || h.seen.lock().unwrap().committed.get(&tp(1)).copied();
    while committed_1() != Some(4) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !answered.load(Ordering::SeqCst),
        "the revoke was answered before its slow record finished"
    );
    gate.notify_one();
    revoking.await.expect("the revoke is answered");
    assert_eq!(
        handled.recv().await,
        Some((0, 0)),
        "the moved record finished"
    );
    let stored_for_0 = h.last_stored(0);
    assert_eq!(
        stored_for_0,
        Some((tp(0), 1)),
        "partition 0's position was with the source when the revoke was answered"
    );
    let h = Arc::into_inner(h).expect("the revoke task is done");
    let (report, _) = h.stop().await;
    assert_eq!(report.abandoned, 0);
}
