//! The console's pages and actions. Each names the gRPC method it stands
//! for; [`Console::authorize`] applies that method's rule, and the handler
//! calls the same use case the method's handler calls.

// A refusal is the HTTP answer itself (`Err(Response)`), returned once per
// request: its size does not matter.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::TimeDelta;
use maud::{Markup, html};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use uuid::Uuid;

use super::views::{self, ChartPoint, csrf, layout};
use super::{Console, Failure, Who};
use crate::domain::stats::StatsInterval;
use crate::domain::{BindingStatus, EventBody, Handler, RunState, RunTrigger, validate_tenant_id};
use crate::events::tail;
use crate::usecase::bindings::{self as ucb, BindingFilter};
use crate::usecase::runs::{self as ucr, RunFilter, StatsQuery, StatsSubject};
use crate::usecase::sessions as session;
use crate::usecase::{self, Actor, Page};

/// Runs the binding page lists.
const RUN_PAGE: i64 = 50;
/// Bindings the bindings page lists.
const BINDING_PAGE: i64 = 100;
/// Days of the history strip.
const HISTORY_DAYS: i64 = 30;
/// Fire times of the schedule calendar.
const NEXT_FIRES: usize = 10;
/// Events the run page shows before the live tail takes over.
const RUN_EVENTS: i64 = 5000;
/// SSE events buffered per tail before its producer waits for the browser.
const SSE_BUFFER: usize = 256;

type PageResult = Result<Response, Response>;

fn fail(f: impl Into<Failure>) -> Response {
    f.into().into_response()
}

fn page(who: &Who, title: &str, body: Markup) -> Response {
    layout(Some(who), who.dev, title, body).into_response()
}

fn parse_id(s: &str, what: &str) -> Result<Uuid, Response> {
    // A malformed id names nothing: the same 404 as another tenant's.
    s.parse().map_err(|_| {
        fail(Failure::new(
            StatusCode::NOT_FOUND,
            format!("no such {what}"),
        ))
    })
}

fn see_other(to: String) -> Response {
    Redirect::to(&to).into_response()
}

/// A sign-in or action form posted from another site is refused: the
/// `Origin` a browser sends must name this console's host.
fn same_origin(headers: &HeaderMap) -> Result<(), Response> {
    let (Some(origin), Some(host)) = (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) else {
        return Ok(());
    };
    let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
    if origin == "null" || origin_host != host {
        return Err(fail(Failure::new(
            StatusCode::FORBIDDEN,
            "cross-site form refused",
        )));
    }
    Ok(())
}

/// Who posts an action: a live session (401), a form from this site with
/// the session's CSRF token (403).
async fn poster(c: &Console, headers: &HeaderMap, csrf_field: &str) -> Result<Who, Response> {
    let who = c.require(headers, false).await?;
    same_origin(headers)?;
    Console::check_csrf(&who, csrf_field).map_err(fail)?;
    Ok(who)
}

// ---- sign-in ----------------------------------------------------------

/// GET /sign-in.
pub async fn sign_in_page(State(c): State<Console>, headers: HeaderMap) -> PageResult {
    if c.who(&headers).await.map_err(fail)?.is_some() {
        return Ok(see_other("/bindings".into()));
    }
    Ok(sign_in_form(&c, None).into_response())
}

