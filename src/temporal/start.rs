//! One event, one workflow start: the request a handler maps its event to, and the adapter that
//! sends it.

use super::client::Temporal;
use super::errors::classify_start_error;
use crate::contracts::Event;
use crate::handlers::{Ctx, HandlerError, HandlerFn, TraceContext};
use crate::telemetry::events::WorkflowStartRequested;
use std::collections::HashMap;
use temporalio_client::errors::WorkflowStartError;
use temporalio_client::{WorkflowIdConflictPolicy, WorkflowIdReusePolicy, WorkflowStartOptions};
use temporalio_common::protos::temporal::api::common::v1::{Header, Payload};
use temporalio_common::{HasWorkflowDefinition, MemoValues, SignalDefinition};

/// The workflow header key that carries the record's trace context, as a JSON object with
/// `traceparent` (and `tracestate`): the key and shape Temporal's tracing interceptors use.
pub const TRACE_HEADER: &str = "_tracer-data";

/// What one event starts: the workflow's input, and where the defaults do not fit, its id and
/// task queue.
#[derive(Debug, Clone)]
pub struct WorkflowRequest<I> {
    input: I,
    id: Option<String>,
    task_queue: Option<String>,
    memo: Vec<(String, String)>,
}

impl<I> WorkflowRequest<I> {
    /// A start with `input`, the default id (`<workflow type>-<event id>`) and task queue.
    pub fn new(input: I) -> Self {
        Self {
            input,
            id: None,
            task_queue: None,
            memo: Vec::new(),
        }
    }

    /// The workflow id. It must be the same for every delivery of one event (derive it from
    /// the event id or from the entity the event names), or a redelivery starts a second
    /// workflow.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Another task queue than the client's default.
    pub fn task_queue(mut self, task_queue: impl Into<String>) -> Self {
        self.task_queue = Some(task_queue.into());
        self
    }

    /// A memo entry, shown by `temporal workflow describe` (e.g. the entity's id).
    pub fn memo(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.memo.push((key.into(), value.into()));
        self
    }
}

/// What a start did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// A new workflow execution, with its run id.
    Started {
        /// The workflow id.
        workflow_id: String,
        /// The new run's id.
        run_id: String,
    },
    /// The id was already taken (a redelivered record): nothing new was started.
    AlreadyStarted {
        /// The workflow id.
        workflow_id: String,
    },
}

impl Temporal {
    /// A handler that starts workflow `W` for each event `E`, the input and options of which
    /// `map` derives from the event.
    ///
    /// `workflow` makes the workflow's marker (`|| MyWorkflow::run`): the SDK's markers are unit
    /// structs a start consumes and that are not `Clone`.
    ///
    /// ```ignore
    /// router.on(temporal.starts(|| Onboarding::run, |event: CustomerRegistered, _ctx: &Ctx| {
    ///     WorkflowRequest::new(event.0.customer_id)
    /// }))
    /// ```
    pub fn starts<E, W, F, M, S>(&self, workflow: F, map: M) -> impl HandlerFn<E, (Ctx,), S>
    where
        S: Send + Sync + 'static,
        E: Event,
        W: HasWorkflowDefinition + Send + 'static,
        W::Input: Send,
        F: Fn() -> W + Clone + Send + Sync + 'static,
        M: Fn(E, &Ctx) -> WorkflowRequest<W::Input> + Clone + Send + Sync + 'static,
    {
        let temporal = self.clone();
        move |event: E, ctx: Ctx| {
            let temporal = temporal.clone();
            let workflow = workflow();
            let request = map(event, &ctx);
            async move {
                temporal.start(workflow, request, &ctx).await?;
                Ok(())
            }
        }
    }

