//! The node's lease in `cochlea_nodes`, and the cluster's view of its nodes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{jetstream_error, Cluster, ClusterError};

/// What a node says of itself in its lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeView {
    pub node_id: String,
    /// This process (a restarted node is a new instance).
    pub instance: String,
    pub started_at: String,
    pub sessions: usize,
    /// Sessions per API key id, for `max_sessions_per_key` across the
    /// cluster.
    #[serde(default)]
    pub keys: std::collections::BTreeMap<String, usize>,
    /// Seconds since the Unix epoch of the last renewal.
    pub renewed_at: u64,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lease_value(cluster: &Cluster, instance: &str, started_at: &str) -> bytes::Bytes {
    let view = NodeView {
        node_id: cluster.node_id.clone(),
        instance: instance.to_owned(),
        started_at: started_at.to_owned(),
        sessions: cluster.load(),
        keys: cluster.key_load(),
        renewed_at: now_s(),
    };
    serde_json::to_vec(&view).unwrap_or_default().into()
}

/// Takes the node's key. A key still there belongs to a live node with the
/// same id, or to this node's previous process: its lease runs out within
/// `lease`, so one wait of that long tells which.
pub(super) async fn acquire(cluster: &Arc<Cluster>) -> Result<Lease, ClusterError> {
    let instance = cluster.instance.clone();
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    for attempt in 0..2 {
        let value = lease_value(cluster, &instance, &started_at);
        match cluster.nodes.create(&cluster.node_id, value).await {
            Ok(revision) => {
                return Ok(Lease {
                    revision,
                    instance,
                    started_at,
                })
            }
            Err(e) if attempt == 0 => {
                tracing::warn!(error = %e, node_id = %cluster.node_id, "node id held: waiting for its lease to run out");
                tokio::time::sleep(cluster.lease + Duration::from_millis(200)).await;
            }
            Err(_) => {}
        }
    }
    Err(ClusterError::NodeIdTaken(cluster.node_id.clone()))
}

pub(super) struct Lease {
    revision: u64,
    instance: String,
    started_at: String,
}

/// Renews the lease every third of its length. A renewal that finds the key
/// changed or gone means the lease ran out (this process was paused, or NATS
/// was out of reach for longer than a lease): other nodes may have taken
/// some of its sessions over meanwhile. Those are safe without the lease:
/// each journal append states the sequence it expects, and a session is
/// finished only after its record is found to still name this process. So
/// the node takes a new lease and goes on; only if another live process
/// holds its id is it fenced for good.
pub(super) async fn renew(cluster: Arc<Cluster>, mut lease: Lease) {
    let every = cluster.lease / 3;
    loop {
        tokio::time::sleep(every).await;
        let value = lease_value(&cluster, &lease.instance, &lease.started_at);
        let renewal = tokio::time::timeout(
            cluster.lease,
            cluster
                .nodes
                .update(&cluster.node_id, value.clone(), lease.revision),
        )
        .await;
        match renewal {
            Ok(Ok(revision)) => {
                lease.revision = revision;
                if let Ok(nodes) = view(&cluster).await {
                    cluster.note_view(&nodes);
                }
            }
            Ok(Err(e)) => {
                use async_nats::jetstream::kv::UpdateErrorKind;
                if e.kind() != UpdateErrorKind::WrongLastRevision {
                    tracing::warn!(error = %e, "lease renewal failed; retrying");
                    continue;
                }
                tracing::warn!(
                    node_id = %cluster.node_id,
                    "lost the node lease (paused, or NATS out of reach, for longer than cluster.lease_ms): sessions taken over meanwhile are dropped here as they are found"
                );
                match cluster.nodes.create(&cluster.node_id, value).await {
                    Ok(revision) => {
                        lease.revision = revision;
                        tracing::info!(node_id = %cluster.node_id, "took a new node lease");
                    }
                    Err(e) => {
                        cluster.fenced.store(true, Ordering::Release);
                        tracing::error!(
                            error = %e,
                            node_id = %cluster.node_id,
                            "another process holds this node id: fenced, writing nothing more; give each node its own --node-id"
                        );
                        return;
                    }
                }
            }
            Err(_) => tracing::warn!("lease renewal timed out; retrying"),
        }
    }
}

pub(super) async fn view(cluster: &Cluster) -> Result<Vec<NodeView>, ClusterError> {
    let mut keys = cluster
        .nodes
        .keys()
        .await
        .map_err(|e| jetstream_error("nodes bucket")(&e))?;
    let mut nodes = Vec::new();
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        if let Ok(Some(value)) = cluster.nodes.get(key).await {
            if let Ok(view) = serde_json::from_slice::<NodeView>(&value) {
                nodes.push(view);
            }
        }
    }
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Ok(nodes)
}

pub(super) async fn alive(
    cluster: &Cluster,
    node: &str,
    instance: &str,
) -> Result<bool, ClusterError> {
    let value = cluster
        .nodes
        .get(node)
        .await
        .map_err(|e| jetstream_error("nodes bucket")(&e))?;
    Ok(value
        .and_then(|v| serde_json::from_slice::<NodeView>(&v).ok())
        .is_some_and(|view| view.instance == instance))
}
