//! `sked.v1.LogService`: TailRun, WatchEvents and ListRunEvents. The stream
//! loops live in [`crate::events::tail`]; this file checks access (through
//! [`usecase::runs`]) and maps items to the API.

use std::pin::Pin;
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::codec::{Codec, CompressionEncoding, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::authz::tenant_grant;
use super::codec::BoundaryCodec;
use super::convert::event_to;
use super::{Ctx, invalid, page_size, parse_uuid};
use crate::domain::{FieldViolation, RunEvent, validate_definition_name};
use crate::events::Published;
use crate::events::tail::{self, WatchFilter, WatchItem};
use crate::proto::v1 as pb;
use crate::proto::v1::log_service_server::{LogService, LogServiceServer};
use crate::usecase::{self, Target, runs};

/// Batches buffered per WatchEvents stream before its producer waits for
/// the client: one per bus batch that held any of the stream's events (at
/// most 512 events each, shared with the bus), so a slow subscriber holds
/// at most 8 192 events of its own.
const WATCH_BUFFER: usize = 16;
/// Batches buffered per TailRun stream before its producer waits for the
/// client: live batches are shared with the bus (at most 512 events each),
/// replayed pages at most 1000 events, so a slow subscriber holds at most
/// 16 000 events of its own.
const TAIL_BUFFER: usize = 16;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// One `TailRun` message: an event shared with the bus, sent as its wire
/// encoding made once for every subscriber ([`Published::wire`]), or a
/// message built for this stream alone (a workflow tail names each event's
/// step).
#[derive(Debug)]
pub enum TailFrame {
    /// A run's event as published (or replayed), encoded once.
    Shared(Arc<Published>),
    /// A message of this stream only (boxed: the enum stays two words).
    Own(Box<pb::RunEvent>),
}

impl TailFrame {
    /// The frame as a message (for the generated `LogService` route, which
    /// [`LogRoutes`] serves only when called directly).
    fn into_message(self) -> pb::RunEvent {
        match self {
            TailFrame::Shared(e) => event_to(&e),
            TailFrame::Own(m) => *m,
        }
    }
}

/// The wire encoding of an event as `TailRun` sends it: `event_to`, then
/// prost (the same bytes the generated route would send).
fn encode_event(e: &RunEvent) -> Bytes {
    Bytes::from(event_to(e).encode_to_vec())
}

/// A tail's batches in, one frame per event out. The encoder takes every
/// frame that is ready in one go, so a burst of lines costs few writes
/// and one wake-up per batch.
struct TailStream {
    /// The tenant's and the connection's stream slots, released when the
    /// stream is dropped.
    _permit: Vec<tokio::sync::OwnedSemaphorePermit>,
    rx: mpsc::Receiver<tail::TailItem>,
    buf: std::vec::IntoIter<Arc<Published>>,
}

impl Stream for TailStream {
    type Item = Result<TailFrame, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            if let Some(e) = self.buf.next() {
                return std::task::Poll::Ready(Some(Ok(TailFrame::Shared(e))));
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(Ok(events)) => self.buf = events.into_iter(),
                Some(Err(e)) => {
                    let e = usecase::Error::db(e, &Target::all("run_event"));
                    return std::task::Poll::Ready(Some(Err(e.into())));
                }
                None => return std::task::Poll::Ready(None),
            }
        }
    }
}

/// A workflow tail's batches in, one message per event out, each with its
/// step's name.
struct WorkflowTailStream {
    _permit: Vec<tokio::sync::OwnedSemaphorePermit>,
    rx: mpsc::Receiver<tail::WorkflowTailItem>,
    buf: std::vec::IntoIter<(Arc<str>, Arc<RunEvent>)>,
}

impl Stream for WorkflowTailStream {
    type Item = Result<TailFrame, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            if let Some((step, e)) = self.buf.next() {
                let mut m = event_to(&e);
                m.step = step.to_string();
                return std::task::Poll::Ready(Some(Ok(TailFrame::Own(Box::new(m)))));
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(Ok(events)) => self.buf = events.into_iter(),
                Some(Err(e)) => {
                    let e = usecase::Error::db(e, &Target::all("run_event"));
                    return std::task::Poll::Ready(Some(Err(e.into())));
                }
                None => return std::task::Poll::Ready(None),
            }
        }
    }
}

