//! Cluster mode: resuming, on this node, a session another node held.
//!
//! The session's record in KV says who owns it and holds its token's hash;
//! its journal holds every audio message the client was acked. This node
//! takes the record by compare-and-swap (only once the owner's lease has
//! run out: a live owner keeps its sessions), reads the journal, and feeds
//! it to a fresh session core at the times the messages first arrived, so
//! decoders, jitter buffer and recorder end in the state the owner's had.
//! The client is then told `started` with `resume_from_seq` and sends the
//! rest. The recording is rebuilt whole on this node's spool and uploaded
//! as one object when the session ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::auth::constant_time_eq;
use super::journaling::Journaling;
use super::resume::ResumeError;
use super::session::{SessionEnv, Suspended};
use crate::cluster::{events, journal, sessions::token_hash, Cluster, ClusterError};
use crate::protocol::StartRequest;
use crate::session::{Input, Output, SessionCore, SessionLimits};

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(transparent)]
    Resume(#[from] ResumeError),
    #[error("cluster state unavailable: {0}")]
    Cluster(#[from] ClusterError),
    #[error("the session's journal does not rebuild it: {0}")]
    Replay(String),
}

/// Takes `session_id` over from a node whose lease ran out, and rebuilds
/// it from its journal. `request` is what the resuming client repeated.
pub async fn take_over(
    env: &SessionEnv,
    cluster: &Arc<Cluster>,
    session_id: &str,
    token: &str,
    request: &StartRequest,
) -> Result<Suspended, TakeoverError> {
    let not_resumable = || ResumeError::NotResumable(session_id.to_owned());
    let Some((mut record, mut revision)) = cluster.sessions().get(session_id).await? else {
        return Err(not_resumable().into());
    };
    if record.closed {
        return Err(not_resumable().into());
    }
    if !constant_time_eq(token_hash(token).as_bytes(), record.token_sha256.as_bytes()) {
        tracing::info!("cluster resume refused: wrong token");
        return Err(not_resumable().into());
    }
    if record.owner == cluster.node_id() && record.owner_instance == cluster.instance() {
        // Ours, yet not in the local registry: it has just ended.
        return Err(not_resumable().into());
    }
    // A live owner is asked to hand the session over (its client came back
    // through another node: a network blip, a load balancer's choice).
    if !record.owner.is_empty()
        && cluster
            .node_alive(&record.owner, &record.owner_instance)
            .await?
        && ask_handover(cluster, &record.owner, session_id, token).await
    {
        if let Some((fresh, fresh_revision)) = cluster.sessions().get(session_id).await? {
            record = fresh;
            revision = fresh_revision;
        }
    }
    // A client that lost a node usually comes back before the node's lease
    // has run out: wait for it (a lease and a little), rather than refuse.
    // The record is read again each time: an owner shutting down releases
    // the session (no owner) while it still holds its lease.
    let give_up_at = tokio::time::Instant::now() + cluster.lease() + Duration::from_secs(1);
    while !record.owner.is_empty()
        && cluster
            .node_alive(&record.owner, &record.owner_instance)
            .await?
    {
        if tokio::time::Instant::now() >= give_up_at {
            return Err(ResumeError::Busy(session_id.to_owned()).into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        match cluster.sessions().get(session_id).await? {
            Some((fresh, fresh_revision)) if !fresh.closed => {
                record = fresh;
                revision = fresh_revision;
            }
            _ => return Err(not_resumable().into()),
        }
    }
    record.owner = cluster.node_id().to_owned();
    record.owner_instance = cluster.instance().to_owned();
    record.resumes = record.resumes.saturating_add(1);
    if let Err(e) = cluster.sessions().swap(session_id, &record, revision).await {
        // Another node was faster.
        tracing::info!(error = %e, "cluster resume: another node took the session");
        return Err(ResumeError::Busy(session_id.to_owned()).into());
    }
    let (entries, last_sequence) = journal::read_all(cluster.jetstream(), session_id).await?;
    tracing::info!(
        resumes = record.resumes,
        messages = entries.len(),
        "taking the session over: replaying its journal"
    );
    let mut suspended = replay(env, session_id, &record.request, &entries)?;
    suspended
        .core
        .restore(token.to_owned(), record.resumes.saturating_sub(1));
    suspended.suppress_delivered(delivered_finals(cluster, session_id).await);
    suspended
        .core
        .check_resume_request(request)
        .map_err(|e| TakeoverError::Replay(e.to_string()))?;
    let last_arrival = entries.last().map_or(0, |e| e.arrival_ms);
    let first_arrival = std::time::Instant::now()
        .checked_sub(Duration::from_millis(u64::from(last_arrival)))
        .unwrap_or_else(std::time::Instant::now);
    suspended.attach_journal(Journaling::resumed(
        cluster.clone(),
        session_id,
        last_sequence,
        first_arrival,
    ));
    Ok(suspended)
}

/// Finishes, here, a session whose owner is gone and whose client did not
/// come back: rebuilt from its journal, then ended as an expired resume
/// window ends a parked session (the recording completed and uploaded, the
/// record closed). Without this, acknowledged audio would wait in the
/// journal for a client that never returns, and no recording would appear.
pub async fn finish_orphan(
    env: &SessionEnv,
    cluster: &Arc<Cluster>,
    session_id: &str,
) -> Result<bool, TakeoverError> {
    let Some((mut record, revision)) = cluster.sessions().get(session_id).await? else {
        return Ok(false);
    };
    if record.closed
        || (!record.owner.is_empty()
            && cluster
                .node_alive(&record.owner, &record.owner_instance)
                .await?)
    {
        return Ok(false);
    }
    let Ok(guard) = env.registry.try_admit(None) else {
        // Full: another node, or a later sweep, finishes it.
        return Ok(false);
    };
    record.owner = cluster.node_id().to_owned();
    record.owner_instance = cluster.instance().to_owned();
    if cluster
        .sessions()
        .swap(session_id, &record, revision)
        .await
        .is_err()
    {
        return Ok(false);
    }
    let (entries, last_sequence) = journal::read_all(cluster.jetstream(), session_id).await?;
    tracing::info!(
        session_id,
        messages = entries.len(),
        "finishing a session whose node and client are gone"
    );
    let mut suspended = replay(env, session_id, &record.request, &entries)?;
    suspended.suppress_delivered(delivered_finals(cluster, session_id).await);
    // Nobody can resume it now; the token only keeps the core resumable.
    suspended
        .core
        .restore(uuid::Uuid::new_v4().simple().to_string(), record.resumes);
    suspended.attach_journal(Journaling::resumed(
        cluster.clone(),
        session_id,
        last_sequence,
        std::time::Instant::now(),
    ));
    super::session::finish_detached(suspended, guard, env.clone()).await;
    Ok(true)
}

/// Every node looks for orphans: at start, when it sees a node's lease go,
/// and once a minute. A session first seen orphaned is finished after
/// `resume_window_ms` more (its client's chance to come back, as on one
/// node). Two nodes finishing the same orphan cannot both win: the record
/// changes hands by compare-and-swap.
pub async fn sweep_orphans(cluster: Arc<Cluster>, env: SessionEnv) {
    use std::collections::{HashMap, HashSet};
    let window = Duration::from_millis(env.config.resume_window_ms);
    let mut alive: HashSet<(String, String)> = HashSet::new();
    let mut orphaned_since: HashMap<String, tokio::time::Instant> = HashMap::new();
    let mut last_scan: Option<tokio::time::Instant> = None;
    loop {
        let now = tokio::time::Instant::now();
        let view = cluster.view().await.unwrap_or_default();
        let alive_now: HashSet<(String, String)> = view
            .iter()
            .map(|n| (n.node_id.clone(), n.instance.clone()))
            .collect();
        let someone_died = alive.difference(&alive_now).next().is_some();
        alive = alive_now;
        let due = last_scan.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60))
            || someone_died
            || !orphaned_since.is_empty();
        if due {
            last_scan = Some(now);
            let mut still = HashMap::new();
            for (id, record) in cluster.sessions().open_records().await.unwrap_or_default() {
                let owner_alive = !record.owner.is_empty()
                    && alive.contains(&(record.owner.clone(), record.owner_instance.clone()));
                if owner_alive {
                    continue;
                }
                let since = orphaned_since.get(&id).copied().unwrap_or(now);
                if now.duration_since(since) >= window {
                    match finish_orphan(&env, &cluster, &id).await {
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(session_id = %id, error = %e, "orphan not finished")
                        }
                    }
                } else {
                    still.insert(id, since);
                }
            }
            orphaned_since = still;
        }
        tokio::time::sleep(cluster.lease()).await;
    }
}

