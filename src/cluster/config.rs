//! `[cluster]`: cluster mode on NATS JetStream (off unless `nats_url` is set).

use serde::{Deserialize, Serialize};

use crate::config::defaults_from_attributes;

/// `[cluster]`. The two keys a deployment sets most (`nats_url`, `node_id`)
/// have short flags and variables (`--nats-url`, `COCHLEA_NATS_URL`).
#[derive(Debug, Clone, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS server(s) with JetStream, comma-separated (`nats://host:4222`):
    /// turns cluster mode on. Unset: a single node with local state.
    #[arg(long = "nats-url", env = "COCHLEA_NATS_URL", value_name = "URL")]
    pub nats_url: Option<String>,
    /// This node's name in the cluster; unset: the host name.
    #[arg(long = "node-id", env = "COCHLEA_NODE_ID", value_name = "NAME")]
    pub node_id: Option<String>,
    /// A node that has not renewed its lease for this long is dead: its
    /// sessions may be taken over by another node.
    #[arg(
        long = "cluster-lease-ms",
        env = "COCHLEA_CLUSTER_LEASE_MS",
        value_name = "MS",
        default_value_t = 3_000
    )]
    pub lease_ms: u64,
    /// How long session events stay on NATS (`cochlea.events.<id>`), for
    /// consumers and `GET /v1/sessions/<id>/events`.
    #[arg(
        long = "cluster-events-max-age-s",
        env = "COCHLEA_CLUSTER_EVENTS_MAX_AGE_S",
        value_name = "SECONDS",
        default_value_t = 86_400
    )]
    pub events_max_age_s: u64,
    /// JetStream replicas of cochlea's streams and buckets (3 in a
    /// three-server NATS cluster; 1 for a single server).
    #[arg(
        long = "cluster-replicas",
        env = "COCHLEA_CLUSTER_REPLICAS",
        value_name = "N",
        default_value_t = 1
    )]
    pub replicas: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        defaults_from_attributes()
    }
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        self.nats_url
            .as_deref()
            .is_some_and(|u| !u.trim().is_empty())
    }

    /// The node's name: `node_id`, else the host name, else `node`.
    pub fn node_name(&self) -> String {
        if let Some(id) = self.node_id.as_deref().filter(|id| !id.is_empty()) {
            return id.to_owned();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "node".to_owned())
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if !(500..=60_000).contains(&self.lease_ms) {
            return Err(format!(
                "cluster.lease_ms must be from 500 to 60000, not {}",
                self.lease_ms
            ));
        }
        if self.events_max_age_s == 0 {
            return Err("cluster.events_max_age_s must be at least 1".into());
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(format!(
                "cluster.replicas must be from 1 to 5, not {}",
                self.replicas
            ));
        }
        let name = self.node_name();
        // The node id is a NATS subject token and a KV key.
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "node_id must be letters, digits, '-' and '_' only, not {name:?}"
            ));
        }
        Ok(())
    }
}
