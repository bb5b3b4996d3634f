//! One agent stream (`Telemetry.Stream`): Hello, batches in, acks out.
//!
//! The handler returns the response stream at once and runs the session in a
//! task, so an agent may send `Hello` before or after it starts reading.
//! Batches are read while fewer than `credit` of them await their commit: the
//! window is what lets the agent pipeline, and what bounds this stream's
//! share of memory. Acks leave strictly in batch order, each only after its
//! batch's commit completed.
//!
//! One active stream per agent: a new stream's `Hello` supersedes the old
//! stream, and the new one answers `HelloAck` only after the old one has
//! ended and all its commits completed, so `stored_through` is exact and the
//! agent's batches reach the committer in seq order.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgefleet_proto::batch_zstd::{self, BatchDecompressor, BatchZstdError, KeptFrames};
use edgefleet_proto::encoded::telemetry_server::Telemetry;
use edgefleet_proto::encoded::{
    check_record, AgentFrame as AgentMessage, AgentFrameKind as In, EncodedBatch,
};
use edgefleet_proto::ingest_message::Kind as Out;
use edgefleet_proto::{Ack, GoAway, Hello, HelloAck, IngestMessage, PROTOCOL_REVISION};
use tokio::sync::{mpsc, oneshot, OwnedMutexGuard, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::committer::{CommitError, CommitOutcome, Committer, Submission};
use crate::metrics::{Metrics, Reject};
use crate::sink::{EncodedRecord, Sink};
use crate::tls::AgentConnectInfo;

/// How long the end of a session may spend delivering its last acks to an
/// agent that has stopped reading.
const FINISH_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The protocol knobs a session needs (see [`crate::IngestConfig`]).
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub credit: u32,
    pub max_message_bytes: usize,
    pub heartbeat_interval: Duration,
    pub idle_timeout: Duration,
    pub hello_timeout: Duration,
    pub goaway_retry_after: Duration,
    /// Plaintext dev mode: the agent id comes from `Hello`.
    pub trust_hello: bool,
}

/// State shared by all sessions.
pub struct Shared {
    pub settings: SessionSettings,
    pub sink: Arc<dyn Sink>,
    pub committer: Committer,
    pub metrics: Arc<Metrics>,
    /// The global byte budget of received-but-uncommitted batches.
    pub budget: Arc<Semaphore>,
    pub budget_bytes: usize,
    /// Cancelled when the server starts draining.
    pub drain: CancellationToken,
    /// Every session task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    slots: AgentSlots,
    next_session: AtomicU64,
}

