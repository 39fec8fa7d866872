//! `run_events`: the persisted log of every run. Seqs are allocated from
//! `runs.last_seq` in the statement that inserts the events, so they are
//! dense per run; NOTIFY on [`super::notify::EVENTS`] tells other nodes which
//! seq range to read.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{Error, decode, encode, notify_payloads};
use crate::domain::{EventBody, Progress, RunEvent};

/// Announces new events `(run_id, from_seq, to_seq)` written by `node_id`, on
/// [`super::notify::EVENTS`] (delivered when the transaction commits).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn notify_events(
    conn: &mut PgConnection,
    node_id: &str,
    ranges: impl IntoIterator<Item = (Uuid, i64, i64)>,
) -> Result<(), Error> {
    let payloads = event_payloads(node_id, ranges);
    sqlx::query!(
        "SELECT pg_notify($2::text, p) FROM UNNEST($1::text[]) AS p",
        &payloads,
        super::notify::EVENTS,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The [`super::notify::EVENTS`] payloads announcing `ranges` (`run_id,
/// from_seq, to_seq`) written by `node_id`: `<node>|<run>:<from>:<to>,...`,
/// split to fit PostgreSQL's payload limit.
pub(crate) fn event_payloads(
    node_id: &str,
    ranges: impl IntoIterator<Item = (Uuid, i64, i64)>,
) -> Vec<String> {
    notify_payloads(
        &format!("{node_id}|"),
        ranges
            .into_iter()
            .map(|(id, from, to)| format!("{id}:{from}:{to}")),
    )
}

/// Appends `bodies` to the run's log at `now`, allocating the next seqs, and
/// announces them. When `bodies` hold progress events, the last of them
/// becomes the run's `progress` in the same statement (a batch of log lines
/// costs nothing more). Returns the persisted events in seq order.
///
/// # Errors
/// [`Error::NotFound`] when the run does not exist; [`Error::Sqlx`] otherwise.
pub async fn event_append(
    conn: &mut PgConnection,
    node_id: &str,
    run_id: Uuid,
    bodies: &[EventBody],
    now: DateTime<Utc>,
) -> Result<Vec<RunEvent>, Error> {
    if bodies.is_empty() {
        return Ok(Vec::new());
    }
    let kinds: Vec<&str> = bodies.iter().map(EventBody::kind).collect();
    let payloads: Vec<serde_json::Value> = bodies.iter().map(encode).collect();
    let n = bodies.len() as i64;
    let latest = bodies.iter().rev().find_map(|b| match b {
        EventBody::Progress(p) => Some(encode(p)),
        _ => None,
    });
    let r = sqlx::query!(
        r#"WITH s AS (
             UPDATE runs SET last_seq = last_seq + $2, progress = COALESCE($6::jsonb, progress)
             WHERE id = $1
             RETURNING last_seq - $2 AS base, tenant_id, binding_id, definition),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT $1, s.base + u.ord, $3, s.tenant_id, s.binding_id, s.definition, u.kind, u.payload
             FROM s, UNNEST($4::text[], $5::jsonb[]) WITH ORDINALITY AS u(kind, payload, ord)
             RETURNING seq)
           SELECT base AS "base!", tenant_id, binding_id, definition FROM s"#,
        run_id,
        n,
        now,
        &kinds as &[&str],
        &payloads,
        latest,
    )
    .fetch_one(&mut *conn)
    .await?;
    notify_events(&mut *conn, node_id, [(run_id, r.base + 1, r.base + n)]).await?;
    Ok(bodies
        .iter()
        .enumerate()
        .map(|(i, b)| RunEvent {
            run_id,
            seq: r.base + 1 + i as i64,
            time: now,
            tenant_id: r.tenant_id.clone(),
            binding_id: r.binding_id,
            definition: r.definition.clone(),
            body: b.clone(),
        })
        .collect())
}

