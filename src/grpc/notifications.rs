//! `sked.v1.NotificationService`: failure notification rules of
//! definitions and bindings, and their deliveries. Parses, calls
//! [`usecase::notifications`], converts.

use tonic::{Request, Response, Status};

use super::authz::{Grant, grant, tenant_grant};
use super::convert::{state_to, time_to};
use super::{Ctx, invalid, page_size, parse_uuid};
use crate::domain::notify::{Rule, Trigger};
use crate::domain::{FieldViolation, RunState, validate_definition_name};
use crate::proto::v1 as pb;
use crate::proto::v1::notification_service_server::NotificationService;
use crate::usecase::Actor;
use crate::usecase::notifications::{self as uc, RuleShown};

/// Implements `NotificationService`.
#[derive(Debug, Clone)]
pub struct Notifications(pub Ctx);

fn rules_from(rules: &[pb::NotificationRule]) -> Result<Vec<Rule>, Status> {
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let trigger = match pb::NotificationTrigger::try_from(r.trigger) {
                Ok(pb::NotificationTrigger::Failure) => Trigger::Failure,
                Ok(pb::NotificationTrigger::ConsecutiveFailures) => Trigger::ConsecutiveFailures,
                Ok(pb::NotificationTrigger::Recovery) => Trigger::Recovery,
                _ => {
                    return Err(invalid(FieldViolation::new(
                        format!("rules[{i}].trigger"),
                        "is required: FAILURE, CONSECUTIVE_FAILURES or RECOVERY",
                    )));
                }
            };
            if !r.signing_secret.is_empty() {
                return Err(invalid(FieldViolation::new(
                    format!("rules[{i}].signing_secret"),
                    "is output only: sked generates secrets (rotate_secret asks for a new one)",
                )));
            }
            Ok(Rule {
                name: r.name.clone(),
                url: r.url.clone(),
                trigger,
                consecutive_failures: r.consecutive_failures,
                every_attempt: r.every_attempt,
                rotate_secret: r.rotate_secret,
            })
        })
        .collect()
}

pub(crate) fn rule_to(r: &uc::StoredRule, secret: Option<String>) -> pb::NotificationRule {
    let trigger = match Trigger::parse(&r.trigger) {
        Some(Trigger::Failure) => pb::NotificationTrigger::Failure,
        Some(Trigger::ConsecutiveFailures) => pb::NotificationTrigger::ConsecutiveFailures,
        Some(Trigger::Recovery) => pb::NotificationTrigger::Recovery,
        None => pb::NotificationTrigger::Unspecified,
    };
    pb::NotificationRule {
        name: r.name.clone(),
        url: r.url.clone(),
        trigger: trigger as i32,
        consecutive_failures: r.consecutive_failures,
        every_attempt: r.every_attempt,
        rotate_secret: false,
        signing_secret: secret.unwrap_or_default(),
        secret_create_time: Some(time_to(r.create_time)),
    }
}

fn shown_to(rules: Vec<RuleShown>, overridden: bool) -> pb::NotificationRules {
    pb::NotificationRules {
        rules: rules
            .into_iter()
            .map(|r| rule_to(&r.rule, r.secret))
            .collect(),
        overridden,
    }
}

fn notification_to(n: uc::Notification) -> pb::Notification {
    let state = match n.state.as_str() {
        "PENDING" => pb::NotificationState::Pending,
        "DELIVERED" => pb::NotificationState::Delivered,
        "FAILED" => pb::NotificationState::Failed,
        _ => pb::NotificationState::Unspecified,
    };
    pb::Notification {
        id: n.id.to_string(),
        rule: n.rule_name,
        tenant_id: n.tenant_id,
        binding_id: n.binding_id.to_string(),
        definition: n.definition,
        run_id: n.run_id.map(|r| r.to_string()).unwrap_or_default(),
        run_attempt: n.run_attempt.unwrap_or(0),
        run_state: n
            .run_state
            .as_deref()
            .and_then(RunState::parse)
            .map_or(pb::RunState::Unspecified, state_to) as i32,
        reason: n.reason.unwrap_or_default(),
        event: n.event,
        consecutive_failures: n.consecutive_failures,
        scheduled_time: n.scheduled_time.map(time_to),
        start_time: n.start_time.map(time_to),
        end_time: n.end_time.map(time_to),
        create_time: Some(time_to(n.create_time)),
        state: state as i32,
        delivery_attempts: n.attempts,
        last_attempt_time: n.last_attempt_time.map(time_to),
        last_status_code: n.last_status.unwrap_or(0),
        last_error: n.last_error.unwrap_or_default(),
        delivered_time: n.delivered_time.map(time_to),
        next_attempt_time: (n.state == "PENDING")
            .then(|| time_to(n.next_attempt_time.max(n.create_time))),
    }
}

#[tonic::async_trait]
impl NotificationService for Notifications {
    async fn set_definition_notification_rules(
        &self,
        req: Request<pb::SetDefinitionNotificationRulesRequest>,
    ) -> Result<Response<pb::NotificationRules>, Status> {
        let Grant { caller, method, .. } = grant(&req)?;
        let r = req.into_inner();
        validate_definition_name("definition", &r.definition).map_err(invalid)?;
        let rules = rules_from(&r.rules)?;
        let actor = Actor::new(&caller, method);
        let shown = uc::set_rules(
            &self.0.core,
            self.0.notify_key.as_ref(),
            actor,
            uc::Owner::Definition(&r.definition),
            &rules,
            true,
        )
        .await?;
        Ok(Response::new(shown_to(shown, false)))
    }

    async fn set_binding_notification_rules(
        &self,
        req: Request<pb::SetBindingNotificationRulesRequest>,
    ) -> Result<Response<pb::NotificationRules>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let id = parse_uuid("binding_id", &r.binding_id)?;
        let rules = rules_from(&r.rules)?;
        let actor = Actor::new(&caller, method);
        let shown = uc::set_rules(
            &self.0.core,
            self.0.notify_key.as_ref(),
            actor,
            uc::Owner::Binding {
                tenant: &tenant_id,
                id,
            },
            &rules,
            !r.inherit,
        )
        .await?;
        Ok(Response::new(shown_to(shown, !r.inherit)))
    }

    async fn get_binding_notification_rules(
        &self,
        req: Request<pb::GetBindingNotificationRulesRequest>,
    ) -> Result<Response<pb::NotificationRules>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let id = parse_uuid("binding_id", &req.get_ref().binding_id)?;
        let e = uc::effective_rules(&self.0.core, &tenant_id, id).await?;
        Ok(Response::new(pb::NotificationRules {
            rules: e.rules.iter().map(|r| rule_to(r, None)).collect(),
            overridden: e.overrides,
        }))
    }

    async fn list_notifications(
        &self,
        req: Request<pb::ListNotificationsRequest>,
    ) -> Result<Response<pb::ListNotificationsResponse>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let limit = page_size(r.page_size, 100)?;
        let scope = match (r.binding_id.is_empty(), r.run_id.is_empty()) {
            (false, true) => uc::Scope::Binding(parse_uuid("binding_id", &r.binding_id)?),
            (true, false) => uc::Scope::Run(parse_uuid("run_id", &r.run_id)?),
            _ => {
                return Err(invalid(FieldViolation::new(
                    "binding_id",
                    "exactly one of binding_id and run_id is required",
                )));
            }
        };
        let list = uc::list(&self.0.core, &tenant_id, scope, limit).await?;
        Ok(Response::new(pb::ListNotificationsResponse {
            notifications: list.into_iter().map(notification_to).collect(),
        }))
    }
}