/// A watcher's batches in, one item per message out (the encoder takes
/// every item that is ready in one go).
struct WatchStream {
    /// The tenant's and the connection's stream slots, released when the
    /// stream is dropped.
    _permit: Vec<tokio::sync::OwnedSemaphorePermit>,
    rx: mpsc::Receiver<Vec<WatchItem>>,
    buf: std::vec::IntoIter<WatchItem>,
}

impl Stream for WatchStream {
    type Item = Result<WatchItem, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            if let Some(item) = self.buf.next() {
                return std::task::Poll::Ready(Some(Ok(item)));
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(items) => self.buf = items.into_iter(),
                None => return std::task::Poll::Ready(None),
            }
        }
    }
}

/// A `WatchEvents` item as the message the generated route sends.
fn watch_message(item: WatchItem) -> pb::WatchEventsResponse {
    match item {
        WatchItem::Event(e) => pb::WatchEventsResponse {
            event: Some(event_to(&e)),
            missed_events: 0,
        },
        WatchItem::Missed(n) => pb::WatchEventsResponse {
            event: None,
            missed_events: n,
        },
    }
}

/// Implements `LogService`.
#[derive(Debug, Clone)]
pub struct Logs(pub Ctx);

impl Logs {
    /// `WatchEvents`: checks the request, then streams the tenant's live
    /// events that pass its filters (see [`tail::watch_events`]).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed `binding_id` or `definition`, or
    /// a `kinds` value that is not an `EventKind`; `RESOURCE_EXHAUSTED`
    /// past the tenant's or connection's stream slots.
    pub async fn open_watch(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<BoxStream<WatchItem>>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let peer = req.remote_addr();
        let r = req.into_inner();
        let binding_id = if r.binding_id.is_empty() {
            None
        } else {
            Some(parse_uuid("binding_id", &r.binding_id)?)
        };
        let definition = if r.definition.is_empty() {
            None
        } else {
            validate_definition_name("definition", &r.definition).map_err(invalid)?;
            Some(r.definition)
        };
        let mut kinds = Vec::new();
        for k in r.kinds {
            if k == pb::EventKind::Notification as i32 {
                kinds.push("notification_delivered");
                kinds.push("notification_failed");
                continue;
            }
            kinds.push(match pb::EventKind::try_from(k) {
                Ok(pb::EventKind::StateChanged) => "state_changed",
                Ok(pb::EventKind::Log) => "log",
                Ok(pb::EventKind::Fired) => "fired",
                Ok(pb::EventKind::Progress) => "progress",
                _ => {
                    return Err(invalid(FieldViolation::new(
                        "kinds",
                        format!("{k} is not an EventKind"),
                    )));
                }
            });
        }
        let permit = self.0.costly.stream_permit(&tenant_id, peer)?;
        let filter = WatchFilter {
            tenant_id,
            binding_id,
            definition,
            kinds,
        };
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(tail::watch_events(
            self.0.core.bus.clone(),
            filter,
            tx,
            self.0.streams_stop.clone(),
        ));
        Ok(Response::new(Box::pin(WatchStream {
            _permit: permit,
            rx,
            buf: Vec::new().into_iter(),
        })))
    }

