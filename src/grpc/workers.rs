//! WorkerService: the worker's bidirectional stream and the unary calls
//! for simple clients. Parses requests, calls [`crate::usecase::workers`]
//! and converts; the protocol and its rules live there and in
//! `proto/sked/v1/worker_service.proto`.

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use uuid::Uuid;

use super::authz::grant;
use super::convert::{json_to_struct, struct_to_json, time_to};
use super::{Ctx, TENANT_HEADER, invalid};
use crate::domain::{FieldViolation, validate_tenant_id};
use crate::proto::v1 as pb;
use crate::proto::v1::worker_service_server::WorkerService;
use crate::usecase::workers::{self, Hello, Hub, Report, ToWorker};

/// Responses buffered per stream before the sender waits.
const STREAM_BUFFER: usize = 256;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The WorkerService of a node: its context and its worker hub.
#[derive(Debug, Clone)]
pub struct Workers {
    /// What every service needs.
    pub ctx: Ctx,
    /// The node's connected workers.
    pub hub: Hub,
}

/// The tenant a worker call acts for: a tenant key's own (a different
/// `x-tenant-id` is `PERMISSION_DENIED`); for a platform key the
/// `x-tenant-id` header's, or every tenant without it.
fn worker_tenant<T>(req: &Request<T>) -> Result<Option<String>, Status> {
    let g = grant(req)?;
    let header = match req.metadata().get(TENANT_HEADER) {
        None => None,
        Some(v) => {
            let t = v
                .to_str()
                .map_err(|_| invalid(FieldViolation::new(TENANT_HEADER, "is not ASCII")))?;
            validate_tenant_id(TENANT_HEADER, t).map_err(invalid)?;
            Some(t.to_string())
        }
    };
    match (&g.caller.tenant, header) {
        (Some(own), Some(h)) if *own != h => Err(Status::permission_denied(
            "this key belongs to another tenant",
        )),
        (Some(own), _) => Ok(Some(own.clone())),
        (None, h) => Ok(h),
    }
}

fn token(field: &str, s: &str) -> Result<Uuid, FieldViolation> {
    Uuid::parse_str(s).map_err(|_| FieldViolation::new(field, "is not a lease token (a UUID)"))
}

fn result_of(s: Option<&prost_types::Struct>) -> Option<serde_json::Value> {
    s.map(struct_to_json)
}

/// The reports of one stream message, in a fixed order (heartbeats,
/// completions, failures, cancel acks).
fn reports(m: &pb::WorkerRequest) -> Result<Vec<Report>, FieldViolation> {
    let mut out = Vec::new();
    for (i, h) in m.heartbeats.iter().enumerate() {
        out.push(Report::Heartbeat(token(
            &format!("heartbeats[{i}].lease_token"),
            &h.lease_token,
        )?));
    }
    for (i, c) in m.completes.iter().enumerate() {
        out.push(Report::Complete(
            token(&format!("completes[{i}].lease_token"), &c.lease_token)?,
            result_of(c.result.as_ref()),
        ));
    }
    for (i, f) in m.fails.iter().enumerate() {
        out.push(Report::Fail(
            token(&format!("fails[{i}].lease_token"), &f.lease_token)?,
            f.error.clone(),
            f.retryable,
        ));
    }
    for (i, a) in m.cancel_acks.iter().enumerate() {
        out.push(Report::CancelAck(token(
            &format!("cancel_acks[{i}].lease_token"),
            &a.lease_token,
        )?));
    }
    Ok(out)
}

fn ack(token: Uuid, r: Result<(), crate::usecase::Error>) -> pb::WorkerResponse {
    let (code, message) = match r {
        Ok(()) => (Code::Ok, String::new()),
        Err(e) => {
            let s = Status::from(e);
            (s.code(), s.message().to_string())
        }
    };
    pb::WorkerResponse {
        kind: Some(pb::worker_response::Kind::Ack(pb::Ack {
            lease_token: token.to_string(),
            code: code as i32,
            message,
        })),
    }
}

fn to_worker(m: ToWorker) -> pb::WorkerResponse {
    let kind = match m {
        ToWorker::Assigned(a) => pb::worker_response::Kind::Assigned(pb::Assigned {
            run_id: a.run.id.to_string(),
            attempt: a.run.attempt,
            tenant_id: a.run.tenant_id.clone(),
            binding_id: a.run.binding_id.to_string(),
            definition: a.run.definition.clone(),
            params: json_to_struct(&a.run.params),
            deadline: a.deadline.map(time_to),
            lease_token: a.lease_token.to_string(),
            lease_expire_time: Some(time_to(a.lease_expire_time)),
        }),
        ToWorker::Cancel {
            lease_token,
            reason,
        } => pb::worker_response::Kind::Cancel(pb::Cancel {
            lease_token: lease_token.to_string(),
            reason,
        }),
    };
    pb::WorkerResponse { kind: Some(kind) }
}

#[tonic::async_trait]
impl WorkerService for Workers {
    type WorkStream = BoxStream<pb::WorkerResponse>;