/// Asks `owner` to let the session go: it journals what it was handed and
/// releases the record. True if it says it did.
async fn ask_handover(cluster: &Cluster, owner: &str, session_id: &str, token: &str) -> bool {
    let request = serde_json::json!({ "session_id": session_id, "resume_token": token });
    let asking = cluster
        .client()
        .request(Cluster::handover_subject(owner), request.to_string().into());
    match tokio::time::timeout(Duration::from_secs(5), asking).await {
        Ok(Ok(reply)) => {
            let answer: serde_json::Value =
                serde_json::from_slice(&reply.payload).unwrap_or_default();
            if answer["released"] == true {
                tracing::info!(%owner, "the owner handed the session over");
                true
            } else {
                tracing::info!(%owner, answer = %answer, "the owner kept the session");
                false
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(%owner, error = %e, "hand-over request failed");
            false
        }
        Err(_) => {
            tracing::warn!(%owner, "no answer to the hand-over request within 5 s");
            false
        }
    }
}

/// Answers other nodes' hand-over requests for this node's sessions (see
/// [`ask_handover`]) until the connection to NATS ends.
pub async fn serve_handovers(cluster: Arc<Cluster>, env: SessionEnv) {
    let subject = Cluster::handover_subject(cluster.node_id());
    let mut requests = match cluster.client().subscribe(subject).await {
        Ok(requests) => requests,
        Err(e) => {
            tracing::error!(error = %e, "cannot answer hand-over requests");
            return;
        }
    };
    while let Some(message) = futures_util::StreamExt::next(&mut requests).await {
        let Some(reply) = message.reply.clone() else {
            continue;
        };
        let (cluster, env) = (cluster.clone(), env.clone());
        // Sessions live on the worker threads' local sets.
        actix_web::rt::spawn(async move {
            let answer = hand_over(&env, &message.payload).await;
            let body = match answer {
                Ok(()) => serde_json::json!({ "released": true }),
                Err(why) => serde_json::json!({ "released": false, "reason": why }),
            };
            if let Err(e) = cluster
                .client()
                .publish(reply, body.to_string().into())
                .await
            {
                tracing::warn!(error = %e, "hand-over answer not sent");
            }
        });
    }
}

/// Lets a session go to another node: claims it as a local resume would
/// (so a connection still attached lets go first), then hands it off.
async fn hand_over(env: &SessionEnv, payload: &[u8]) -> Result<(), String> {
    let request: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("unreadable request: {e}"))?;
    let id = request["session_id"].as_str().unwrap_or_default();
    let token = request["resume_token"].as_str().unwrap_or_default();
    crate::cluster::check_session_id(id).map_err(|e| e.to_string())?;
    let claimed = env
        .resumes
        .claim(id, token, &StartRequest::default(), Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())?;
    let (parked, _) = claimed;
    super::session::hand_off_parked(*parked.session, parked.guard, env).await;
    Ok(())
}

