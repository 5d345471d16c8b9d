//! Cluster mode: nodes that share their state through NATS JetStream.
//!
//! Off unless `cluster.nats_url` is set; a single node then keeps everything
//! local, as before. On, each node:
//!
//! - holds a lease in the KV bucket `cochlea_nodes` (its key, rewritten every
//!   third of `cluster.lease_ms`; the bucket's age limit removes it when the
//!   node stops renewing). Other nodes take a session over only from a node
//!   whose lease is gone. A node that finds its lease gone (it was paused,
//!   or NATS was out of reach) takes a new one: the sessions taken over
//!   meanwhile are fenced one by one (journal sequence, owner check);
//!   a node whose id another live process holds is *fenced* for good
//!   ([`Cluster::fenced`]);
//! - publishes every server event of its sessions to the JetStream subject
//!   `cochlea.events.<session_id>` (stream `COCHLEA_EVENTS`, kept
//!   `cluster.events_max_age_s`), the JSON the native protocol sends,
//!   without the resume token, so back ends can follow sessions without
//!   holding their sockets (and `GET /v1/sessions/<id>/events` serves them
//!   from any node).
//!
//! | file        | job                                                  |
//! |-------------|------------------------------------------------------|
//! | `config.rs` | `[cluster]` settings                                 |
//! | `node.rs`   | the node's lease and the cluster's view of its nodes |
//! | `events.rs` | session events to JetStream, and reading them back   |
//! | `journal.rs`| each session's audio, durable before it is acked      |
//! | `sessions.rs`| session records: owner, token hash, start request    |

mod config;
pub mod events;
pub mod journal;
mod node;
pub mod sessions;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream;

pub use self::config::ClusterConfig;
pub use self::node::NodeView;
pub use self::sessions::{SessionRecord, Sessions};

/// Bucket of node leases.
const NODES_BUCKET: &str = "cochlea_nodes";
/// Stream of session events, subjects `cochlea.events.<session_id>`.
const EVENTS_STREAM: &str = "COCHLEA_EVENTS";
const EVENTS_SUBJECTS: &str = "cochlea.events.>";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("JetStream {what}: {message}")]
    JetStream { what: &'static str, message: String },
    #[error("node id {0} is held by a live node; give this node another --node-id")]
    NodeIdTaken(String),
    #[error("session id {0:?} is not one this server makes")]
    BadSessionId(String),
    #[error("another node has taken the session over")]
    Fenced,
}