/// Records progress reported by a run (e.g. a worker's ReportProgress) while
/// it is `RUNNING` at `attempt`: one `progress` event at the next seq and the
/// run's `progress` set to `progress`, in one statement, announced on commit
/// like any event. The caller validates `progress` first
/// ([`Progress::validate`]) and checks anything else that fences the report
/// (e.g. a lease token) in the same transaction. Publish the returned event
/// on the bus after the commit.
///
/// Returns `None`, and changes nothing, when the run is not `RUNNING` at
/// `attempt` (it ended, was retried, or does not exist): a late report never
/// touches a run it no longer holds.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn progress_append(
    conn: &mut PgConnection,
    node_id: &str,
    run_id: Uuid,
    attempt: i32,
    progress: &Progress,
    now: DateTime<Utc>,
) -> Result<Option<RunEvent>, Error> {
    let body = EventBody::Progress(progress.clone());
    let payload = encode(&body);
    let Some(r) = sqlx::query!(
        r#"WITH s AS (
             UPDATE runs SET last_seq = last_seq + 1, progress = $3
             WHERE id = $1 AND attempt = $2 AND state = 'RUNNING'
             RETURNING last_seq, tenant_id, binding_id, definition),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT $1, s.last_seq, $4, s.tenant_id, s.binding_id, s.definition, 'progress', $5 FROM s
             RETURNING seq)
           SELECT last_seq AS "seq!", tenant_id, binding_id, definition FROM s"#,
        run_id,
        attempt,
        encode(progress),
        now,
        payload,
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    notify_events(&mut *conn, node_id, [(run_id, r.seq, r.seq)]).await?;
    Ok(Some(RunEvent {
        run_id,
        seq: r.seq,
        time: now,
        tenant_id: r.tenant_id,
        binding_id: r.binding_id,
        definition: r.definition,
        body,
    }))
}

/// The `kind` of a row that holds several consecutive events of one run
/// (issue 18: state changes that do not each need a row). Its `payload` is
/// the JSON array of the events' payloads, in seq order, and its `seq` is
/// the seq of the **last** of them: the row holds seqs `seq - n + 1 ..= seq`.
/// Keyed by its last seq, the row is still found by every `seq > after`
/// read that any of its events belongs to, and `(run_id, seq)` stays
/// unique (no other row of the run takes a seq inside it). The events share
/// the row's `time`, tenant, binding and definition. Written where one
/// statement writes several events of a run at once: an `event` run
/// created SUCCEEDED (`runs::run_insert`: QUEUED, RUNNING, fired,
/// SUCCEEDED, one row instead of four) or ended by a claim
/// (`runs::run_claim`: RUNNING, fired, SUCCEEDED). SQL spells it `'batch'`
/// (the claim, and the event count of `retention::run_event_default_delete`).
pub(crate) const BATCH_KIND: &str = "batch";

/// Most events one [`BATCH_KIND`] row may hold: readers of a seq range look
/// this far past its end for rows that begin inside it.
pub(crate) const MAX_BATCH: usize = 8;

/// The payload of a [`BATCH_KIND`] row holding `bodies` (at most
/// [`MAX_BATCH`], at least 2).
pub(crate) fn batch_payload(bodies: &[EventBody]) -> serde_json::Value {
    debug_assert!((2..=MAX_BATCH).contains(&bodies.len()));
    serde_json::Value::Array(bodies.iter().map(encode).collect())
}

/// The events a stored row holds, as `(seq, kind, payload)` in seq order:
/// the row itself, or each event of a [`BATCH_KIND`] row.
///
/// # Errors
/// [`Error::Corrupt`] when a batch row's payload is not an array of 1 to
/// [`MAX_BATCH`] event payloads (each with its `kind`) that fits below its seq.
pub(crate) fn unbatch(
    seq: i64,
    kind: String,
    payload: serde_json::Value,
) -> Result<Vec<(i64, String, serde_json::Value)>, Error> {
    if kind != BATCH_KIND {
        return Ok(vec![(seq, kind, payload)]);
    }
    let corrupt = |msg: String| Error::Corrupt {
        what: "run event batch",
        source: <serde_json::Error as serde::de::Error>::custom(msg),
    };
    let items: Vec<serde_json::Value> = decode("run event batch", payload)?;
    let n = items.len() as i64;
    if items.is_empty() || items.len() > MAX_BATCH || n > seq {
        return Err(corrupt(format!("{n} events ending at seq {seq}")));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let kind = p
                .get("kind")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| corrupt(format!("event {} of the batch has no kind", i + 1)))?
                .to_string();
            Ok((seq - n + 1 + i as i64, kind, p))
        })
        .collect()
}

struct Row {
    run_id: Uuid,
    seq: i64,
    time: DateTime<Utc>,
    tenant_id: String,
    binding_id: Uuid,
    definition: String,
    kind: String,
    payload: serde_json::Value,
}

impl Row {
    /// The events this row holds whose seq `keep` accepts, in seq order.
    fn events(self, keep: impl Fn(i64) -> bool) -> Result<Vec<RunEvent>, Error> {
        let mut out = Vec::new();
        for (seq, _, payload) in unbatch(self.seq, self.kind, self.payload)? {
            if keep(seq) {
                out.push(RunEvent {
                    run_id: self.run_id,
                    seq,
                    time: self.time,
                    tenant_id: self.tenant_id.clone(),
                    binding_id: self.binding_id,
                    definition: self.definition.clone(),
                    body: decode("run event payload", payload)?,
                });
            }
        }
        Ok(out)
    }
}