fn sign_in_form(c: &Console, error: Option<&str>) -> Markup {
    let dev = !c.ctx.auth.required();
    layout(
        None,
        dev,
        "Sign in",
        html! {
            @if let Some(e) = error { p class="error" role="alert" { (e) } }
            form method="post" action="/sign-in" class="stack" {
                @if !dev {
                    label for="key" { "API key" }
                    input id="key" name="key" type="password" autocomplete="off" required
                        aria-describedby="key-help";
                    p id="key-help" class="muted" {
                        "A key made with " code { "sked key create" } " or "
                        code { "sked admin bootstrap-key" } ". It is checked once; the browser keeps only a session cookie."
                    }
                }
                label for="tenant" { "Tenant" }
                input id="tenant" name="tenant" type="text" aria-describedby="tenant-help";
                p id="tenant-help" class="muted" {
                    "The tenant to look at. A tenant key always acts for its own tenant; a platform key (or the development mode) names one here and can switch later."
                }
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// The sign-in form.
#[derive(Debug, Deserialize)]
pub struct SignIn {
    #[serde(default)]
    key: String,
    #[serde(default)]
    tenant: String,
}

/// POST /sign-in: checks the key as the gRPC gate does and starts a
/// session.
pub async fn sign_in(
    State(c): State<Console>,
    headers: HeaderMap,
    Form(f): Form<SignIn>,
) -> PageResult {
    same_origin(&headers)?;
    let refuse =
        |status: StatusCode, msg: &str| Err((status, sign_in_form(&c, Some(msg))).into_response());
    let core = &c.ctx.core;
    let caller = if c.ctx.auth.required() {
        let mut md = tonic::metadata::MetadataMap::new();
        let Ok(v) = format!("Bearer {}", f.key.trim()).parse() else {
            return refuse(StatusCode::UNAUTHORIZED, "invalid API key");
        };
        md.insert("authorization", v);
        match c.ctx.auth.authenticate(&core.pool, &md).await {
            Ok(caller) => caller,
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                return refuse(StatusCode::UNAUTHORIZED, "invalid or revoked API key");
            }
            Err(s) => return Err(fail(s)),
        }
    } else {
        crate::domain::tenancy::Caller::anonymous()
    };
    if !caller.role.allows(crate::domain::Role::Viewer) {
        return refuse(
            StatusCode::FORBIDDEN,
            "this key's role cannot read (worker keys are for workers)",
        );
    }
    let wanted = f.tenant.trim();
    let tenant = match (&caller.tenant, wanted) {
        (Some(own), "") => Some(own.clone()),
        (Some(own), w) if w == own => Some(own.clone()),
        (Some(_), _) => {
            return refuse(
                StatusCode::FORBIDDEN,
                "this key belongs to another tenant than the one named",
            );
        }
        (None, "") => None,
        (None, w) => {
            if let Err(v) = validate_tenant_id("tenant", w) {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    &format!("{}: {}", v.field, v.reason),
                );
            }
            Some(w.to_string())
        }
    };
    let token = session::create(core, caller.key_id, tenant.as_deref())
        .await
        .map_err(fail)?;
    tracing::info!(key_id = ?caller.key_id, tenant = ?tenant, "console sign-in");
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, c.cookie(&token, false)),
            (header::LOCATION, "/bindings".to_string()),
        ],
    )
        .into_response())
}

/// A form with only the CSRF token.
#[derive(Debug, Deserialize)]
pub struct Plain {
    #[serde(default)]
    csrf: String,
}

/// POST /sign-out.
pub async fn sign_out(
    State(c): State<Console>,
    headers: HeaderMap,
    Form(f): Form<Plain>,
) -> PageResult {
    let who = poster(&c, &headers, &f.csrf).await?;
    session::end(&c.ctx.core, &who.session.token_hash)
        .await
        .map_err(fail)?;
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, c.cookie("", true)),
            (header::LOCATION, "/sign-in".to_string()),
        ],
    )
        .into_response())
}

/// The tenant switch form.
#[derive(Debug, Deserialize)]
pub struct Switch {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    tenant: String,
}

/// POST /tenant: a platform key (or the development mode) chooses the
/// tenant its pages act for, as it would with `x-tenant-id`.
pub async fn switch_tenant(
    State(c): State<Console>,
    headers: HeaderMap,
    Form(f): Form<Switch>,
) -> PageResult {
    let who = poster(&c, &headers, &f.csrf).await?;
    if who.caller.tenant.is_some() {
        return Err(fail(Failure::new(
            StatusCode::FORBIDDEN,
            "a tenant key acts for its own tenant only",
        )));
    }
    let t = f.tenant.trim();
    validate_tenant_id("tenant", t).map_err(|v| {
        fail(Failure::new(
            StatusCode::BAD_REQUEST,
            format!("{}: {}", v.field, v.reason),
        ))
    })?;
    session::set_tenant(&c.ctx.core, &who.session, t)
        .await
        .map_err(fail)?;
    Ok(see_other("/bindings".into()))
}

// ---- bindings -----------------------------------------------------------

/// The bindings page's filter.
#[derive(Debug, Deserialize, Default)]
pub struct BindingsQuery {
    #[serde(default)]
    status: String,
}