    /// `TailRun`: checks the request and access, then streams the run's
    /// frames (see [`tail::tail_run`] and [`tail::tail_workflow`]).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed `run_id` or `after_seq` < 0;
    /// `NOT_FOUND` for a run of another tenant or none;
    /// `RESOURCE_EXHAUSTED` past the tenant's or connection's stream slots.
    pub async fn open_tail(
        &self,
        req: Request<pb::TailRunRequest>,
    ) -> Result<Response<BoxStream<TailFrame>>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let peer = req.remote_addr();
        let r = req.into_inner();
        let run_id = parse_uuid("run_id", &r.run_id)?;
        if r.after_seq < 0 {
            return Err(invalid(FieldViolation::new("after_seq", "must be ≥ 0")));
        }
        // Existence and ownership first: another tenant's run is NOT_FOUND.
        let run = runs::get(&self.0.core, &tenant_id, run_id).await?;
        let permit = self.0.costly.stream_permit(&tenant_id, peer)?;
        if matches!(run.handler, crate::domain::Handler::Workflow(_)) {
            // A workflow run: its steps' events too, with their names.
            let (tx, rx) = mpsc::channel(TAIL_BUFFER);
            tokio::spawn(tail::tail_workflow(
                self.0.core.pool.clone(),
                self.0.core.bus.clone(),
                tenant_id,
                run_id,
                r.after_seq,
                r.follow,
                tx,
                self.0.streams_stop.clone(),
            ));
            return Ok(Response::new(Box::pin(WorkflowTailStream {
                _permit: permit,
                rx,
                buf: Vec::new().into_iter(),
            })));
        }
        let (tx, rx) = mpsc::channel(TAIL_BUFFER);
        tokio::spawn(tail::tail_run(
            self.0.core.pool.clone(),
            self.0.core.bus.clone(),
            tenant_id,
            run_id,
            r.after_seq,
            r.follow,
            tx,
            self.0.streams_stop.clone(),
        ));
        Ok(Response::new(Box::pin(TailStream {
            _permit: permit,
            rx,
            buf: Vec::new().into_iter(),
        })))
    }
}

#[tonic::async_trait]
impl LogService for Logs {
    type TailRunStream = BoxStream<pb::RunEvent>;
    type WatchEventsStream = BoxStream<pb::WatchEventsResponse>;

    async fn tail_run(
        &self,
        req: Request<pb::TailRunRequest>,
    ) -> Result<Response<Self::TailRunStream>, Status> {
        let frames = self.open_tail(req).await?;
        Ok(frames.map(|s| -> BoxStream<pb::RunEvent> {
            Box::pin(s.map(|f| f.map(TailFrame::into_message)))
        }))
    }

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let items = self.open_watch(req).await?;
        Ok(items.map(|s| -> BoxStream<pb::WatchEventsResponse> {
            Box::pin(s.map(|i| i.map(watch_message)))
        }))
    }

    async fn list_run_events(
        &self,
        req: Request<pb::ListRunEventsRequest>,
    ) -> Result<Response<pb::ListRunEventsResponse>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let run_id = parse_uuid("run_id", &r.run_id)?;
        if r.after_seq < 0 {
            return Err(invalid(FieldViolation::new("after_seq", "must be ≥ 0")));
        }
        let limit = page_size(r.page_size, 1000)?;
        let events =
            runs::list_events(&self.0.core, &tenant_id, run_id, r.after_seq, limit).await?;
        let next_after_seq = if events.len() as i64 == limit {
            events.last().map_or(0, |e| e.seq)
        } else {
            0
        };
        Ok(Response::new(pb::ListRunEventsResponse {
            events: events.iter().map(event_to).collect(),
            next_after_seq,
        }))
    }
}

/// The path of `TailRun`, which [`LogRoutes`] serves itself.
const TAIL_RUN_PATH: &str = "/sked.v1.LogService/TailRun";
/// The path of `WatchEvents`, which [`LogRoutes`] serves itself.
const WATCH_EVENTS_PATH: &str = "/sked.v1.LogService/WatchEvents";

/// `LogService` as served: `TailRun` with [`TailFrameCodec`] and
/// `WatchEvents` with [`WatchItemCodec`], so each event is encoded once
/// for all the streams of both that send it rather than converted and
/// encoded per subscriber; every other method through the generated
/// server. Both take and send gzip and zstd and cap decoded requests at
/// `max_decoded` bytes, as the transport configures every generated
/// service (`tests/it/compression.rs` checks every route).
#[derive(Debug, Clone)]
pub struct LogRoutes {
    logs: Logs,
    generated: LogServiceServer<Logs>,
    max_decoded: usize,
}

impl LogRoutes {
    /// `TailRun` served by `logs`, every other method by `generated` (the
    /// generated server of the same `logs`, configured by the transport).
    pub fn new(logs: Logs, generated: LogServiceServer<Logs>, max_decoded: usize) -> Self {
        Self {
            logs,
            generated,
            max_decoded,
        }
    }
}