    /// Like [`starts`](Self::starts), but signal-with-start: the event is delivered as signal
    /// `S` to the workflow its request's id names, which is started first if it is not running
    /// (one workflow per entity, many requests). A redelivered record signals again, so the
    /// signal's input should carry the event id for the workflow to ignore repeats.
    pub fn signals_with_start<E, W, S, F, G, M, St>(
        &self,
        workflow: F,
        signal: G,
        map: M,
    ) -> impl HandlerFn<E, (Ctx,), St>
    where
        St: Send + Sync + 'static,
        E: Event,
        W: HasWorkflowDefinition + Send + 'static,
        W::Input: Send,
        S: SignalDefinition<Workflow = W::Run> + Send + 'static,
        S::Input: Send,
        F: Fn() -> W + Clone + Send + Sync + 'static,
        G: Fn() -> S + Clone + Send + Sync + 'static,
        M: Fn(E, &Ctx) -> (WorkflowRequest<W::Input>, S::Input) + Clone + Send + Sync + 'static,
    {
        let temporal = self.clone();
        move |event: E, ctx: Ctx| {
            let temporal = temporal.clone();
            let workflow = workflow();
            let signal = signal();
            let (request, signal_input) = map(event, &ctx);
            async move {
                temporal
                    .signal_with_start(workflow, request, signal, signal_input, &ctx)
                    .await?;
                Ok(())
            }
        }
    }

    /// Signals `signal` to the workflow `request` names, starting it first if it is not
    /// running: the call behind [`signals_with_start`](Self::signals_with_start). Without an
    /// id in the request, the workflow is `<workflow type>-<record key>`: one per entity.
    /// [`StartOutcome::Started`] names the run that received the signal, new or not.
    pub async fn signal_with_start<W, S>(
        &self,
        workflow: W,
        request: WorkflowRequest<W::Input>,
        signal: S,
        signal_input: S::Input,
        ctx: &Ctx,
    ) -> Result<StartOutcome, HandlerError>
    where
        W: HasWorkflowDefinition,
        W::Input: Send,
        S: SignalDefinition<Workflow = W::Run>,
        S::Input: Send,
    {
        let client = self
            .client()
            .await
            .map_err(super::TemporalError::into_handler_error)?;
        let workflow_id = request.id.clone().unwrap_or_else(|| match ctx.key_str() {
            Some(key) => format!("{}-{key}", workflow.name()),
            None => default_id(workflow.name(), ctx),
        });
        let options = self.options(&request, &workflow_id, ctx, false);
        let result = client
            .signal_with_start_workflow(workflow, request.input, signal, signal_input, options)
            .await
            .map(|handle| handle.run_id().map(str::to_owned));
        finish(&workflow_id, ctx, result)
    }

    /// Starts `workflow` as `request` says, for the record of `ctx`: the adapter's one call,
    /// for handlers that do more than start a workflow.
    pub async fn start<W>(
        &self,
        workflow: W,
        request: WorkflowRequest<W::Input>,
        ctx: &Ctx,
    ) -> Result<StartOutcome, HandlerError>
    where
        W: HasWorkflowDefinition,
        W::Input: Send,
    {
        let client = self
            .client()
            .await
            .map_err(super::TemporalError::into_handler_error)?;
        let workflow_id = request
            .id
            .clone()
            .unwrap_or_else(|| default_id(workflow.name(), ctx));
        let options = self.options(&request, &workflow_id, ctx, true);
        let result = client
            .start_workflow(workflow, request.input, options)
            .await
            .map(|handle| handle.run_id().map(str::to_owned));
        finish(&workflow_id, ctx, result)
    }

    fn options<I>(
        &self,
        request: &WorkflowRequest<I>,
        workflow_id: &str,
        ctx: &Ctx,
        reject_duplicates: bool,
    ) -> WorkflowStartOptions {
        let task_queue = request
            .task_queue
            .clone()
            .unwrap_or_else(|| self.task_queue().to_owned());
        let mut memo = MemoValues::new();
        memo.insert("weir.event_id", ctx.event_id().to_string());
        memo.insert("weir.event_type", ctx.event().event_type.clone());
        for (key, value) in &request.memo {
            memo.insert(key.clone(), value.clone());
        }
        if let Some(trace) = ctx.trace() {
            memo.insert("traceparent", trace.traceparent.clone());
        }
        let builder = WorkflowStartOptions::new(task_queue, workflow_id.to_owned())
            .memo(memo)
            .maybe_header(ctx.trace().map(trace_header));
        if reject_duplicates {
            // A completed workflow's id is reusable by default; an event starts at most one
            // workflow ever, so a redelivery after completion must be refused too.
            builder
                .id_reuse_policy(WorkflowIdReusePolicy::RejectDuplicate)
                .id_conflict_policy(WorkflowIdConflictPolicy::Fail)
                .build()
        } else {
            // Signal-with-start: the workflow is per entity; a finished one may be started anew.
            builder.build()
        }
    }
}