    async fn work(
        &self,
        req: Request<Streaming<pb::WorkerRequest>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        let tenant = worker_tenant(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| invalid(FieldViolation::new("hello", "is required first")))?;
        let h = first
            .hello
            .ok_or_else(|| invalid(FieldViolation::new("hello", "is required first")))?;
        let lease_tokens = h
            .lease_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| token(&format!("hello.lease_tokens[{i}]"), t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let hello = Hello {
            queue: h.queue,
            worker_name: h.worker_name,
            slots: h.slots,
            lease_tokens,
        };
        let (mut conn, lost) = self.hub.connect(tenant, hello).await?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        for t in lost {
            let _ = tx.send(Ok(ack(t, Err(lost_error())))).await;
        }
        // The rest of the first message, if it carried reports too.
        let early = reports(&pb::WorkerRequest {
            hello: None,
            ..first
        });
        let stop = self.ctx.streams_stop.clone();
        tokio::spawn(async move {
            let mut pending = Some(early);
            loop {
                let batch = match pending.take() {
                    Some(b) => Some(b),
                    None => tokio::select! {
                        m = conn.rx.recv() => {
                            let Some(m) = m else { break };
                            if tx.send(Ok(to_worker(m))).await.is_err() {
                                break;
                            }
                            None
                        }
                        m = inbound.message() => match m {
                            Ok(Some(m)) if m.hello.is_some() => Some(Err(FieldViolation::new(
                                "hello", "is allowed on the first message only"))),
                            Ok(Some(m)) => Some(reports(&m)),
                            // The worker closed its side, or the
                            // connection broke: its leases hold.
                            Ok(None) | Err(_) => break,
                        },
                        _ = tx.closed() => break,
                        _ = stop.cancelled() => break,
                    },
                };
                match batch {
                    None => {}
                    Some(Err(v)) => {
                        let _ = tx.send(Err(invalid(v))).await;
                        break;
                    }
                    Some(Ok(items)) if items.is_empty() => {}
                    Some(Ok(items)) => {
                        for (t, r) in conn.report(items).await {
                            if tx.send(Ok(ack(t, r))).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
            drop(conn);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn complete_run(
        &self,
        req: Request<pb::CompleteRunRequest>,
    ) -> Result<Response<pb::CompleteRunResponse>, Status> {
        let tenant = worker_tenant(&req)?;
        let m = req.into_inner();
        let t = token("lease_token", &m.lease_token).map_err(invalid)?;
        workers::report_unary(
            &self.hub,
            tenant.as_deref(),
            Report::Complete(t, result_of(m.result.as_ref())),
        )
        .await?;
        Ok(Response::new(pb::CompleteRunResponse {}))
    }

    async fn fail_run(
        &self,
        req: Request<pb::FailRunRequest>,
    ) -> Result<Response<pb::FailRunResponse>, Status> {
        let tenant = worker_tenant(&req)?;
        let m = req.into_inner();
        let t = token("lease_token", &m.lease_token).map_err(invalid)?;
        workers::report_unary(
            &self.hub,
            tenant.as_deref(),
            Report::Fail(t, m.error, m.retryable),
        )
        .await?;
        Ok(Response::new(pb::FailRunResponse {}))
    }

    async fn append_logs(
        &self,
        req: Request<Streaming<pb::AppendLogsRequest>>,
    ) -> Result<Response<pb::AppendLogsResponse>, Status> {
        let tenant = worker_tenant(&req)?;
        let mut inbound = req.into_inner();
        let mut appended = 0u64;
        while let Some(m) = inbound.message().await? {
            let t = token("lease_token", &m.lease_token).map_err(invalid)?;
            if m.lines.is_empty() {
                return Err(invalid(FieldViolation::new("lines", "is required")));
            }
            let lines = m.lines.into_iter().map(|l| (l.stderr, l.message)).collect();
            appended +=
                workers::append_logs(self.hub.core(), tenant.as_deref(), t, lines).await? as u64;
        }
        Ok(Response::new(pb::AppendLogsResponse { appended }))
    }

    async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let tenant = worker_tenant(&req)?;
        let m = req.into_inner();
        let t = token("lease_token", &m.lease_token).map_err(invalid)?;
        workers::report_progress(
            self.hub.core(),
            tenant.as_deref(),
            t,
            workers::ProgressReport {
                percent: m.percent,
                current_step: m.current_step,
                total_steps: m.total_steps,
                message: m.message,
            },
        )
        .await?;
        Ok(Response::new(pb::ReportProgressResponse {}))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let tenant = worker_tenant(&req)?;
        let m = req.into_inner();
        if m.lease_tokens.is_empty() {
            return Err(invalid(FieldViolation::new("lease_tokens", "is required")));
        }
        let tokens = m
            .lease_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| token(&format!("lease_tokens[{i}]"), t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let (valid, cancels) = workers::heartbeat(
            self.hub.core(),
            self.hub.lease(),
            tenant.as_deref(),
            &tokens,
        )
        .await?;
        Ok(Response::new(pb::HeartbeatResponse {
            valid: valid.iter().map(Uuid::to_string).collect(),
            cancels: cancels
                .into_iter()
                .map(|(t, reason)| pb::Cancel {
                    lease_token: t.to_string(),
                    reason,
                })
                .collect(),
        }))
    }
}

fn lost_error() -> crate::usecase::Error {
    crate::usecase::Error::Precondition("the lease is no longer valid: drop the run".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_keep_their_tokens_and_refuse_bad_ones() {
        let t = Uuid::now_v7();
        let m = pb::WorkerRequest {
            heartbeats: vec![pb::Heartbeat {
                lease_token: t.to_string(),
            }],
            fails: vec![pb::Fail {
                lease_token: t.to_string(),
                error: "boom".into(),
                retryable: false,
            }],
            ..Default::default()
        };
        let r = reports(&m).expect("valid");
        assert_eq!(r.len(), 2);
        assert!(matches!(&r[1], Report::Fail(x, e, false) if *x == t && e == "boom"));
        let bad = pb::WorkerRequest {
            completes: vec![pb::Complete {
                lease_token: "nope".into(),
                result: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            reports(&bad).expect_err("refused").field,
            "completes[0].lease_token"
        );
    }
}