impl NamedService for LogRoutes {
    const NAME: &'static str = <LogServiceServer<Logs> as NamedService>::NAME;
}

impl Service<http::Request<tonic::body::Body>> for LogRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let logs = self.logs.clone();
        let max_decoded = self.max_decoded;
        match req.uri().path() {
            TAIL_RUN_PATH => Box::pin(async move {
                let mut grpc = compressed(tonic::server::Grpc::new(TailFrameCodec), max_decoded);
                let method = tower::service_fn(move |r: Request<pb::TailRunRequest>| {
                    let logs = logs.clone();
                    async move { logs.open_tail(r).await }
                });
                Ok(grpc.server_streaming(method, req).await)
            }),
            WATCH_EVENTS_PATH => Box::pin(async move {
                let mut grpc = compressed(tonic::server::Grpc::new(WatchItemCodec), max_decoded);
                let method = tower::service_fn(move |r: Request<pb::WatchEventsRequest>| {
                    let logs = logs.clone();
                    async move { logs.open_watch(r).await }
                });
                Ok(grpc.server_streaming(method, req).await)
            }),
            _ => self.generated.call(req),
        }
    }
}

/// `grpc` configured as the transport configures every generated service:
/// takes and sends gzip and zstd, caps decoded requests at `max_decoded`
/// bytes.
fn compressed<C: Codec>(
    grpc: tonic::server::Grpc<C>,
    max_decoded: usize,
) -> tonic::server::Grpc<C> {
    grpc.accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(max_decoded)
}

/// `TailRun`'s codec: requests decoded and checked as by
/// [`BoundaryCodec`], responses written from [`TailFrame`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct TailFrameCodec;

impl Codec for TailFrameCodec {
    type Encode = TailFrame;
    type Decode = pb::TailRunRequest;
    type Encoder = TailFrameEncoder;
    type Decoder = <BoundaryCodec<pb::RunEvent, pb::TailRunRequest> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        TailFrameEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundaryCodec::<pb::RunEvent, pb::TailRunRequest>::default().decoder()
    }
}

/// Writes a [`TailFrame`]: a shared event's cached encoding (made on first
/// use), or the stream's own message.
#[derive(Debug, Clone, Copy, Default)]
pub struct TailFrameEncoder;

impl Encoder for TailFrameEncoder {
    type Item = TailFrame;
    type Error = Status;

    fn encode(&mut self, item: TailFrame, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            TailFrame::Shared(e) => {
                dst.put_slice(e.wire(encode_event));
                Ok(())
            }
            // EncodeBuf grows as needed, so prost cannot run out of room.
            TailFrame::Own(m) => m
                .encode(dst)
                .map_err(|_| Status::internal("a stream message could not be encoded")),
        }
    }
}

/// `WatchEvents`' codec: requests decoded and checked as by
/// [`BoundaryCodec`], responses written from [`WatchItem`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchItemCodec;

impl Codec for WatchItemCodec {
    type Encode = WatchItem;
    type Decode = pb::WatchEventsRequest;
    type Encoder = WatchItemEncoder;
    type Decoder =
        <BoundaryCodec<pb::WatchEventsResponse, pb::WatchEventsRequest> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        WatchItemEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundaryCodec::<pb::WatchEventsResponse, pb::WatchEventsRequest>::default().decoder()
    }
}

/// Writes a [`WatchItem`] as a `WatchEventsResponse`: an event as field 1
/// around its shared `RunEvent` encoding ([`Published::wire`], made once
/// for every `TailRun` and `WatchEvents` stream that sends it), a count of
/// missed events as prost writes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchItemEncoder;

/// The key of `WatchEventsResponse.event`: field 1, length-delimited.
const WATCH_EVENT_KEY: u8 = 1 << 3 | 2;

impl Encoder for WatchItemEncoder {
    type Item = WatchItem;
    type Error = Status;

    fn encode(&mut self, item: WatchItem, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // EncodeBuf grows as needed, so prost cannot run out of room.
        put_watch_item(item, dst)
            .map_err(|_| Status::internal("a stream message could not be encoded"))
    }
}