/// GET /bindings: the tenant's bindings with status, last run, next fire
/// and a 30-day history strip (ListBindings, GetRunStats per binding);
/// `?status=FAILING` narrows to one status.
pub async fn bindings(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Query<BindingsQuery>,
) -> PageResult {
    let who = c.require(&headers, true).await?;
    if who.tenant.is_none() {
        return Ok(page(
            &who,
            "Bindings",
            html! { p { "Choose a tenant with the field at the top of the page." } },
        ));
    }
    let (_, tenant) = c
        .authorize(&who, "/sked.v1.BindingService/ListBindings")
        .map_err(fail)?;
    c.authorize(&who, "/sked.v1.RunService/GetRunStats")
        .map_err(fail)?;
    let core = &c.ctx.core;
    let filter = BindingFilter {
        statuses: BindingStatus::ALL
            .into_iter()
            .filter(|s| s.as_str() == q.status)
            .collect(),
        ..BindingFilter::default()
    };
    let (list, more) = ucb::list(core, &tenant, &filter, BINDING_PAGE, "")
        .await
        .map_err(fail)?;
    let now = core.clock.now();
    let start = StatsInterval::Day.floor(now) - TimeDelta::days(HISTORY_DAYS - 1);
    let mut rows = Vec::with_capacity(list.len());
    for b in &list {
        let q = StatsQuery {
            subject: StatsSubject::Binding {
                tenant: tenant.clone(),
                id: b.id,
            },
            start,
            end: now,
            interval: Some(StatsInterval::Day),
        };
        let stats = ucr::stats(core, &q).await.map_err(fail)?;
        rows.push((b, stats));
    }
    let body = html! {
        form method="get" class="inline filters" {
            label for="status" { "Status" }
            select id="status" name="status" {
                option value="" { "any" }
                @for st in BindingStatus::ALL {
                    option value=(st.as_str()) selected[q.status == st.as_str()] { (st.as_str()) }
                }
            }
            button type="submit" { "Filter" }
        }
        @if list.is_empty() {
            p { "No bindings in tenant " strong { (tenant) } " match." }
        } @else {
            table class="list" {
                caption { "Bindings of tenant " (tenant) "; each square of the history is one day (UTC), oldest left: green all succeeded, red a failure, amber only cancelled or skipped, grey no runs." }
                thead { tr {
                    th scope="col" { "Definition" }
                    th scope="col" { "Status" }
                    th scope="col" { "Last run" }
                    th scope="col" { "Next fire" }
                    th scope="col" { "Last " (HISTORY_DAYS) " days" }
                } }
                tbody {
                    @for (b, stats) in &rows {
                        tr data-binding=(b.id) {
                            td { a href={"/bindings/" (b.id)} { (b.definition) } br; small class="muted" { (b.id) } }
                            td { (views::status_badge(b.status(now))) }
                            td {
                                @if let Some(l) = b.outcomes.last_run {
                                    a href={"/runs/" (l.id)} { (views::state_badge(l.state)) }
                                    " " small { (views::time(l.end_time)) }
                                } @else { "—" }
                            }
                            td { (views::opt_time(b.next_run_time)) }
                            td { (views::history_strip(&stats.series, &format!("History of {}", b.definition))) }
                        }
                    }
                }
            }
            @if !more.is_empty() { p class="muted" { "Showing the first " (BINDING_PAGE) " bindings." } }
        }
    };
    Ok(page(&who, "Bindings", body))
}

/// Filters of the binding page's run table.
#[derive(Debug, Deserialize, Default)]
pub struct RunFilters {
    #[serde(default)]
    state: String,
    #[serde(default)]
    trigger: String,
    /// The next page's token of the previous page.
    #[serde(default)]
    page: String,
}