/// Up to `limit` events of the tenant's run with seq > `after_seq`, in seq
/// order. (Existence of the run is the caller's check.)
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn event_list(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    run_id: Uuid,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<RunEvent>, Error> {
    // `limit` rows hold at least `limit` events; a batch row that holds
    // seqs on both sides of `after_seq` gives only those after it.
    let rows = sqlx::query_as!(
        Row,
        "SELECT run_id, seq, time, tenant_id, binding_id, definition, kind, payload
         FROM run_events WHERE tenant_id = $1 AND run_id = $2 AND seq > $3
         ORDER BY seq LIMIT $4",
        tenant_id,
        run_id,
        after_seq,
        limit
    )
    .fetch_all(db)
    .await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        events.extend(row.events(|seq| seq > after_seq)?);
    }
    events.truncate(usize::try_from(limit).unwrap_or(0));
    Ok(events)
}

/// The events in the announced ranges `(run_id, from_seq, to_seq)`, ordered by
/// run then seq (the cross-node bridge reads these after a NOTIFY).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn event_fetch_ranges(
    db: impl PgExecutor<'_>,
    ranges: &[(Uuid, i64, i64)],
) -> Result<Vec<RunEvent>, Error> {
    let ids: Vec<Uuid> = ranges.iter().map(|r| r.0).collect();
    let from: Vec<i64> = ranges.iter().map(|r| r.1).collect();
    let to: Vec<i64> = ranges.iter().map(|r| r.2).collect();
    // A batch row is keyed by its last seq: one that begins inside a range
    // may end up to MAX_BATCH - 1 past it. (Computed here, saturating: a
    // range comes from a NOTIFY payload, and no payload may make the
    // statement fail.)
    let until: Vec<i64> = ranges
        .iter()
        .map(|r| r.2.saturating_add(MAX_BATCH as i64 - 1))
        .collect();
    let rows = sqlx::query!(
        r#"SELECT e.run_id, e.seq, e.time, e.tenant_id, e.binding_id, e.definition, e.kind, e.payload,
                  r.from_seq AS "from_seq!", r.to_seq AS "to_seq!"
         FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[])
              WITH ORDINALITY AS r(run_id, from_seq, to_seq, until_seq, ord)
         JOIN run_events e ON e.run_id = r.run_id AND e.seq >= r.from_seq AND e.seq <= r.until_seq
         ORDER BY r.ord, e.seq"#,
        &ids,
        &from,
        &to,
        &until,
    )
    .fetch_all(db)
    .await?;
    let mut events = Vec::with_capacity(rows.len());
    for r in rows {
        let (from, to) = (r.from_seq, r.to_seq);
        let row = Row {
            run_id: r.run_id,
            seq: r.seq,
            time: r.time,
            tenant_id: r.tenant_id,
            binding_id: r.binding_id,
            definition: r.definition,
            kind: r.kind,
            payload: r.payload,
        };
        events.extend(row.events(|seq| (from..=to).contains(&seq))?);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{LogStream, RunState};
    use serde_json::json;

    fn bodies() -> Vec<EventBody> {
        vec![
            EventBody::StateChanged {
                from: None,
                to: RunState::Queued,
                reason: String::new(),
            },
            EventBody::StateChanged {
                from: Some(RunState::Queued),
                to: RunState::Running,
                reason: String::new(),
            },
            EventBody::Fired {
                params: json!({"n": 7, "nested": {"kind": "not a tag"}}),
            },
            EventBody::Log {
                stream: LogStream::System,
                message: "x".into(),
            },
            EventBody::StateChanged {
                from: Some(RunState::Running),
                to: RunState::Succeeded,
                reason: String::new(),
            },
        ]
    }

    #[test]
    fn a_batch_row_holds_its_events_at_the_seqs_below_its_own() {
        for n in 2..=bodies().len() {
            let bodies = &bodies()[..n];
            for last in [n as i64, n as i64 + 40] {
                let held = unbatch(last, BATCH_KIND.into(), batch_payload(bodies)).unwrap();
                let seqs: Vec<i64> = held.iter().map(|h| h.0).collect();
                assert_eq!(seqs, ((last - n as i64 + 1)..=last).collect::<Vec<_>>());
                for ((_, kind, payload), body) in held.into_iter().zip(bodies) {
                    assert_eq!(kind, body.kind());
                    assert_eq!(&decode::<EventBody>("t", payload).unwrap(), body);
                }
            }
        }
    }

    #[test]
    fn other_rows_are_one_event_each() {
        let p = encode(&bodies()[2]);
        assert_eq!(
            unbatch(9, "fired".into(), p.clone()).unwrap(),
            vec![(9, "fired".to_string(), p)]
        );
    }

    /// Property: whatever a stored row holds (random JSON shapes, random
    /// seqs including the extremes), reading it never panics; a batch row
    /// either gives contiguous seqs ending at its own, each with the kind
    /// its payload names, or is `Corrupt`.
    #[test]
    fn any_stored_row_reads_as_events_or_corrupt_never_a_panic() {
        let mut next = crate::domain::xorshift(0x9e37_79b9_7f4a_7c15_u64);
        fn value(next: &mut impl FnMut() -> u64, depth: u32) -> serde_json::Value {
            match next() % if depth > 2 { 5 } else { 8 } {
                0 => serde_json::Value::Null,
                1 => json!(next().is_multiple_of(2)),
                2 => json!(next() as i64),
                3 => json!(["kind", "fired", "batch", "log", ""][(next() % 5) as usize]),
                4 => encode(&bodies()[(next() % 5) as usize]),
                5 => {
                    let mut o = serde_json::Map::new();
                    if next().is_multiple_of(2) {
                        o.insert("kind".into(), value(next, depth + 1));
                    }
                    o.insert("x".into(), value(next, depth + 1));
                    serde_json::Value::Object(o)
                }
                _ => serde_json::Value::Array(
                    (0..next() % 11).map(|_| value(next, depth + 1)).collect(),
                ),
            }
        }
        let seqs = [i64::MIN, -1, 0, 1, 2, 3, 4, 7, 8, 9, 1000, i64::MAX];
        let mut batches = 0;
        for case in 0..5000 {
            let seq = if next().is_multiple_of(2) {
                seqs[(next() % seqs.len() as u64) as usize]
            } else {
                (next() % 40) as i64
            };
            // A third are arrays of real event payloads (0 to 10 of them),
            // the rest anything.
            let payload = if next().is_multiple_of(3) {
                let n = next() % 11;
                json!(
                    (0..n)
                        .map(|_| encode(&bodies()[(next() % 5) as usize]))
                        .collect::<Vec<_>>()
                )
            } else {
                value(&mut next, 0)
            };
            let kind = if next().is_multiple_of(4) {
                "log"
            } else {
                BATCH_KIND
            };
            match unbatch(seq, kind.into(), payload.clone()) {
                Ok(held) if kind != BATCH_KIND => {
                    assert_eq!(held, vec![(seq, kind.to_string(), payload)], "case {case}");
                }
                Ok(held) => {
                    batches += 1;
                    let items = payload.as_array().expect("only an array reads as a batch");
                    assert_eq!(held.len(), items.len(), "case {case}");
                    assert!((1..=MAX_BATCH).contains(&held.len()), "case {case}");
                    for (i, (s, k, p)) in held.iter().enumerate() {
                        assert_eq!(*s, seq - (held.len() - 1 - i) as i64, "case {case}");
                        assert!(*s >= 1, "case {case}: seqs start at 1");
                        assert_eq!(Some(k.as_str()), p["kind"].as_str(), "case {case}");
                        assert_eq!(p, &items[i], "case {case}");
                    }
                }
                Err(e) => assert!(
                    matches!(e, Error::Corrupt { .. }) && kind == BATCH_KIND,
                    "case {case}: {e}"
                ),
            }
        }
        assert!(batches > 500, "the cases reach valid batches: {batches}");
    }

    #[test]
    fn a_batch_row_that_does_not_fit_is_corrupt_not_a_panic() {
        let one = encode(&bodies()[0]);
        let cases = [
            (4, json!({"kind": "fired"})),
            (4, json!([])),
            (1, json!([one, one])),
            (0, json!([one])),
            (-3, json!([one])),
            (i64::MIN, json!([one])),
            (20, json!(vec![one.clone(); MAX_BATCH + 1])),
            (4, json!([one, {"no": "kind"}])),
            (4, json!([one, {"kind": 3}])),
            (4, json!([one, null])),
        ];
        for (seq, payload) in cases {
            let e = unbatch(seq, BATCH_KIND.into(), payload.clone()).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::Corrupt {
                        what: "run event batch",
                        ..
                    }
                ),
                "{seq} {payload}: {e}"
            );
        }
    }
}
