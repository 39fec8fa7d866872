//! A sked worker: takes runs of one queue over `WorkerService.Work`, prints
//! each run's params, and completes it with a result. Copy it and put your
//! own code where the run is handled.
//!
//! Settings (environment): `SKED_ADDR` (default `http://127.0.0.1:50051`),
//! `SKED_TOKEN` (an API key with role worker), `SKED_TENANT` (a platform
//! key's tenant, optional), `SKED_QUEUE` (default `default`),
//! `SKED_WORKER_NAME` (default `example`), `SKED_SLOTS` (default 1).
//!
//! For demonstrations and sked's own tests, a run whose params hold
//! `"sleep_ms": N` works for N milliseconds first, and `"fail": "why"`
//! fails instead of completing. Each event is printed as one line:
//! `assigned <run id> <lease token> <params>`, `cancel <run id> <reason>`,
//! `ack <code> <message>`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sked::proto::v1::{self as pb, worker_response::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

type Runs = Arc<Mutex<HashMap<String, String>>>;

fn lock(runs: &Runs) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
    runs.lock().unwrap_or_else(|e| e.into_inner())
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = env("SKED_ADDR", "http://127.0.0.1:50051");
    let mut client = pb::worker_service_client::WorkerServiceClient::connect(addr).await?;
    let (tx, rx) = mpsc::channel::<pb::WorkerRequest>(64);
    tx.send(pb::WorkerRequest {
        hello: Some(pb::Hello {
            queue: env("SKED_QUEUE", "default"),
            worker_name: env("SKED_WORKER_NAME", "example"),
            slots: env("SKED_SLOTS", "1").parse()?,
            lease_tokens: vec![],
        }),
        ..Default::default()
    })
    .await?;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if let Ok(token) = std::env::var("SKED_TOKEN") {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    if let Ok(tenant) = std::env::var("SKED_TENANT") {
        req.metadata_mut().insert("x-tenant-id", tenant.parse()?);
    }
    let mut stream = client.work(req).await?.into_inner();
    // Lease token → run id, for the cancel lines.
    let runs: Runs = Arc::default();
    while let Some(msg) = stream.message().await? {
        match msg.kind {
            Some(Kind::Assigned(a)) => {
                let params = a.params.unwrap_or_default();
                let json = sked::grpc::convert::struct_to_json(&params);
                println!("assigned {} {} {json}", a.run_id, a.lease_token);
                lock(&runs).insert(a.lease_token.clone(), a.run_id);
                let (tx, runs) = (tx.clone(), Arc::clone(&runs));
                tokio::spawn(async move {
                    // The work. Replace with your own.
                    let ms = json["sleep_ms"].as_u64().unwrap_or(0);
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    if lock(&runs).remove(&a.lease_token).is_none() {
                        return; // cancelled meanwhile
                    }
                    let mut done = pb::WorkerRequest::default();
                    match json["fail"].as_str() {
                        Some(why) => done.fails.push(pb::Fail {
                            lease_token: a.lease_token,
                            error: why.to_string(),
                            retryable: true,
                        }),
                        None => done.completes.push(pb::Complete {
                            lease_token: a.lease_token,
                            result: sked::grpc::convert::json_to_struct(
                                &serde_json::json!({"ok": true, "worker": env("SKED_WORKER_NAME", "example")}),
                            ),
                        }),
                    }
                    let _ = tx.send(done).await;
                });
            }
            Some(Kind::Cancel(c)) => {
                let run = lock(&runs).remove(&c.lease_token);
                println!("cancel {} {}", run.unwrap_or_default(), c.reason);
                let ack = pb::CancelAck {
                    lease_token: c.lease_token,
                };
                tx.send(pb::WorkerRequest {
                    cancel_acks: vec![ack],
                    ..Default::default()
                })
                .await?;
            }
            Some(Kind::Ack(a)) => println!("ack {} {}", a.code, a.message),
            None => {}
        }
    }
    Ok(())
}
