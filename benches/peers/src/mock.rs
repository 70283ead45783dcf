//! `--mock`: librdkafka's embedded mock cluster, to check every arm works without a broker.
//! The cluster lives on a thread of its own (it is neither `Send` nor `Sync`), which creates
//! topics on request: the mock answers no CreateTopics request.

use std::sync::mpsc;
use std::sync::OnceLock;

type CreateRequest = (String, i32, mpsc::Sender<anyhow::Result<()>>);

static TOPICS: OnceLock<mpsc::Sender<CreateRequest>> = OnceLock::new();

/// Starts the mock cluster; returns its bootstrap servers.
pub(crate) fn start() -> anyhow::Result<String> {
    let (servers_tx, servers_rx) = mpsc::channel();
    let (requests_tx, requests_rx) = mpsc::channel::<CreateRequest>();
    std::thread::Builder::new()
        .name("mock-cluster".into())
        .spawn(move || {
            let mock = match rdkafka::mocking::MockCluster::new(1) {
                Ok(mock) => mock,
                Err(e) => {
                    let _ = servers_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            let _ = servers_tx.send(Ok(mock.bootstrap_servers()));
            // Serves until the process exits.
            for (topic, partitions, reply) in requests_rx {
                let result = mock
                    .create_topic(&topic, partitions, 1)
                    .map_err(anyhow::Error::from);
                let _ = reply.send(result);
            }
        })?;
    let servers = servers_rx.recv()??;
    let _ = TOPICS.set(requests_tx);
    Ok(servers)
}

/// Creates a topic on the mock cluster, if one runs: `None` when there is none.
pub(crate) fn create_topic(topic: &str, partitions: i32) -> Option<anyhow::Result<()>> {
    let requests = TOPICS.get()?;
    let (reply, answer) = mpsc::channel();
    if requests
        .send((topic.to_owned(), partitions, reply))
        .is_err()
    {
        return Some(Err(anyhow::anyhow!("the mock cluster stopped")));
    }
    Some(
        answer
            .recv()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the mock cluster stopped"))),
    )
}