fn jetstream_error(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> ClusterError {
    move |e| ClusterError::JetStream {
        what,
        message: e.to_string(),
    }
}

type KeyCounts = dyn Fn() -> BTreeMap<String, usize> + Send + Sync;
type KeysElsewhere = dyn Fn(HashMap<String, usize>) + Send + Sync;

/// A node's handle on the cluster, shared by its sessions.
pub struct Cluster {
    node_id: String,
    /// This process: a node restarted with the same id is another instance.
    instance: String,
    client: async_nats::Client,
    sessions: Sessions,
    lease: Duration,
    js: jetstream::Context,
    nodes: jetstream::kv::Store,
    events: events::Publisher,
    /// Set when the node finds it lost its lease.
    fenced: AtomicBool,
    /// How many sessions the node holds, for its lease (set by the server).
    load: OnceLock<Box<dyn Fn() -> usize + Send + Sync>>,
    /// The node's sessions per key (set by the server).
    key_load: OnceLock<Box<KeyCounts>>,
    /// Told the other nodes' sessions per key after each renewal.
    on_keys_elsewhere: OnceLock<Box<KeysElsewhere>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects, makes the streams and buckets cochlea needs (or checks the
    /// ones there), takes the node's lease and starts renewing it.
    pub async fn start(config: &ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
        let url = config.nats_url.clone().unwrap_or_default();
        let client = async_nats::ConnectOptions::new()
            .name(format!("cochlea {}", config.node_name()))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(url.as_str());
        let client = tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .map_err(|_| ClusterError::Connect {
                url: url.clone(),
                message: "no answer within 10 s".into(),
            })?
            .map_err(|e| ClusterError::Connect {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let js = jetstream::new(client.clone());
        let lease = Duration::from_millis(config.lease_ms);
        let nodes = js
            .create_or_update_key_value(jetstream::kv::Config {
                bucket: NODES_BUCKET.into(),
                description: "cochlea node leases".into(),
                history: 1,
                max_age: lease,
                num_replicas: config.replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| jetstream_error("nodes bucket")(&e))?;
        js.get_or_create_stream(jetstream::stream::Config {
            name: EVENTS_STREAM.into(),
            description: Some("cochlea session events".into()),
            subjects: vec![EVENTS_SUBJECTS.into()],
            max_age: Duration::from_secs(config.events_max_age_s),
            num_replicas: config.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| jetstream_error("events stream")(&e))?;
        js.get_or_create_stream(jetstream::stream::Config {
            name: journal::AUDIO_STREAM.into(),
            description: Some("cochlea session journals (audio before its ack)".into()),
            subjects: vec![journal::AUDIO_SUBJECTS.into()],
            // A session's journal is read back only while it can be
            // resumed; a day is far beyond any resume window.
            max_age: Duration::from_secs(86_400),
            num_replicas: config.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| jetstream_error("journal stream")(&e))?;
        let sessions_kv = js
            .create_or_update_key_value(jetstream::kv::Config {
                bucket: sessions::SESSIONS_BUCKET.into(),
                description: "cochlea session records".into(),
                history: 1,
                max_age: Duration::from_secs(86_400),
                num_replicas: config.replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| jetstream_error("sessions bucket")(&e))?;
        let cluster = Arc::new(Cluster {
            node_id: config.node_name(),
            instance: uuid::Uuid::now_v7().to_string(),
            client,
            sessions: Sessions::new(sessions_kv),
            lease,
            events: events::Publisher::start(js.clone()),
            js,
            nodes,
            fenced: AtomicBool::new(false),
            load: OnceLock::new(),
            key_load: OnceLock::new(),
            on_keys_elsewhere: OnceLock::new(),
        });
        let revision = node::acquire(&cluster).await?;
        tokio::spawn(node::renew(cluster.clone(), revision));
        tracing::info!(node_id = %cluster.node_id, "cluster mode: joined");
        Ok(cluster)
    }

    /// Tells the cluster how to count this node's sessions.
    pub fn count_sessions_with(&self, load: impl Fn() -> usize + Send + Sync + 'static) {
        let _ = self.load.set(Box::new(load));
    }

    fn load(&self) -> usize {
        self.load.get().map_or(0, |load| load())
    }

    /// `max_sessions_per_key` across the cluster: `counts` gives this node's
    /// sessions per key (published in its lease), `elsewhere` is told the
    /// other nodes' sums after each renewal.
    pub fn share_key_counts(
        &self,
        counts: impl Fn() -> BTreeMap<String, usize> + Send + Sync + 'static,
        elsewhere: impl Fn(HashMap<String, usize>) + Send + Sync + 'static,
    ) {
        let _ = self.key_load.set(Box::new(counts));
        let _ = self.on_keys_elsewhere.set(Box::new(elsewhere));
    }

    fn key_load(&self) -> BTreeMap<String, usize> {
        self.key_load
            .get()
            .map_or_else(BTreeMap::new, |load| load())
    }

    fn note_view(&self, nodes: &[NodeView]) {
        let Some(tell) = self.on_keys_elsewhere.get() else {
            return;
        };
        let mut sums: HashMap<String, usize> = HashMap::new();
        for node in nodes.iter().filter(|n| n.node_id != self.node_id) {
            for (key, count) in &node.keys {
                *sums.entry(key.clone()).or_default() += count;
            }
        }
        tell(sums);
    }

    /// How long a node's lease lasts without renewal.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Another live process holds this node's id: it must not write at all.
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Publishes one event of a session (the native JSON); never waits.
    pub fn publish_event(&self, session_id: &str, json: String) {
        self.events.publish(session_id, json);
    }

    /// The nodes holding a lease now.
    pub async fn view(&self) -> Result<Vec<NodeView>, ClusterError> {
        node::view(self).await
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The appending end of a session's journal, after `last_sequence`.
    pub fn journal(&self, session_id: &str, last_sequence: u64) -> journal::Journal {
        journal::Journal::new(self.js.clone(), session_id, last_sequence)
    }

    /// Whether `node`'s process `instance` still holds its lease.
    pub async fn node_alive(&self, node: &str, instance: &str) -> Result<bool, ClusterError> {
        node::alive(self, node, instance).await
    }

    /// Gives the node's lease up (at the end of a shutdown): sessions it did
    /// not release can be taken over at once instead of after the lease.
    pub async fn leave(&self) {
        if self.fenced() {
            return;
        }
        let deleting = self.nodes.delete(&self.node_id);
        match tokio::time::timeout(Duration::from_secs(2), deleting).await {
            Ok(Ok(())) => tracing::info!(node_id = %self.node_id, "left the cluster"),
            Ok(Err(e)) => tracing::warn!(error = %e, "node lease not given up"),
            Err(_) => tracing::warn!("node lease not given up within 2 s"),
        }
    }

    /// The subject a node answers hand-over requests on.
    pub fn handover_subject(node: &str) -> String {
        format!("cochlea.handover.{node}")
    }
}

/// Session ids are UUIDs made here; anything else could name other subjects.
pub fn check_session_id(id: &str) -> Result<(), ClusterError> {
    if uuid::Uuid::parse_str(id).is_ok() && id.len() == 36 {
        Ok(())
    } else {
        Err(ClusterError::BadSessionId(id.chars().take(64).collect()))
    }
}