/// GET /bindings/{id}: effective config, schedule calendar (DST-shifted
/// fires marked), actions, duration/lag chart and the run table
/// (GetBinding, ListRuns, PreviewSchedule).
pub async fn binding(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(f): Query<RunFilters>,
) -> PageResult {
    let who = c.require(&headers, true).await?;
    let (_, tenant) = c
        .authorize(&who, "/sked.v1.BindingService/GetBinding")
        .map_err(fail)?;
    c.authorize(&who, "/sked.v1.RunService/ListRuns")
        .map_err(fail)?;
    let id = parse_id(&id, "binding")?;
    let core = &c.ctx.core;
    let b = ucb::view(core, &tenant, id).await.map_err(fail)?;
    let now = core.clock.now();
    let states: Vec<RunState> = RunState::parse(&f.state).into_iter().collect();
    let trigger = RunTrigger::parse(&f.trigger);
    let filter = RunFilter {
        binding_id: Some(id),
        states,
        trigger,
        ..RunFilter::default()
    };
    let (runs, next_page) = ucr::list(core, &tenant, &filter, RUN_PAGE, &f.page)
        .await
        .map_err(fail)?;
    let next_link = (!next_page.is_empty()).then(|| {
        let q: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("state", &f.state)
            .append_pair("trigger", &f.trigger)
            .append_pair("page", &next_page)
            .finish();
        format!("/bindings/{id}?{q}#runs-h")
    });
    let fires = usecase::definitions::preview(b.effective_schedule.clone(), now, NEXT_FIRES)
        .map(|p| p.fire_times())
        .unwrap_or_default();
    let points: Vec<ChartPoint> = runs
        .iter()
        .rev()
        .filter_map(|r| {
            let (s, e) = (r.start_time?, r.end_time?);
            Some(ChartPoint {
                at: r.scheduled_time,
                duration_us: (e - s).num_microseconds().unwrap_or(0).max(0),
                lag_us: (s - r.scheduled_time)
                    .num_microseconds()
                    .unwrap_or(0)
                    .max(0),
            })
        })
        .collect();
    let status = b.status(now);
    let can_pause = who.can("/sked.v1.BindingService/PauseBinding");
    let can_trigger = who.can("/sked.v1.RunService/TriggerRun");
    let effective = serde_json::json!({
        "definition": b.definition,
        "schedule": b.effective_schedule,
        "params": b.effective_params,
        "overlap": format!("{:?}", b.effective_policy.overlap),
        "retry": {
            "max_attempts": b.effective_policy.retry.max_attempts,
            "initial_backoff_ms": b.effective_policy.retry.initial_backoff_ms,
            "backoff_coefficient": b.effective_policy.retry.backoff_coefficient,
            "max_backoff_ms": b.effective_policy.retry.max_backoff_ms,
        },
        "timeout_secs": b.effective_policy.timeout_secs,
        "priority": b.effective_policy.priority,
        "max_active_runs": b.effective_max_active_runs,
        "enabled": b.enabled,
        "effective_from": b.effective_from,
        "effective_until": b.effective_until,
    });
    let body = html! {
        p { "Status " span id="binding-status" { (views::status_badge(status)) }
            @if b.paused { " — paused"
                @if !b.pause_note.is_empty() { ": “" (b.pause_note) "”" }
                @if let Some(t) = b.pause_expire_time { " until " (views::time(t)) }
            }
            @if let Some(r) = &b.broken_reason { " — broken: " (r) }
        }
        dl class="facts" {
            dt { "Binding" } dd { code { (b.id) } }
            dt { "Tenant" } dd { (b.tenant_id) }
            dt { "Next fire" } dd { (views::opt_time(b.next_run_time)) }
            dt { "Last success" } dd { (views::opt_time(b.outcomes.last_success_time)) }
            dt { "Last failure" } dd { (views::opt_time(b.outcomes.last_failure_time)) }
            dt { "Consecutive failures" } dd { (b.outcomes.consecutive_failures) }
        }
        @if can_pause || can_trigger {
            section class="actions" aria-labelledby="actions-h" {
                h2 id="actions-h" { "Actions" }
                @if can_pause {
                    @if b.paused {
                        form method="post" action={"/bindings/" (b.id) "/resume"} class="inline" {
                            (csrf(&who))
                            button type="submit" id="resume" { "Resume" }
                        }
                    } @else {
                        form method="post" action={"/bindings/" (b.id) "/pause"} class="stack" {
                            (csrf(&who))
                            label for="note" { "Pause note" }
                            input id="note" name="note" type="text" maxlength="500";
                            label for="expire_hours" { "Resume by itself after (hours; empty: until resumed)" }
                            input id="expire_hours" name="expire_hours" type="number" min="0" step="any";
                            button type="submit" id="pause" { "Pause" }
                        }
                    }
                }
                @if can_trigger {
                    form method="post" action={"/bindings/" (b.id) "/trigger"} class="stack" {
                        (csrf(&who))
                        label for="params" { "Params (a JSON object merged over the binding's; optional)" }
                        textarea id="params" name="params" rows="3" cols="60" {}
                        button type="submit" id="trigger" { "Trigger a run now" }
                    }
                }
            }
        }
        section aria-labelledby="cal-h" {
            h2 id="cal-h" { "Next fires" }
            @if b.paused { p class="muted" { "Paused: fire times in the pause are skipped, not caught up." } }
            @if fires.is_empty() {
                p class="muted" { "No fire times ahead (manual schedule, or the schedule ended)." }
            } @else {
                ol class="fires" {
                    @for fire in &fires {
                        li {
                            (views::time(fire.time)) " — " (fire.local_time)
                            @if fire.dst_shifted {
                                " " span class="badge warn" title="The wall time asked for does not exist that day (daylight saving); the fire moves to the end of the gap." { "DST-shifted" }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="chart-h" {
            h2 id="chart-h" { "Duration and fire lag" }
            (views::duration_chart(&points))
        }
        section aria-labelledby="runs-h" {
            h2 id="runs-h" { "Runs" }
            form method="get" class="inline filters" {
                label for="state" { "State" }
                select id="state" name="state" {
                    option value="" { "any" }
                    @for s in ["SCHEDULED","QUEUED","RUNNING","SUCCEEDED","FAILED","TIMED_OUT","CANCELLED","SKIPPED"] {
                        option value=(s) selected[f.state == s] { (s) }
                    }
                }
                label for="trigger-f" { "Trigger" }
                select id="trigger-f" name="trigger" {
                    option value="" { "any" }
                    @for t in ["SCHEDULE","MANUAL","RETRY","BACKFILL","STEP"] {
                        option value=(t) selected[f.trigger == t] { (t) }
                    }
                }
                button type="submit" { "Filter" }
            }
            (run_table(&runs))
            @if let Some(l) = &next_link { p { a href=(l) { "Older runs →" } } }
            @if !f.page.is_empty() { p { a href={"/bindings/" (id) "#runs-h"} { "← Newest runs" } } }
        }
        section aria-labelledby="config-h" {
            h2 id="config-h" { "Effective configuration" }
            (views::json(&effective))
        }
    };
    Ok(page(&who, &format!("Binding {}", b.definition), body))
}

fn run_table(runs: &[crate::domain::Run]) -> Markup {
    html! {
        @if runs.is_empty() { p class="muted" { "No runs match." } } @else {
            table class="list runs" {
                thead { tr {
                    th scope="col" { "Run" } th scope="col" { "State" } th scope="col" { "Trigger" }
                    th scope="col" { "Attempt" } th scope="col" { "Fire time" } th scope="col" { "Duration" }
                } }
                tbody {
                    @for r in runs {
                        tr {
                            td { a href={"/runs/" (r.id)} { code { (r.id.to_string()[..8]) "…" } } }
                            td { (views::state_badge(r.state)) }
                            td { (r.trigger.as_str()) }
                            td { (r.attempt) }
                            td { (views::time(r.scheduled_time)) }
                            td { @match (r.start_time, r.end_time) {
                                (Some(s), Some(e)) => (views::micros((e - s).num_microseconds().unwrap_or(0))),
                                (Some(_), None) => "running",
                                _ => "—",
                            } }
                        }
                    }
                }
            }
        }
    }
}

/// The pause form.
#[derive(Debug, Deserialize)]
pub struct PauseForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    note: String,
    #[serde(default)]
    expire_hours: String,
}

/// POST /bindings/{id}/pause (PauseBinding).
pub async fn pause(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<PauseForm>,
) -> PageResult {
    let who = poster(&c, &headers, &f.csrf).await?;
    let (method, tenant) = c
        .authorize(&who, "/sked.v1.BindingService/PauseBinding")
        .map_err(fail)?;
    let id = parse_id(&id, "binding")?;
    let core = &c.ctx.core;
    let expire = match f.expire_hours.trim() {
        "" => None,
        h => {
            let hours: f64 = h
                .parse()
                .ok()
                .filter(|h: &f64| h.is_finite() && *h > 0.0 && *h <= 24.0 * 366.0)
                .ok_or_else(|| {
                    fail(Failure::new(
                        StatusCode::BAD_REQUEST,
                        "expire_hours: must be a number of hours above 0 and at most 8784 (a year)",
                    ))
                })?;
            Some(core.clock.now() + TimeDelta::milliseconds((hours * 3_600_000.0) as i64))
        }
    };
    let actor = Actor::new(&who.caller, method);
    ucb::pause(core, actor, &tenant, id, f.note.trim(), expire)
        .await
        .map_err(fail)?;
    Ok(see_other(format!("/bindings/{id}")))
}

/// POST /bindings/{id}/resume (ResumeBinding).
pub async fn resume(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<Plain>,
) -> PageResult {
    let who = poster(&c, &headers, &f.csrf).await?;
    let (method, tenant) = c
        .authorize(&who, "/sked.v1.BindingService/ResumeBinding")
        .map_err(fail)?;
    let id = parse_id(&id, "binding")?;
    let actor = Actor::new(&who.caller, method);
    ucb::resume(&c.ctx.core, actor, &tenant, id)
        .await
        .map_err(fail)?;
    Ok(see_other(format!("/bindings/{id}")))
}

/// The trigger form.
#[derive(Debug, Deserialize)]
pub struct TriggerForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    params: String,
}

/// POST /bindings/{id}/trigger (TriggerRun); then the new run's page.
pub async fn trigger(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<TriggerForm>,
) -> PageResult {
    let who = poster(&c, &headers, &f.csrf).await?;
    let (method, tenant) = c
        .authorize(&who, "/sked.v1.RunService/TriggerRun")
        .map_err(fail)?;
    c.ctx.rates.runs(&tenant, 1).map_err(fail)?;
    let id = parse_id(&id, "binding")?;
    let params = match f.params.trim() {
        "" => None,
        p => match serde_json::from_str::<serde_json::Value>(p) {
            Ok(v @ serde_json::Value::Object(_)) => Some(v),
            _ => {
                return Err(fail(Failure::new(
                    StatusCode::BAD_REQUEST,
                    "params: must be a JSON object, e.g. {\"key\": \"value\"}",
                )));
            }
        },
    };
    let t = ucr::Trigger {
        binding_id: id,
        idempotency_key: String::new(),
        run_time: None,
        params,
    };
    let actor = Actor::new(&who.caller, method);
    let run = ucr::trigger(&c.ctx.core, actor, &tenant, t)
        .await
        .map_err(fail)?;
    Ok(see_other(format!("/runs/{}", run.id)))
}

// ---- runs ---------------------------------------------------------------

/// GET /runs/{id}: the run, its state timeline and its log; the log then
/// follows live over /runs/{id}/tail (GetRun, ListRunEvents, TailRun).
pub async fn run(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> PageResult {
    let who = c.require(&headers, true).await?;
    let (_, tenant) = c
        .authorize(&who, "/sked.v1.RunService/GetRun")
        .map_err(fail)?;
    c.authorize(&who, "/sked.v1.LogService/ListRunEvents")
        .map_err(fail)?;
    let id = parse_id(&id, "run")?;
    let core = &c.ctx.core;
    let r = ucr::get(core, &tenant, id).await.map_err(fail)?;
    let events = ucr::list_events(core, &tenant, id, 0, RUN_EVENTS)
        .await
        .map_err(fail)?;
    let last_seq = events.last().map_or(0, |e| e.seq);
    let workflow = ucr::workflow_views(core, &tenant, std::slice::from_ref(&r), true)
        .await
        .map_err(fail)?
        .pop()
        .unwrap_or_default();
    let terminal = r.state.is_terminal();
    let can_cancel = !terminal && who.can("/sked.v1.RunService/CancelRun");
    let can_retry = terminal && who.can("/sked.v1.RunService/RetryRun");
    let handler = match &r.handler {
        Handler::Command(_) => "command",
        Handler::Event => "event",
        Handler::Http(_) => "http",
        Handler::Worker(_) => "worker",
        Handler::Workflow(_) => "workflow",
    };
    let body = html! {
        p { "State " span id="run-state" { (views::state_badge(r.state)) }
            @if let Some(reason) = &r.reason { " — " (reason) } }
        dl class="facts" {
            dt { "Run" } dd { code { (r.id) } }
            dt { "Binding" } dd { a href={"/bindings/" (r.binding_id)} { (r.definition) } }
            dt { "Trigger" } dd { (r.trigger.as_str()) ", attempt " (r.attempt) }
            dt { "Handler" } dd { (handler) }
            dt { "Fire time" } dd { (views::time(r.scheduled_time)) }
            dt { "Started" } dd { (views::opt_time(r.start_time)) }
            dt { "Ended" } dd { (views::opt_time(r.end_time)) }
            dt { "Node" } dd { (r.node_id.clone().unwrap_or_else(|| "—".into())) }
            @if let Some(code) = r.exit_code { dt { "Exit code" } dd { (code) } }
            @if let Some(e) = &r.error_message { dt { "Error" } dd { (e) } }
            @if let Some(p) = &r.progress { dt { "Progress" } dd { (format!("{:.0} %", p.percent)) " " (p.message) } }
        }
        @if let (Some(parent), Some(step)) = (workflow.parent_run_id, &workflow.step) {
            p { "Step " strong { (step) } " of workflow run " a href={"/runs/" (parent)} { code { (parent) } } }
        }
        @if !workflow.steps.is_empty() {
            section aria-labelledby="steps-h" {
                h2 id="steps-h" { "Steps" }
                ol class="steps" {
                    @for (name, latest) in &workflow.steps {
                        li { strong { (name) } " "
                            @match latest {
                                Some(s) => { a href={"/runs/" (s.id)} { (views::state_badge(s.state)) } " attempt " (s.attempt) }
                                None => span class="muted" { "not started" },
                            }
                        }
                    }
                }
            }
        }
        @if can_cancel || can_retry {
            section class="actions" aria-labelledby="run-actions-h" {
                h2 id="run-actions-h" { "Actions" }
                @if can_cancel {
                    form method="post" action={"/runs/" (r.id) "/cancel"} class="inline" {
                        (csrf(&who))
                        label for="reason" { "Reason" }
                        input id="reason" name="reason" type="text" maxlength="500";
                        button type="submit" id="cancel" { "Cancel run" }
                    }
                }
                @if can_retry {
                    form method="post" action={"/runs/" (r.id) "/retry"} class="inline" {
                        (csrf(&who))
                        button type="submit" id="retry" { "Retry" }
                    }
                }
            }
        }
        section aria-labelledby="timeline-h" {
            h2 id="timeline-h" { "State timeline" }
            ol class="timeline" id="timeline" {
                @for e in &events {
                    @if let EventBody::StateChanged { from, to, reason } = &e.body {
                        li { (views::time(e.time)) " " @if let Some(f) = from { (f.as_str()) " → " } (views::state_badge(*to))
                            @if !reason.is_empty() { " (" (reason) ")" } }
                    }
                }
            }
        }
        section aria-labelledby="log-h" {
            h2 id="log-h" { "Log" }
            p class="muted" id="tail-status" aria-live="polite" {
                @if terminal { "The run has ended." } @else { "The run is live: reload for new lines, or enable JavaScript to follow them." }
            }
            pre id="log" class="log" tabindex="0" aria-label="Run log"
                data-tail={"/runs/" (r.id) "/tail"} data-last-seq=(last_seq) data-live=(if terminal { "false" } else { "true" }) {
                @for e in &events {
                    @if let EventBody::Log { stream, message } = &e.body {
                        span class={"line " (format!("{stream:?}").to_lowercase())} data-seq=(e.seq) { (message) "\n" }
                    }
                }
            }
        }
    };
    Ok(page(&who, &format!("Run of {}", r.definition), body))
}

/// Where a tail starts.
#[derive(Debug, Deserialize, Default)]
pub struct TailQuery {
    #[serde(default)]
    after: Option<i64>,
}

/// GET /runs/{id}/tail: Server-Sent Events of the run's events after
/// `Last-Event-ID` (a reconnecting browser sends the last seq it got) or
/// `?after=`; each event's id is its seq, so a reconnect resumes where the
/// last one stopped, without loss or repeat. Log lines are `log` events,
/// transitions `state` events, others `other`; `end` follows the run's
/// terminal event (TailRun).
pub async fn tail(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TailQuery>,
) -> PageResult {
    let who = c.require(&headers, false).await?;
    let (_, tenant) = c
        .authorize(&who, "/sked.v1.LogService/TailRun")
        .map_err(fail)?;
    let id = parse_id(&id, "run")?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .or(q.after)
        .unwrap_or(0)
        .max(0);
    let core = &c.ctx.core;
    let r = ucr::get(core, &tenant, id).await.map_err(fail)?;
    let permit = c.ctx.costly.stream_permit(&tenant, None).map_err(fail)?;
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(tail::tail_run(
        core.pool.clone(),
        core.bus.clone(),
        tenant,
        id,
        after,
        // An ended run: what is left to replay, then the end.
        !r.state.is_terminal(),
        tx,
        c.ctx.streams_stop.clone(),
    ));
    let (out, out_rx) = mpsc::channel::<Result<Event, Infallible>>(SSE_BUFFER);
    tokio::spawn(async move {
        let _permit = permit;
        while let Some(item) = rx.recv().await {
            let Ok(events) = item else {
                let _ = out
                    .send(Ok(Event::default()
                        .event("error")
                        .data("the log could not be read; reload")))
                    .await;
                return;
            };
            for e in events {
                let (kind, data) = match &e.body {
                    EventBody::Log { stream, message } => (
                        "log",
                        serde_json::json!({"seq": e.seq, "time": e.time, "stream": stream, "message": message}),
                    ),
                    EventBody::StateChanged { from, to, reason } => (
                        "state",
                        serde_json::json!({"seq": e.seq, "time": e.time, "from": from.map(|f| f.as_str()), "to": to.as_str(), "reason": reason}),
                    ),
                    _ => ("other", serde_json::json!({"seq": e.seq})),
                };
                let ev = Event::default()
                    .id(e.seq.to_string())
                    .event(kind)
                    .data(data.to_string());
                if out.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        }
        let _ = out.send(Ok(Event::default().event("end").data("{}"))).await;
    });
    Ok(Sse::new(ReceiverStream::new(out_rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The cancel form.
#[derive(Debug, Deserialize)]
pub struct CancelForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

/// POST /runs/{id}/cancel (CancelRun).
pub async fn cancel(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CancelForm>,
) -> PageResult {
    let who = poster(&c, &headers, &f.csrf).await?;
    let (method, tenant) = c
        .authorize(&who, "/sked.v1.RunService/CancelRun")
        .map_err(fail)?;
    let id = parse_id(&id, "run")?;
    let actor = Actor::new(&who.caller, method);
    ucr::cancel(&c.ctx.core, actor, &tenant, id, f.reason.trim())
        .await
        .map_err(fail)?;
    Ok(see_other(format!("/runs/{id}")))
}

/// POST /runs/{id}/retry (RetryRun); then the new attempt's page.
pub async fn retry(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<Plain>,
) -> PageResult {
    let who = poster(&c, &headers, &f.csrf).await?;
    let (method, tenant) = c
        .authorize(&who, "/sked.v1.RunService/RetryRun")
        .map_err(fail)?;
    c.ctx.rates.runs(&tenant, 1).map_err(fail)?;
    let id = parse_id(&id, "run")?;
    let actor = Actor::new(&who.caller, method);
    let run = ucr::retry(&c.ctx.core, actor, &tenant, id)
        .await
        .map_err(fail)?;
    Ok(see_other(format!("/runs/{}", run.id)))
}

// ---- platform -----------------------------------------------------------

/// GET /status: nodes, leader, queue depth, fire lag (GetSchedulerStatus:
/// platform admins).
pub async fn status(State(c): State<Console>, headers: HeaderMap) -> PageResult {
    let who = c.require(&headers, true).await?;
    c.authorize(&who, "/sked.v1.AdminService/GetSchedulerStatus")
        .map_err(fail)?;
    c.authorize(&who, "/sked.v1.RunService/GetRunStats")
        .map_err(fail)?;
    let s = usecase::status::scheduler_status(&c.ctx.core)
        .await
        .map_err(fail)?;
    let secs = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.3} s"));
    // The last hour's fire lag of the chosen tenant's runs (GetRunStats:
    // exact over the runs that ended, where the status sample covers the
    // last minute of the whole cluster).
    let now = c.ctx.core.clock.now();
    let hour = match &who.tenant {
        Some(t) => Some((
            t.clone(),
            ucr::stats(
                &c.ctx.core,
                &StatsQuery {
                    subject: StatsSubject::Tenant(t.clone()),
                    start: now - TimeDelta::hours(1),
                    end: now,
                    interval: Some(StatsInterval::Hour),
                },
            )
            .await
            .map_err(fail)?,
        )),
        None => None,
    };
    let us = |v: Option<i64>| v.map_or("—".to_string(), views::micros);
    let body = html! {
        p { "As seen by node " code { (s.node_id) } " at " (views::time(s.time)) "." }
        h2 { "Queue" }
        dl class="facts" {
            dt { "Scheduled" } dd id="count-scheduled" { (s.counts.scheduled) }
            dt { "Queued" } dd id="count-queued" { (s.counts.queued) }
            dt { "Running" } dd id="count-running" { (s.counts.running) }
            dt { "Oldest queued run due" } dd { (views::opt_time(s.counts.oldest_queued_due)) }
            dt { "Live streams on this node" } dd { (s.stream_subscribers) }
        }
        h2 { "Fire lag" }
        p { "Runs started in the last minute: " (s.fire_lag.runs) "; p50 " (secs(s.fire_lag.p50_secs))
            ", p99 " (secs(s.fire_lag.p99_secs)) ", max " (secs(s.fire_lag.max_secs)) "." }
        @if let Some((t, h)) = &hour {
            p id="lag-hour" { "Tenant " strong { (t) } ", runs scheduled in the last hour (whole hours, UTC) that ended: "
                (h.counts.total()) "; fire lag p50 " (us(h.lag_p50_us)) ", p99 " (us(h.lag_p99_us))
                "; duration p50 " (us(h.duration_p50_us)) ", p95 " (us(h.duration_p95_us)) "." }
        }
        h2 { "Maintenance leader" }
        @match &s.leader {
            Some(l) => p { code { (l.node_id) } " (term " (l.term) ", lease until " (views::time(l.expire_time)) @if l.expired { ", EXPIRED" } ")" },
            None => p { "No leader holds the lease." },
        }
        h2 { "Nodes" }
        table class="list" {
            thead { tr { th scope="col" { "Node" } th scope="col" { "Version" } th scope="col" { "Started" } th scope="col" { "Heartbeat" } th scope="col" { "State" } } }
            tbody {
                @for n in &s.nodes {
                    tr { td { code { (n.node_id) } } td { (n.version) } td { (views::time(n.start_time)) }
                         td { (views::time(n.heartbeat_time)) }
                         td { @if n.stale { span class="badge bad" { "stale" } } @else { span class="badge ok" { "live" } } } }
                }
            }
        }
    };
    Ok(page(&who, "Scheduler status", body))
}

/// GET /definitions: the definitions the key may see (ListDefinitions).
pub async fn definitions(State(c): State<Console>, headers: HeaderMap) -> PageResult {
    let who = c.require(&headers, true).await?;
    c.authorize(&who, "/sked.v1.DefinitionService/ListDefinitions")
        .map_err(fail)?;
    let page_of = Page {
        size: 500,
        after: None,
    };
    let (defs, more) =
        usecase::definitions::list(&c.ctx.core, who.caller.tenant.as_deref(), page_of)
            .await
            .map_err(fail)?;
    let body = html! {
        @if defs.is_empty() { p { "No definitions." } } @else {
            table class="list" {
                thead { tr { th scope="col" { "Name" } th scope="col" { "Handler" } th scope="col" { "Schedule" }
                    th scope="col" { "Enabled" } th scope="col" { "Description" } } }
                tbody {
                    @for d in &defs {
                        tr {
                            td { code { (d.name) } @if !d.display_name.is_empty() { br; (d.display_name) } }
                            td { (match &d.handler { Handler::Command(_) => "command", Handler::Event => "event", Handler::Http(_) => "http", Handler::Worker(_) => "worker", Handler::Workflow(_) => "workflow" }) }
                            td { code { (serde_json::to_string(&d.schedule).unwrap_or_default()) } }
                            td { (if d.enabled { "yes" } else { "no" }) }
                            td { (d.description) }
                        }
                    }
                }
            }
            @if more.is_some() { p class="muted" { "Showing the first 500." } }
        }
    };
    Ok(page(&who, "Definitions", body))
}