/// Writes `item` into `dst` as [`WatchItemEncoder`] does.
fn put_watch_item(item: WatchItem, dst: &mut impl BufMut) -> Result<(), prost::EncodeError> {
    match item {
        WatchItem::Event(e) => {
            let wire = e.wire(encode_event);
            dst.put_u8(WATCH_EVENT_KEY);
            prost::encoding::encode_varint(wire.len() as u64, dst);
            dst.put_slice(wire);
            Ok(())
        }
        WatchItem::Missed(_) => watch_message(item).encode(dst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventBody, LogStream, RunState};

    fn event(seq: i64, body: EventBody) -> RunEvent {
        RunEvent {
            run_id: uuid::Uuid::now_v7(),
            seq,
            time: chrono::Utc::now(),
            tenant_id: "acme".into(),
            binding_id: uuid::Uuid::now_v7(),
            definition: "ops.backup".into(),
            body,
        }
    }

    #[test]
    fn a_shared_frame_is_the_message_the_generated_route_would_send() {
        for e in [
            event(
                1,
                EventBody::StateChanged {
                    from: Some(RunState::Queued),
                    to: RunState::Running,
                    reason: "claimed".into(),
                },
            ),
            event(
                2,
                EventBody::Log {
                    stream: LogStream::Stderr,
                    message: "héllo\u{1F600}".into(),
                },
            ),
            event(
                3,
                EventBody::Fired {
                    params: serde_json::json!({"a": [1, "x", null], "b": {"c": true}}),
                },
            ),
        ] {
            let p = Published::new(e);
            let wire = p.wire(encode_event).clone();
            let decoded = pb::RunEvent::decode(wire.as_ref()).expect("decodes");
            assert_eq!(decoded, event_to(&p));
            assert_eq!(TailFrame::Shared(Arc::new(p)).into_message(), decoded);
        }
    }

    /// What `WatchItemEncoder` writes for `item`.
    fn watch_bytes(item: WatchItem) -> Vec<u8> {
        let mut buf = Vec::new();
        put_watch_item(item, &mut buf).expect("encodes");
        buf
    }

    #[test]
    fn a_watch_item_is_the_message_the_generated_route_would_send() {
        // Long enough that the event's length takes a two-byte varint.
        let long = "x".repeat(300);
        for e in [
            event(
                1,
                EventBody::Fired {
                    params: serde_json::json!({"a": [1, "x", null], "b": {"c": true}}),
                },
            ),
            event(
                2,
                EventBody::Log {
                    stream: LogStream::Stdout,
                    message: long.clone(),
                },
            ),
        ] {
            let p = Arc::new(Published::new(e));
            let wire = watch_bytes(WatchItem::Event(Arc::clone(&p)));
            let expected = watch_message(WatchItem::Event(Arc::clone(&p)));
            assert_eq!(wire, expected.encode_to_vec(), "byte for byte");
            assert_eq!(
                pb::WatchEventsResponse::decode(wire.as_slice()).expect("decodes"),
                expected
            );
            // The event's encoding is the one TailRun sends.
            assert_eq!(
                p.wire(|_| panic!("encoded a second time")),
                &encode_event(&p)
            );
        }
        for n in [0, 1, 300, u64::MAX] {
            let wire = watch_bytes(WatchItem::Missed(n));
            assert_eq!(
                pb::WatchEventsResponse::decode(wire.as_slice()).expect("decodes"),
                pb::WatchEventsResponse {
                    event: None,
                    missed_events: n
                }
            );
        }
    }

    #[test]
    fn an_event_is_encoded_once_however_many_streams_send_it() {
        let p = Published::new(event(
            1,
            EventBody::Log {
                stream: LogStream::Stdout,
                message: "line".into(),
            },
        ));
        let mut calls = 0;
        let first = p
            .wire(|e| {
                calls += 1;
                encode_event(e)
            })
            .clone();
        for _ in 0..3 {
            let again = p.wire(|_| panic!("encoded a second time"));
            assert_eq!(*again, first);
        }
        assert_eq!(calls, 1);
    }
}