/// `<workflow type>-<event id>`: the same for every delivery of the event.
fn default_id(workflow_type: &str, ctx: &Ctx) -> String {
    format!("{workflow_type}-{}", ctx.event_id())
}

/// Turns a start's result into the record's outcome; "already started" is success.
fn finish(
    workflow_id: &str,
    ctx: &Ctx,
    result: Result<Option<String>, WorkflowStartError>,
) -> Result<StartOutcome, HandlerError> {
    let outcome = match result {
        Ok(run_id) => StartOutcome::Started {
            workflow_id: workflow_id.to_owned(),
            run_id: run_id.unwrap_or_default(),
        },
        Err(WorkflowStartError::AlreadyStarted { .. }) => StartOutcome::AlreadyStarted {
            workflow_id: workflow_id.to_owned(),
        },
        Err(error) => return Err(classify_start_error(error)),
    };
    WorkflowStartRequested {
        event_id: ctx.event_id(),
        workflow_id,
        duplicate: matches!(outcome, StartOutcome::AlreadyStarted { .. }),
    }
    .emit();
    Ok(outcome)
}

/// The `_tracer-data` header: `{"traceparent": ..., "tracestate": ...}` as a JSON payload.
fn trace_header(trace: &TraceContext) -> Header {
    let mut carrier = serde_json::Map::new();
    carrier.insert("traceparent".into(), trace.traceparent.clone().into());
    if let Some(state) = &trace.tracestate {
        carrier.insert("tracestate".into(), state.clone().into());
    }
    let payload = Payload {
        metadata: HashMap::from([("encoding".to_owned(), b"json/plain".to_vec())]),
        data: serde_json::Value::Object(carrier).to_string().into_bytes(),
        ..Default::default()
    };
    Header {
        fields: HashMap::from([(TRACE_HEADER.to_owned(), payload)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contracts::EventMeta;
    use uuid::Uuid;

    fn order_placed() -> EventMeta {
        EventMeta {
            id: Uuid::new_v4(),
            event_type: "order.placed".into(),
            source: "/orders".into(),
            time: None,
            subject: None,
            dataschema: None,
        }
    }

    #[test]
    fn a_start_carries_the_records_trace_in_its_header_and_memo_and_rejects_duplicates() {
        let trace = TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: None,
        };
        let event = order_placed();
        let ctx = Ctx::detached("orders", event).with_trace(trace);
        let temporal = Temporal::new("127.0.0.1:7233", "default", "orders").unwrap();
        let request = WorkflowRequest::new(()).memo("order_id", "o-1");
        let options = temporal.options(&request, "Fulfil-1", &ctx, true);
        assert_eq!(options.task_queue, "orders");
        assert_eq!(options.workflow_id, "Fulfil-1");
        assert_eq!(
            options.id_reuse_policy,
            WorkflowIdReusePolicy::RejectDuplicate
        );
        assert_eq!(options.id_conflict_policy, WorkflowIdConflictPolicy::Fail);
        let header = options.header.expect("a trace header");
        let carried: serde_json::Value =
            serde_json::from_slice(&header.fields[TRACE_HEADER].data).unwrap();
        assert_eq!(
            carried["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        let memo = options.memo.expect("a memo");
        for key in [
            "traceparent",
            "weir.event_id",
            "weir.event_type",
            "order_id",
        ] {
            assert!(memo.get(key).is_some(), "memo {key}");
        }
    }

    #[test]
    fn without_a_trace_there_is_no_trace_header() {
        let event = order_placed();
        let ctx = Ctx::detached("orders", event);
        let temporal = Temporal::new("127.0.0.1:7233", "default", "orders").unwrap();
        let options = temporal.options(&WorkflowRequest::new(()), "Fulfil-2", &ctx, true);
        assert!(options.header.is_none());
        assert!(options.memo.expect("memo").get("traceparent").is_none());
    }

    #[test]
    fn the_trace_header_carries_traceparent_and_tracestate_as_json() {
        let trace = TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: Some("vendor=1".into()),
        };
        let header = trace_header(&trace);
        let payload = &header.fields[TRACE_HEADER];
        assert_eq!(payload.metadata["encoding"], b"json/plain");
        let value: serde_json::Value = serde_json::from_slice(&payload.data).unwrap();
        assert_eq!(value["traceparent"], trace.traceparent.as_str());
        assert_eq!(value["tracestate"], "vendor=1");
    }
}
