//! `sked.v1.LogService`: TailRun, WatchEvents and ListRunEvents. The stream
//! loops live in [`crate::events::tail`]; this file checks access (through
//! [`usecase::runs`]) and maps items to the API.

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::authz::tenant_grant;
use super::convert::event_to;
use super::{Ctx, invalid, page_size, parse_uuid};
use crate::domain::{FieldViolation, validate_definition_name};
use crate::events::tail::{self, WatchFilter, WatchItem};
use crate::proto::v1 as pb;
use crate::proto::v1::log_service_server::LogService;
use crate::usecase::{self, Target, runs};

/// Items buffered per WatchEvents stream before the producer waits for the
/// client.
const STREAM_BUFFER: usize = 256;
/// Batches buffered per TailRun stream before its producer waits for the
/// client: live batches are shared with the bus (at most 512 events each),
/// replayed pages at most 1000 events, so a slow subscriber holds at most
/// 16 000 events of its own.
const TAIL_BUFFER: usize = 16;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A tail's batches in, one message per event out. The encoder takes every
/// message that is ready in one go, so a burst of lines costs few writes
/// and one wake-up per batch.
struct TailStream {
    /// The tenant's and the connection's stream slots, released when the
    /// stream is dropped.
    _permit: Vec<tokio::sync::OwnedSemaphorePermit>,
    rx: mpsc::Receiver<tail::TailItem>,
    buf: std::vec::IntoIter<std::sync::Arc<crate::domain::RunEvent>>,
}

impl Stream for TailStream {
    type Item = Result<pb::RunEvent, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            if let Some(e) = self.buf.next() {
                return std::task::Poll::Ready(Some(Ok(event_to(&e))));
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
    buf: std::vec::IntoIter<(std::sync::Arc<str>, std::sync::Arc<crate::domain::RunEvent>)>,
}

impl Stream for WorkflowTailStream {
    type Item = Result<pb::RunEvent, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            if let Some((step, e)) = self.buf.next() {
                let mut m = event_to(&e);
                m.step = step.to_string();
                return std::task::Poll::Ready(Some(Ok(m)));
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

/// Implements `LogService`.
#[derive(Debug, Clone)]
pub struct Logs(pub Ctx);

#[tonic::async_trait]
impl LogService for Logs {
    type TailRunStream = BoxStream<pb::RunEvent>;
    type WatchEventsStream = BoxStream<pb::WatchEventsResponse>;

    async fn tail_run(
        &self,
        req: Request<pb::TailRunRequest>,
    ) -> Result<Response<Self::TailRunStream>, Status> {
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

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
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
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(tail::watch_events(
            self.0.core.bus.clone(),
            filter,
            tx,
            self.0.streams_stop.clone(),
        ));
        let stream = ReceiverStream::new(rx).map(move |item| {
            // The tenant's stream slot lives as long as this closure.
            let _held = &permit;
            Ok(match item {
                WatchItem::Event(e) => pb::WatchEventsResponse {
                    event: Some(event_to(&e)),
                    missed_events: 0,
                },
                WatchItem::Missed(n) => pb::WatchEventsResponse {
                    event: None,
                    missed_events: n,
                },
            })
        });
        Ok(Response::new(Box::pin(stream)))
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
