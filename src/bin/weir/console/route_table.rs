//! The service's route table, read once at start from the AsyncAPI document of the router
//! this binary runs (built, never run, as `weir schema` does), with the consumer group, order
//! and retry policy of the configuration.

use crate::config::Settings;

/// One route: a handler of some event types of one topic.
pub(super) struct Route {
    pub(super) topic: String,
    pub(super) event_types: Vec<String>,
    pub(super) handler: String,
}

impl RouteTable {
    /// The consumer group of the configuration.
    pub(crate) fn group(&self) -> &str {
        &self.group
    }

    /// The topics the routes consume, each once.
    pub(crate) fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.routes.iter().map(|r| r.topic.clone()).collect();
        topics.dedup();
        topics
    }
}

/// What the Routes page shows.
pub(crate) struct RouteTable {
    pub(super) routes: Vec<Route>,
    pub(super) group: String,
    pub(super) order: String,
    pub(super) retry: String,
    pub(super) document: String,
}

impl RouteTable {
    /// The reference service's routes, from its AsyncAPI document.
    pub(crate) fn of(settings: &Settings) -> anyhow::Result<Self> {
        let document = crate::schema::document(settings)?;
        let doc = document.as_value();
        let address = |channel_ref: &str| {
            let id = channel_ref.rsplit('/').next().unwrap_or_default();
            doc["channels"][id]["address"]
                .as_str()
                .unwrap_or(id)
                .to_owned()
        };
        let mut routes: Vec<Route> = doc["operations"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, op)| op["action"] == "receive")
            .map(|(_, op)| Route {
                topic: address(op["channel"]["$ref"].as_str().unwrap_or_default()),
                event_types: op["messages"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["$ref"].as_str())
                    .map(|r| r.rsplit('/').next().unwrap_or_default().to_owned())
                    .collect(),
                handler: op["title"].as_str().unwrap_or_default().to_owned(),
            })
            .collect();
        routes.sort_by(|a, b| (&a.topic, &a.handler).cmp(&(&b.topic, &b.handler)));
        let r = &settings.retry;
        Ok(Self {
            routes,
            group: settings.consumer.group_id.clone(),
            order: format!("{:?}", settings.consumer.order).to_lowercase(),
            retry: format!(
                "{} attempts, {} first, ×{} up to {}{}",
                r.maximum_attempts,
                humantime::format_duration(r.initial_interval),
                r.backoff_coefficient,
                humantime::format_duration(r.maximum_interval),
                if r.durable.is_some() {
                    ", then parked (durable)"
                } else {
                    ", then dead-lettered"
                }
            ),
            document: document.to_json()?,
        })
    }
}
