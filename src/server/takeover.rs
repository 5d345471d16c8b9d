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

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::auth::constant_time_eq;
use super::journaling::Journaling;
use super::resume::ResumeError;
use super::session::{SessionEnv, Suspended};
use crate::cluster::{journal, sessions::token_hash, Cluster, ClusterError};
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
    let give_up_at = tokio::time::Instant::now() + cluster.lease() + Duration::from_secs(1);
    // An owner that released the session (shutting down) left no owner.
    while !record.owner.is_empty()
        && cluster
            .node_alive(&record.owner, &record.owner_instance)
            .await?
    {
        if tokio::time::Instant::now() >= give_up_at {
            return Err(ResumeError::Busy(session_id.to_owned()).into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
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
            | Output::Park => {}
        }
    }
    Ok(())
}