impl Shared {
    pub fn new(
        settings: SessionSettings,
        sink: Arc<dyn Sink>,
        committer: Committer,
        metrics: Arc<Metrics>,
        budget_bytes: usize,
        drain: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        let budget_bytes = budget_bytes.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            settings,
            sink,
            committer,
            metrics,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            drain,
            tasks,
            slots: AgentSlots::default(),
            next_session: AtomicU64::new(1),
        }
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct TelemetryService {
    shared: Arc<Shared>,
}

impl TelemetryService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    type StreamStream = ReceiverStream<Result<IngestMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let info = request
            .extensions()
            .get::<AgentConnectInfo>()
            .cloned()
            .ok_or_else(|| Status::internal("the connection carries no identity"))?;
        if self.shared.drain.is_cancelled() {
            return Err(Status::unavailable("the ingest is shutting down"));
        }
        let inbound = request.into_inner();
        // Room for HelloAck, a full window of acks and the final GoAway: a
        // well-behaved agent never makes the session wait to send.
        let (tx, rx) = mpsc::channel(self.shared.settings.credit as usize + 2);
        let shared = self.shared.clone();
        let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
        self.shared
            .tasks
            .spawn(run_session(shared, id, info, inbound, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Which stream is current for each agent. An entry per agent seen since
/// start (a few bytes each); the lock is held by the agent's live session.
#[derive(Default)]
struct AgentSlots {
    slots: Mutex<HashMap<String, Slot>>,
}

struct Slot {
    session: u64,
    superseded: CancellationToken,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl AgentSlots {
    /// Makes `session` the agent's current stream, telling the previous one
    /// to end. Returns the token that tells this one, and the lock to hold.
    fn claim(&self, agent: &str, session: u64) -> (CancellationToken, Arc<tokio::sync::Mutex<()>>) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let superseded = CancellationToken::new();
        let slot = slots.entry(agent.to_string()).or_insert_with(|| Slot {
            session,
            superseded: CancellationToken::new(),
            lock: Arc::new(tokio::sync::Mutex::new(())),
        });
        slot.superseded.cancel();
        slot.session = session;
        slot.superseded = superseded.clone();
        (superseded, slot.lock.clone())
    }
}

/// Why the read loop stopped.
enum End {
    /// The agent closed its side (possibly after `Goodbye`).
    Closed,
    /// The agent vanished (reset, disconnect); nobody to tell anything.
    Gone,
    Drain,
    Superseded,
    Fail(Status),
}

enum Event {
    Drain,
    Superseded,
    Committed(Result<CommitOutcome, CommitError>),
    Idle,
    Inbound(Result<Option<AgentMessage>, Status>),
}

struct Pending {
    acked_through: u64,
    done: oneshot::Receiver<Result<CommitOutcome, CommitError>>,
}

struct Session {
    shared: Arc<Shared>,
    id: u64,
    agent: Arc<str>,
    peer: SocketAddr,
    tx: mpsc::Sender<Result<IngestMessage, Status>>,
    superseded: CancellationToken,
    pending: VecDeque<Pending>,
    /// Highest seq this stream has sent (0 before any): batches must go above it.
    last_seen: u64,
    /// What an empty batch acknowledges: everything known stored.
    floor: u64,
    failed: Arc<AtomicBool>,
    /// An ack the read loop could not hand over before it was told to stop.
    unsent: Option<IngestMessage>,
    batches: u64,
    stored: u64,
    duplicates: u64,
}

async fn run_session(
    shared: Arc<Shared>,
    id: u64,
    info: AgentConnectInfo,
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<IngestMessage, Status>>,
) {
    let peer = info.remote_addr;
    let hello = match read_hello(&shared, &mut inbound).await {
        Ok(Some(hello)) => hello,
        Ok(None) => {
            if shared.drain.is_cancelled() {
                let _ = tx.try_send(Ok(go_away(&shared.settings, "the ingest is shutting down")));
            }
            return;
        }
        Err((reject, status)) => {
            warn!(session = id, %peer, cert = ?info.principal, reason = reject.label(), error = %status.message(), "stream rejected");
            shared.metrics.reject(reject);
            let _ = tx.try_send(Err(status));
            return;
        }
    };
    let agent = match identify(&shared.settings, &info, &hello) {
        Ok(agent) => agent,
        Err((reject, status)) => {
            warn!(session = id, %peer, cert = ?info.principal, claimed = %hello.agent_id, reason = reject.label(), error = %status.message(), "stream rejected");
            shared.metrics.reject(reject);
            let _ = tx.try_send(Err(status));
            return;
        }
    };

    let (superseded, lock) = shared.slots.claim(&agent, id);
    // Wait for the agent's previous stream to finish its commits.
    let guard: OwnedMutexGuard<()> = tokio::select! {
        guard = lock.lock_owned() => guard,
        _ = superseded.cancelled() => {
            let _ = tx.try_send(Err(superseded_status(&agent)));
            return;
        }
        _ = shared.drain.cancelled() => {
            let _ = tx.try_send(Ok(go_away(&shared.settings, "the ingest is shutting down")));
            return;
        }
    };
    shared.metrics.connected_agents.inc();
    let mut session = Session {
        shared: shared.clone(),
        id,
        agent: agent.into(),
        peer,
        tx,
        superseded,
        pending: VecDeque::new(),
        last_seen: 0,
        floor: 0,
        failed: Arc::new(AtomicBool::new(false)),
        unsent: None,
        batches: 0,
        stored: 0,
        duplicates: 0,
    };
    session.run(&hello, &mut inbound).await;
    shared.metrics.connected_agents.dec();
    drop(guard);
}

/// The first message, which must be `Hello`, within the hello deadline.
async fn read_hello(
    shared: &Shared,
    inbound: &mut Streaming<AgentMessage>,
) -> Result<Option<Hello>, (Reject, Status)> {
    let timeout = shared.settings.hello_timeout;
    let first = tokio::select! {
        _ = shared.drain.cancelled() => return Ok(None),
        first = tokio::time::timeout(timeout, inbound.message()) => first,
    };
    match first {
        Err(_) => Err((
            Reject::HelloTimeout,
            Status::deadline_exceeded(format!("no Hello within {timeout:?}")),
        )),
        Ok(Err(status)) => match inbound_failure(shared, status) {
            Some(failure) => Err(failure),
            None => Ok(None),
        },
        Ok(Ok(None)) => Ok(None),
        Ok(Ok(Some(AgentMessage {
            kind: Some(In::Hello(hello)),
        }))) => Ok(Some(hello)),
        Ok(Ok(Some(other))) => Err((
            Reject::NoHello,
            Status::invalid_argument(format!(
                "the first message must be Hello, got {}",
                kind_name(&other)
            )),
        )),
    }
}

/// The agent id of this stream: from the certificate, checked against what
/// `Hello` claims; from `Hello` only in plaintext dev mode.
fn identify(
    settings: &SessionSettings,
    info: &AgentConnectInfo,
    hello: &Hello,
) -> Result<String, (Reject, Status)> {
    if hello.protocol_revision > PROTOCOL_REVISION {
        return Err((
            Reject::UnsupportedRevision,
            Status::failed_precondition(format!(
                "protocol revision {} is not supported; this ingest speaks revision {PROTOCOL_REVISION}",
                hello.protocol_revision
            )),
        ));
    }
    match &info.principal {
        Some(principal) => principal.authorise(&hello.agent_id).map_err(|e| {
            (
                Reject::IdentityMismatch,
                Status::permission_denied(e.to_string()),
            )
        }),
        None if settings.trust_hello => match edgefleet_pki::check_agent_id(&hello.agent_id) {
            Ok(()) => Ok(hello.agent_id.clone()),
            Err(e) => Err((
                Reject::BadAgentId,
                Status::invalid_argument(format!("Hello.agent_id: {e}")),
            )),
        },
        None => Err((
            Reject::NoIdentity,
            Status::unauthenticated("the connection has no client certificate"),
        )),
    }
}

impl Session {
    async fn run(&mut self, hello: &Hello, inbound: &mut Streaming<AgentMessage>) {
        let sink = self.shared.sink.clone();
        let agent = self.agent.clone();
        let stored_through = match tokio::task::spawn_blocking(move || sink.stored_through(&agent))
            .await
        {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                warn!(session = self.id, agent = %self.agent, error = %e, "cannot read stored_through");
                let _ = self
                    .tx
                    .try_send(Err(Status::unavailable(format!("store unavailable: {e}"))));
                return;
            }
            Err(e) => {
                let _ = self
                    .tx
                    .try_send(Err(Status::internal(format!("stored_through: {e}"))));
                return;
            }
        };
        self.floor = stored_through;
        let settings = &self.shared.settings;
        let ack = HelloAck {
            stored_through,
            credit: settings.credit,
            max_message_bytes: u32::try_from(settings.max_message_bytes).unwrap_or(u32::MAX),
            ingest_version: env!("CARGO_PKG_VERSION").to_string(),
            agent_id: self.agent.to_string(),
            heartbeat_interval_ms: u32::try_from(settings.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            batch_encodings: vec![batch_zstd::ENCODING.into()],
        };
        info!(
            session = self.id,
            agent = %self.agent,
            peer = %self.peer,
            agent_version = %hello.agent_version,
            config_hash = %hello.config_hash,
            buffer_epoch = hello.buffer_epoch,
            buffer_anchored = hello.buffer_anchored,
            next_seq = hello.next_seq,
            stored_through,
            "session started"
        );
        if self.tx.send(Ok(message(Out::HelloAck(ack)))).await.is_err() {
            return;
        }

        let end = self.read_loop(inbound).await;
        self.finish(end).await;
    }

    async fn read_loop(&mut self, inbound: &mut Streaming<AgentMessage>) -> End {
        let idle = self.shared.settings.idle_timeout;
        let credit = self.shared.settings.credit.max(1) as usize;
        let mut deadline = Instant::now() + idle;
        loop {
            let can_read = self.pending.len() < credit;
            let event = tokio::select! {
                biased;
                _ = self.shared.drain.cancelled() => Event::Drain,
                _ = self.superseded.cancelled() => Event::Superseded,
                done = next_commit(&mut self.pending) => Event::Committed(done),
                _ = tokio::time::sleep_until(deadline) => Event::Idle,
                msg = inbound.message(), if can_read => Event::Inbound(msg),
            };
            match event {
                Event::Drain => return End::Drain,
                Event::Superseded => return End::Superseded,
                Event::Idle => {
                    self.shared.metrics.reject(Reject::IdleTimeout);
                    return End::Fail(Status::deadline_exceeded(format!(
                        "no batch or heartbeat for {idle:?}"
                    )));
                }
                Event::Committed(result) => {
                    let Some(pending) = self.pending.pop_front() else {
                        continue;
                    };
                    let ack = match self.ack(pending.acked_through, result) {
                        Ok(ack) => ack,
                        Err(status) => return End::Fail(status),
                    };
                    // The agent cannot send while waiting for this ack.
                    deadline = deadline.max(Instant::now() + idle);
                    if let Some(end) = self.send_in_loop(ack).await {
                        return end;
                    }
                }
                Event::Inbound(Ok(Some(msg))) => {
                    deadline = Instant::now() + idle;
                    match msg.kind {
                        Some(In::Batch(batch)) => {
                            if let Err((reject, status)) = self.accept_batch(batch).await {
                                warn!(session = self.id, agent = %self.agent, reason = reject.label(), error = %status.message(), "batch refused");
                                self.shared.metrics.reject(reject);
                                return End::Fail(status);
                            }
                        }
                        // Heartbeats only keep the stream alive.
                        Some(In::Heartbeat(_)) => {}
                        Some(In::Goodbye(bye)) => {
                            debug!(session = self.id, agent = %self.agent, reason = %bye.reason, "goodbye");
                            return End::Closed;
                        }
                        Some(In::Hello(_)) => {
                            self.shared.metrics.reject(Reject::ProtocolViolation);
                            return End::Fail(Status::invalid_argument(
                                "a second Hello on the same stream",
                            ));
                        }
                        // A message kind from a newer revision: ignore, as agents ignore unknown commands.
                        None => {}
                    }
                }
                Event::Inbound(Ok(None)) => return End::Closed,
                Event::Inbound(Err(status)) => {
                    return match inbound_failure(&self.shared, status) {
                        Some((reject, status)) => {
                            warn!(session = self.id, agent = %self.agent, reason = reject.label(), error = %status.message(), "stream failed");
                            self.shared.metrics.reject(reject);
                            End::Fail(status)
                        }
                        None => End::Gone,
                    };
                }
            }
        }
    }

    /// Validates a batch, waits for budget, and queues it for commit.
    async fn accept_batch(&mut self, batch: EncodedBatch) -> Result<(), (Reject, Status)> {
        let (batch, kept) = open_batch(
            batch,
            self.shared.settings.max_message_bytes,
            &self.shared.metrics,
        )?;
        let bytes: usize = batch.records.iter().map(|r| r.len() + 4).sum();
        let mut previous = self.last_seen;
        let mut records = Vec::with_capacity(batch.records.len());
        for (index, encoded) in batch.records.into_iter().enumerate() {
            // Records are stored as they arrived, so each is checked here:
            // what is stored always decodes when it is read back.
            let seq = check_record(&encoded).map_err(|e| {
                (
                    Reject::MalformedRecord,
                    Status::invalid_argument(format!(
                        "record {index} of the batch (after seq {previous}) is malformed: {e}"
                    )),
                )
            })?;
            if seq == 0 {
                return Err((
                    Reject::BadSequence,
                    Status::invalid_argument(
                        "record seq 0 is invalid: sequence numbers start at 1",
                    ),
                ));
            }
            if seq <= previous {
                return Err((
                    Reject::BadSequence,
                    Status::invalid_argument(format!(
                        "record seq {seq} is not above {previous}: seqs must strictly increase within a batch and across the batches of a stream"
                    )),
                ));
            }
            previous = seq;
            records.push(EncodedRecord { seq, encoded });
        }
        let (done_tx, done) = oneshot::channel();
        let Some(last) = records.last().map(|r| r.seq) else {
            // Nothing to store; acknowledge (in order) what is known stored.
            let _ = done_tx.send(Ok(CommitOutcome {
                stored: 0,
                duplicates: 0,
            }));
            self.pending.push_back(Pending {
                acked_through: self.floor.max(self.last_seen),
                done,
            });
            return Ok(());
        };
        self.last_seen = last;
        // Waiting here stops this stream's reads: HTTP/2 flow control then
        // pushes back on the agent until commits free budget.
        let want = bytes
            .clamp(1, self.shared.budget_bytes)
            .min(u32::MAX as usize) as u32;
        let permit = self
            .shared
            .budget
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| {
                (
                    Reject::ProtocolViolation,
                    Status::unavailable("the ingest is shutting down"),
                )
            })?;
        self.shared.committer.submit(Submission {
            agent: self.agent.clone(),
            records,
            kept,
            bytes,
            failed: self.failed.clone(),
            permit: Some(permit),
            done: done_tx,
        });
        self.pending.push_back(Pending {
            acked_through: last,
            done,
        });
        Ok(())
    }

    fn ack(
        &mut self,
        acked_through: u64,
        result: Result<CommitOutcome, CommitError>,
    ) -> Result<IngestMessage, Status> {
        match result {
            Ok(outcome) => {
                self.batches += 1;
                self.stored += u64::from(outcome.stored);
                self.duplicates += u64::from(outcome.duplicates);
                self.floor = self.floor.max(acked_through);
                Ok(message(Out::Ack(Ack {
                    acked_through,
                    credit: 1,
                    stored: outcome.stored,
                    duplicates: outcome.duplicates,
                })))
            }
            Err(e) => {
                warn!(session = self.id, agent = %self.agent, error = %e, "commit failed; closing the stream");
                Err(Status::unavailable(format!("{e}; reconnect and resend")))
            }
        }
    }

    /// Sends during the read loop without ever blocking a drain or a
    /// supersede: a message that could not be handed over is kept for `finish`.
    async fn send_in_loop(&mut self, msg: IngestMessage) -> Option<End> {
        let idle = self.shared.settings.idle_timeout;
        let tx = self.tx.clone();
        let permit = tokio::select! {
            permit = tx.reserve() => permit,
            _ = self.shared.drain.cancelled() => {
                self.unsent = Some(msg);
                return Some(End::Drain);
            }
            _ = self.superseded.cancelled() => {
                self.unsent = Some(msg);
                return Some(End::Superseded);
            }
            _ = tokio::time::sleep(idle) => {
                self.shared.metrics.reject(Reject::IdleTimeout);
                return Some(End::Fail(Status::deadline_exceeded(format!(
                    "the agent read nothing for {idle:?}"
                ))));
            }
        };
        match permit {
            Ok(permit) => {
                permit.send(Ok(msg));
                None
            }
            Err(_) => Some(End::Gone),
        }
    }

    /// Ends the session: every batch already received is committed and (if
    /// anyone is listening) acknowledged, then the final word is sent.
    async fn finish(&mut self, end: End) {
        let listening = !matches!(end, End::Gone);
        let until = Instant::now() + FINISH_SEND_TIMEOUT;
        let mut failure = None;
        if let Some(msg) = self.unsent.take() {
            self.send_until(msg, until).await;
        }
        while let Some(pending) = self.pending.pop_front() {
            // Always wait: the agent's next stream must not start until these
            // commits are done.
            let result = pending.done.await.unwrap_or(Err(CommitError::Stopped));
            if failure.is_some() || !listening {
                continue;
            }
            match self.ack(pending.acked_through, result) {
                Ok(ack) => self.send_until(ack, until).await,
                Err(status) => failure = Some(status),
            }
        }
        let last = match (failure, end) {
            (Some(status), _) => Some(Err(status)),
            (None, End::Closed | End::Gone) => None,
            (None, End::Drain) => Some(Ok(go_away(
                &self.shared.settings,
                "the ingest is shutting down",
            ))),
            (None, End::Superseded) => Some(Err(superseded_status(&self.agent))),
            (None, End::Fail(status)) => Some(Err(status)),
        };
        let how = match &last {
            None => "closed".to_string(),
            Some(Ok(_)) => "go_away".to_string(),
            Some(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
        };
        if let (Some(last), true) = (last, listening) {
            self.send_until_result(last, until).await;
        }
        info!(
            session = self.id,
            agent = %self.agent,
            peer = %self.peer,
            batches = self.batches,
            stored = self.stored,
            duplicates = self.duplicates,
            end = %how,
            "session ended"
        );
    }

    async fn send_until(&self, msg: IngestMessage, until: Instant) {
        self.send_until_result(Ok(msg), until).await;
    }

    async fn send_until_result(&self, item: Result<IngestMessage, Status>, until: Instant) {
        let _ = tokio::time::timeout_at(until, self.tx.send(item)).await;
    }
}

/// The next commit result in batch order; never ready without pending batches.
async fn next_commit(pending: &mut VecDeque<Pending>) -> Result<CommitOutcome, CommitError> {
    match pending.front_mut() {
        Some(p) => (&mut p.done).await.unwrap_or(Err(CommitError::Stopped)),
        None => std::future::pending().await,
    }
}

/// Sorts an error from the inbound stream into one to report back (with the
/// protocol's status code), or `None` for an agent that has gone away.
fn inbound_failure(shared: &Shared, status: Status) -> Option<(Reject, Status)> {
    match status.code() {
        // tonic reports an oversized message as OUT_OF_RANGE (or
        // RESOURCE_EXHAUSTED when it was compressed); the protocol promises
        // RESOURCE_EXHAUSTED either way.
        Code::OutOfRange | Code::ResourceExhausted => Some((
            Reject::MessageTooLarge,
            Status::resource_exhausted(format!(
                "message larger than the {}-byte limit: {}",
                shared.settings.max_message_bytes,
                status.message()
            )),
        )),
        Code::Internal if status.message().contains("decode") => Some((
            Reject::ProtocolViolation,
            Status::invalid_argument(status.message().to_string()),
        )),
        _ => {
            debug!(code = ?status.code(), message = %status.message(), "inbound stream ended");
            None
        }
    }
}

fn superseded_status(agent: &str) -> Status {
    Status::aborted(format!("superseded by a newer stream from agent {agent}"))
}

fn go_away(settings: &SessionSettings, reason: &str) -> IngestMessage {
    message(Out::GoAway(GoAway {
        reason: reason.to_string(),
        retry_after_ms: u32::try_from(settings.goaway_retry_after.as_millis()).unwrap_or(u32::MAX),
    }))
}

fn message(kind: Out) -> IngestMessage {
    IngestMessage { kind: Some(kind) }
}

fn kind_name(msg: &AgentMessage) -> &'static str {
    match msg.kind {
        Some(In::Hello(_)) => "Hello",
        Some(In::Batch(_)) => "RecordBatch",
        Some(In::Heartbeat(_)) => "Heartbeat",
        Some(In::Goodbye(_)) => "Goodbye",
        None => "an empty message",
    }
}

thread_local! {
    /// One zstd context per worker thread, not per stream: thousands of
    /// streams would each hold ~100 KiB. Batches are opened without an
    /// `.await`, so a thread's context serves one batch at a time.
    static DECOMPRESSOR: std::cell::RefCell<Option<BatchDecompressor>> =
        const { std::cell::RefCell::new(None) };
}

/// The batch with its records decompressed when the agent compressed them,
/// and the agent's frames when the store may keep them.
fn open_batch(
    batch: EncodedBatch,
    limit: usize,
    metrics: &Metrics,
) -> Result<(EncodedBatch, Option<KeptFrames>), (Reject, Status)> {
    if batch.records_zstd.is_empty() {
        return Ok((batch, None));
    }
    metrics.batches_compressed.inc();
    DECOMPRESSOR.with_borrow_mut(|slot| {
        let decompressor = match slot {
            Some(d) => d,
            None => slot.insert(BatchDecompressor::new().map_err(|e| {
                (
                    Reject::ProtocolViolation,
                    Status::resource_exhausted(format!("no zstd context: {e}")),
                )
            })?),
        };
        decompressor
            .open_keeping_frames(batch, limit)
            .map_err(|e| match e {
                BatchZstdError::TooLarge { .. } => (
                    Reject::MessageTooLarge,
                    Status::resource_exhausted(e.to_string()),
                ),
                e => (
                    Reject::MalformedRecord,
                    Status::invalid_argument(e.to_string()),
                ),
            })
    })
}