/// Per channel, the last utterance whose final result (a final transcript,
/// or its `transcribe_failed`) the session's subscribers, and so its client,
/// already had: the rebuilt transcriber hears the same audio, cuts the same
/// utterances with the same ids, and must not say them again.
async fn delivered_finals(cluster: &Cluster, session_id: &str) -> HashMap<u16, u64> {
    let events = match events::read_all(cluster.jetstream(), session_id).await {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(error = %e, "events unreadable: transcripts may come again");
            return HashMap::new();
        }
    };
    let mut last = HashMap::new();
    for json in events {
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(&json) else {
            continue;
        };
        let final_result = match event["type"].as_str() {
            Some("transcript") => event["is_final"] == true,
            Some("error") => event["code"] == "transcribe_failed",
            _ => false,
        };
        let (Some(channel), Some(id)) = (event["channel"].as_u64(), event["utterance_id"].as_u64())
        else {
            continue;
        };
        if final_result {
            let channel = u16::try_from(channel).unwrap_or(u16::MAX);
            let entry = last.entry(channel).or_insert(id);
            *entry = (*entry).max(id);
        }
    }
    last
}

/// A fresh core fed the journal at the times its messages first arrived
/// (with the timers that were due in between), its outputs discarded: the
/// client already had them.
fn replay(
    env: &SessionEnv,
    session_id: &str,
    request: &StartRequest,
    entries: &[journal::Entry],
) -> Result<Suspended, TakeoverError> {
    let (events_tx, events) = mpsc::unbounded_channel();
    // The replay ends now: the live messages that follow keep time moving on.
    let last_arrival = entries.last().map_or(0, |e| e.arrival_ms);
    let now = std::time::Instant::now();
    let start = now
        .checked_sub(Duration::from_millis(u64::from(last_arrival)))
        .unwrap_or(now);
    let mut core = SessionCore::new(
        session_id.to_owned(),
        env.config.clone(),
        env.sinks.clone(),
        Box::new(super::dialect::native::Native),
        events_tx,
        SessionLimits::default(),
        start,
        SystemTime::now(),
    );
    core.open(Ok(request.clone()), start);
    discard(&mut core)?;
    for entry in entries {
        let at = start + Duration::from_millis(u64::from(entry.arrival_ms));
        while let Some(due) = core.next_deadline().filter(|due| *due <= at) {
            core.handle_input(Input::Timeout, due);
            discard(&mut core)?;
        }
        core.handle_input(Input::Binary(&entry.bytes), at);
        discard(&mut core)?;
    }
    Ok(Suspended::new(core, events))
}

/// Drops what a replayed core says to its (long gone) client; journalled
/// audio is durable already. A core that ends during the replay did not
/// rebuild.
fn discard(core: &mut SessionCore) -> Result<(), TakeoverError> {
    while let Some(output) = core.poll_output() {
        match output {
            Output::Persist { seq } => {
                core.handle_input(Input::Durable { seq }, std::time::Instant::now())
            }
            Output::Close { reason, .. } => return Err(TakeoverError::Replay(reason)),
            Output::FinishSinks { .. } | Output::AbortSink { .. } => {
                return Err(TakeoverError::Replay("the replay ended the stream".into()))
            }
            Output::Text(_)
            | Output::Event(_)
            | Output::Resumable { .. }
            | Output::AnswerClose
            | Output::CloseSuperseded
            // WebRTC sessions are never journalled.
            | Output::Negotiate { .. }
            | Output::Park => {}
        }
    }
    Ok(())
}
