//! Authentication, roles, tenant isolation, definition scope and protection,
//! and the audit log, through the API with real keys on a node that
//! requires them (as every node with a DATABASE_URL does).

use std::time::Duration;

use crate::common::*;
use sked::proto::v1 as pb;
use tonic::Code;

/// A node with auth on, and a platform admin token made the way
/// `sked admin bootstrap-key` makes it.
async fn secured(db: &TestDb) -> (TestNode, String) {
    let root = sked::app::bootstrap_key(&db.url, "root")
        .await
        .expect("bootstrap key");
    let mut s = settings(db, "secure");
    s.auth = true;
    (TestNode::start_with(s).await, root)
}

/// Creates a key with `role` for `tenant` ("" = platform) using `admin`.
async fn make_key(node: &TestNode, admin: &str, role: pb::Role, tenant: &str) -> (String, String) {
    let r = node
        .admin()
        .create_api_key(with_key(
            admin,
            pb::CreateApiKeyRequest {
                name: format!("{tenant}-{}", role.as_str_name()),
                role: role as i32,
                tenant_id: tenant.into(),
            },
        ))
        .await
        .expect("create api key")
        .into_inner();
    (r.key.unwrap().id, r.token)
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn def(name: &str) -> pb::TaskDefinition {
    sh_def(name, "echo hi", manual())
}

async fn create_def(node: &TestNode, token: &str, d: pb::TaskDefinition) -> Code {
    code(
        node.definitions()
            .create_definition(with_key(
                token,
                pb::CreateDefinitionRequest {
                    definition: Some(d),
                },
            ))
            .await,
    )
}

async fn bind(
    node: &TestNode,
    token: &str,
    tenant: &str,
    definition: &str,
) -> Result<pb::Binding, tonic::Status> {
    node.bindings()
        .create_binding(request(
            tenant,
            Some(token),
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: definition.into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_revoked_and_forged_keys_are_unauthenticated() {
    let db = TestDb::new().await;
    let (node, root) = secured(&db).await;
    let list = |req: tonic::Request<pb::ListDefinitionsRequest>| {
        let mut c = node.definitions();
        async move { code(c.list_definitions(req).await) }
    };
    assert_eq!(list(with_key(&root, Default::default())).await, Code::Ok);
    // No key at all (the header alone is not enough).
    assert_eq!(
        list(as_tenant("acme", Default::default())).await,
        Code::Unauthenticated
    );
    // Not a token, a token of an unknown key, the right key id with a forged secret.
    assert_eq!(
        list(with_key("hunter2", Default::default())).await,
        Code::Unauthenticated
    );
    let unknown = format!("sked_{}_{}", uuid::Uuid::now_v7().simple(), "ab".repeat(32));
    assert_eq!(
        list(with_key(&unknown, Default::default())).await,
        Code::Unauthenticated
    );
    let (prefix, secret) = root.rsplit_once('_').unwrap();
    let flipped: String = secret
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();
    let forged = format!("{prefix}_{flipped}");
    assert_eq!(
        list(with_key(&forged, Default::default())).await,
        Code::Unauthenticated
    );
    // A burst of forged secrets for one key costs at most one Argon2
    // verification at a time, and then one a second: all are refused, and
    // the real key (verified before) keeps working throughout.
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let mut c = node.definitions();
            let forged = forged.clone();
            tokio::spawn(async move {
                code(
                    c.list_definitions(with_key(&forged, Default::default()))
                        .await,
                )
            })
        })
        .collect();
    assert_eq!(list(with_key(&root, Default::default())).await, Code::Ok);
    for b in burst {
        assert_eq!(b.await.unwrap(), Code::Unauthenticated);
    }
    let mut raw = tonic::Request::new(pb::ListDefinitionsRequest::default());
    raw.metadata_mut()
        .insert("authorization", format!("Basic {root}").parse().unwrap());
    assert_eq!(list(raw).await, Code::Unauthenticated);

    // A revoked key stops working at once; revoking it again keeps the time.
    let (id, viewer) = make_key(&node, &root, pb::Role::Viewer, "acme").await;
    assert_eq!(list(with_key(&viewer, Default::default())).await, Code::Ok);
    let revoked = node
        .admin()
        .revoke_api_key(with_key(
            &root,
            pb::RevokeApiKeyRequest { key_id: id.clone() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoke_time.is_some());
    assert_eq!(
        list(with_key(&viewer, Default::default())).await,
        Code::Unauthenticated
    );
    let again = node
        .admin()
        .revoke_api_key(with_key(&root, pb::RevokeApiKeyRequest { key_id: id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.revoke_time, revoked.revoke_time);
    // Health and reflection answer without a key (load balancers, grpcurl list).
    let health = tonic_health::pb::health_client::HealthClient::new(node.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_what_spec_6_says_and_no_more() {
    let db = TestDb::new().await;
    let (node, root) = secured(&db).await;
    assert_eq!(create_def(&node, &root, def("shared")).await, Code::Ok);
    let (_, p_view) = make_key(&node, &root, pb::Role::Viewer, "").await;
    let (_, p_op) = make_key(&node, &root, pb::Role::Operator, "").await;

    // Per tenant key role: (read, operate, administer own tenant).
    let roles = [
        (pb::Role::Viewer, [true, false, false]),
        (pb::Role::Operator, [true, true, false]),
        (pb::Role::Admin, [true, true, true]),
    ];
    for (i, (role, [read, operate, admin])) in roles.into_iter().enumerate() {
        let tenant = format!("t{i}");
        let (_, key) = make_key(&node, &root, role, &tenant).await;
        // A binding made by the platform so reads and pause have a target.
        let b = bind(&node, &root, &tenant, "shared").await.unwrap();
        let ok = |c: Code, allowed: bool, what: &str| {
            let want = if allowed {
                Code::Ok
            } else {
                Code::PermissionDenied
            };
            assert_eq!(c, want, "{role:?} {what}");
        };
        // Read class.
        ok(
            code(
                node.bindings()
                    .get_binding(request(
                        "",
                        Some(&key),
                        pb::GetBindingRequest {
                            binding_id: b.id.clone(),
                        },
                    ))
                    .await,
            ),
            read,
            "GetBinding",
        );
        ok(
            code(
                node.bindings()
                    .list_bindings(with_key(&key, Default::default()))
                    .await,
            ),
            read,
            "ListBindings",
        );
        ok(
            code(
                node.runs()
                    .list_runs(with_key(&key, Default::default()))
                    .await,
            ),
            read,
            "ListRuns",
        );
        ok(
            code(
                node.definitions()
                    .list_definitions(with_key(&key, Default::default()))
                    .await,
            ),
            read,
            "ListDefinitions",
        );
        ok(
            code(
                node.admin()
                    .get_quota_usage(with_key(&key, Default::default()))
                    .await,
            ),
            read,
            "GetQuotaUsage",
        );
        // Operate class: bindings and runs.
        ok(
            code(
                node.runs()
                    .trigger_run(with_key(
                        &key,
                        pb::TriggerRunRequest {
                            binding_id: b.id.clone(),
                            ..Default::default()
                        },
                    ))
                    .await,
            ),
            operate,
            "TriggerRun",
        );
        ok(
            code(
                node.bindings()
                    .pause_binding(with_key(
                        &key,
                        pb::PauseBindingRequest {
                            binding_id: b.id.clone(),
                            ..Default::default()
                        },
                    ))
                    .await,
            ),
            operate,
            "PauseBinding",
        );
        ok(
            code(
                node.bindings()
                    .delete_binding(with_key(
                        &key,
                        pb::DeleteBindingRequest {
                            binding_id: b.id.clone(),
                        },
                    ))
                    .await,
            ),
            operate,
            "DeleteBinding",
        );
        // Administer class, own tenant: keys and the audit log.
        ok(
            code(
                node.admin()
                    .create_api_key(with_key(
                        &key,
                        pb::CreateApiKeyRequest {
                            name: "x".into(),
                            role: pb::Role::Viewer as i32,
                            tenant_id: String::new(),
                        },
                    ))
                    .await,
            ),
            admin,
            "CreateApiKey",
        );
        ok(
            code(
                node.admin()
                    .list_audit_events(with_key(&key, Default::default()))
                    .await,
            ),
            admin,
            "ListAuditEvents",
        );
        // Platform-only, whatever the tenant role: definitions, quotas, platform keys.
        assert_eq!(
            create_def(&node, &key, def(&format!("d{i}"))).await,
            Code::PermissionDenied,
            "{role:?} CreateDefinition"
        );
        assert_eq!(
            code(
                node.admin()
                    .set_tenant_quota(with_key(
                        &key,
                        pb::SetTenantQuotaRequest {
                            quota: Some(pb::TenantQuota {
                                tenant_id: tenant.clone(),
                                max_bindings: Some(100),
                                ..Default::default()
                            })
                        }
                    ))
                    .await
            ),
            Code::PermissionDenied,
            "{role:?} SetTenantQuota"
        );
        assert_eq!(
            code(
                node.definitions()
                    .delete_definition(with_key(
                        &key,
                        pb::DeleteDefinitionRequest {
                            name: "shared".into(),
                            force: true
                        }
                    ))
                    .await
            ),
            Code::PermissionDenied,
            "{role:?} DeleteDefinition"
        );
        // Viewer and operator lack the role; the admin lacks the tenant.
        assert_eq!(
            code(
                node.admin()
                    .create_api_key(with_key(
                        &key,
                        pb::CreateApiKeyRequest {
                            name: "x".into(),
                            role: pb::Role::Admin as i32,
                            tenant_id: "elsewhere".into()
                        }
                    ))
                    .await
            ),
            Code::PermissionDenied,
            "{role:?} CreateApiKey for another tenant"
        );
    }

    // Platform keys: the role still decides, the tenant comes from x-tenant-id.
    let b = bind(&node, &root, "acme", "shared").await.unwrap();
    assert_eq!(
        code(
            node.bindings()
                .get_binding(request(
                    "acme",
                    Some(&p_view),
                    pb::GetBindingRequest {
                        binding_id: b.id.clone()
                    }
                ))
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            node.runs()
                .trigger_run(request(
                    "acme",
                    Some(&p_view),
                    pb::TriggerRunRequest {
                        binding_id: b.id.clone(),
                        ..Default::default()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            node.runs()
                .trigger_run(request(
                    "acme",
                    Some(&p_op),
                    pb::TriggerRunRequest {
                        binding_id: b.id.clone(),
                        ..Default::default()
                    }
                ))
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        create_def(&node, &p_op, def("by-operator")).await,
        Code::PermissionDenied
    );
    let missing_tenant = node
        .bindings()
        .get_binding(with_key(
            &p_op,
            pb::GetBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing_tenant.code(), Code::InvalidArgument);
    assert_eq!(violation_fields(&missing_tenant), vec!["x-tenant-id"]);
    assert_eq!(
        code(
            node.admin()
                .set_tenant_quota(with_key(
                    &root,
                    pb::SetTenantQuotaRequest {
                        quota: Some(pb::TenantQuota {
                            tenant_id: "acme".into(),
                            max_bindings: Some(100),
                            ..Default::default()
                        })
                    }
                ))
                .await
        ),
        Code::Ok
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_sees_nothing_of_another_tenant() {
    let db = TestDb::new().await;
    let (node, root) = secured(&db).await;
    assert_eq!(
        create_def(
            &node,
            &root,
            sh_def(
                "work",
                "for i in 1 2 3; do echo b-line-$i; sleep 0.3; done",
                manual()
            )
        )
        .await,
        Code::Ok
    );
    let (_, a) = make_key(&node, &root, pb::Role::Admin, "tenant-a").await;
    let (_, b) = make_key(&node, &root, pb::Role::Operator, "tenant-b").await;
    let a_binding = bind(&node, &a, "", "work")
        .await
        .expect("a binds with its own key");
    assert_eq!(a_binding.tenant_id, "tenant-a");
    let b_binding = bind(&node, &b, "", "work").await.unwrap();

    // A watches its tenant while B's run executes.
    let mut watch = node
        .logs()
        .watch_events(with_key(&a, pb::WatchEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let b_run = trigger_via(&node.channel, "", Some(&b), &b_binding.id).await;

    let nf = |r: Code, what: &str| assert_eq!(r, Code::NotFound, "{what}");
    nf(
        code(
            node.bindings()
                .get_binding(with_key(
                    &a,
                    pb::GetBindingRequest {
                        binding_id: b_binding.id.clone(),
                    },
                ))
                .await,
        ),
        "GetBinding",
    );
    nf(
        code(
            node.bindings()
                .pause_binding(with_key(
                    &a,
                    pb::PauseBindingRequest {
                        binding_id: b_binding.id.clone(),
                        ..Default::default()
                    },
                ))
                .await,
        ),
        "PauseBinding",
    );
    nf(
        code(
            node.bindings()
                .delete_binding(with_key(
                    &a,
                    pb::DeleteBindingRequest {
                        binding_id: b_binding.id.clone(),
                    },
                ))
                .await,
        ),
        "DeleteBinding",
    );
    nf(
        code(
            node.runs()
                .get_run(with_key(
                    &a,
                    pb::GetRunRequest {
                        run_id: b_run.id.clone(),
                    },
                ))
                .await,
        ),
        "GetRun",
    );
    nf(
        code(
            node.runs()
                .cancel_run(with_key(
                    &a,
                    pb::CancelRunRequest {
                        run_id: b_run.id.clone(),
                        reason: String::new(),
                    },
                ))
                .await,
        ),
        "CancelRun",
    );
    nf(
        code(
            node.runs()
                .trigger_run(with_key(
                    &a,
                    pb::TriggerRunRequest {
                        binding_id: b_binding.id.clone(),
                        ..Default::default()
                    },
                ))
                .await,
        ),
        "TriggerRun",
    );
    nf(
        code(
            node.logs()
                .list_run_events(with_key(
                    &a,
                    pb::ListRunEventsRequest {
                        run_id: b_run.id.clone(),
                        ..Default::default()
                    },
                ))
                .await,
        ),
        "ListRunEvents",
    );
    nf(
        code(
            node.logs()
                .tail_run(with_key(
                    &a,
                    pb::TailRunRequest {
                        run_id: b_run.id.clone(),
                        after_seq: 0,
                        follow: true,
                    },
                ))
                .await,
        ),
        "TailRun",
    );
    // A key cannot borrow another tenant with the header.
    assert_eq!(
        code(
            node.runs()
                .get_run(request(
                    "tenant-b",
                    Some(&a),
                    pb::GetRunRequest {
                        run_id: b_run.id.clone()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    // Lists hold only A's own.
    let runs = node
        .runs()
        .list_runs(with_key(&a, Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(runs.runs.is_empty(), "{:?}", runs.runs);
    let bindings = node
        .bindings()
        .list_bindings(with_key(&a, Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        bindings
            .bindings
            .iter()
            .map(|b| b.id.clone())
            .collect::<Vec<_>>(),
        vec![a_binding.id.clone()]
    );
    // Tenant admins see only their own keys and audit events.
    let keys = node
        .admin()
        .list_api_keys(with_key(&a, Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        keys.keys.iter().all(|k| k.tenant_id == "tenant-a"),
        "{:?}",
        keys.keys
    );
    let audit = node
        .admin()
        .list_audit_events(with_key(
            &a,
            pb::ListAuditEventsRequest {
                tenant_id: "tenant-b".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        audit.events.iter().all(|e| e.tenant_id == "tenant-a"),
        "{:?}",
        audit.events
    );
    assert_eq!(
        code(
            node.admin()
                .get_quota_usage(with_key(
                    &a,
                    pb::GetQuotaUsageRequest {
                        tenant_id: "tenant-b".into()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );

    // B's run ends (B's own key can tail it); then A triggers its own run,
    // and A's watch shows A's events and none of B's.
    let b_events = tokio::time::timeout(
        WAIT,
        drain(
            node.logs()
                .tail_run(with_key(
                    &b,
                    pb::TailRunRequest {
                        run_id: b_run.id.clone(),
                        after_seq: 0,
                        follow: true,
                    },
                ))
                .await
                .unwrap()
                .into_inner(),
        ),
    )
    .await
    .unwrap();
    assert!(log_lines(&b_events).contains(&"b-line-3".to_string()));
    let a_run = trigger_via(&node.channel, "", Some(&a), &a_binding.id).await;
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(m) = watch.message().await.unwrap() {
            if let Some(e) = m.event {
                let terminal = matches!(&e.kind, Some(pb::run_event::Kind::StateChanged(s)) if s.to_state == pb::RunState::Succeeded as i32);
                let mine = e.run_id == a_run.id;
                seen.push(e);
                if mine && terminal {
                    return;
                }
            }
        }
    })
    .await
    .expect("A's run ends within the wait");
    assert!(
        seen.iter()
            .all(|e| e.tenant_id == "tenant-a" && e.run_id == a_run.id),
        "A saw another tenant's events: {seen:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_scope_and_protected_definitions() {
    let db = TestDb::new().await;
    let (node, root) = secured(&db).await;
    let mut only_b = def("only-b");
    only_b.tenant_scope = Some(pb::TenantScope {
        scope: Some(pb::tenant_scope::Scope::TenantList(pb::TenantList {
            tenant_ids: vec!["tenant-b".into()],
        })),
    });
    assert_eq!(create_def(&node, &root, only_b).await, Code::Ok);
    let mut builtin = def("builtin");
    builtin.deletion_protection = true;
    assert_eq!(create_def(&node, &root, builtin).await, Code::Ok);
    let mut bad = def("bad-scope");
    bad.tenant_scope = Some(pb::TenantScope {
        scope: Some(pb::tenant_scope::Scope::TenantList(pb::TenantList {
            tenant_ids: vec!["Not Valid".into()],
        })),
    });
    let e = node
        .definitions()
        .create_definition(with_key(
            &root,
            pb::CreateDefinitionRequest {
                definition: Some(bad),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        violation_fields(&e),
        vec!["definition.tenant_scope.tenant_list.tenant_ids[0]"]
    );

    let (_, a) = make_key(&node, &root, pb::Role::Operator, "tenant-a").await;
    let (_, b) = make_key(&node, &root, pb::Role::Operator, "tenant-b").await;
    // A does not see it, cannot bind it; the platform binding it for A is refused.
    let names = |t: &str| {
        let mut c = node.definitions();
        let t = t.to_string();
        async move {
            c.list_definitions(with_key(&t, Default::default()))
                .await
                .unwrap()
                .into_inner()
                .definitions
                .into_iter()
                .map(|d| d.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(names(&a).await, vec!["builtin"]);
    assert_eq!(names(&b).await, vec!["builtin", "only-b"]);
    assert_eq!(
        code(
            node.definitions()
                .get_definition(with_key(
                    &a,
                    pb::GetDefinitionRequest {
                        name: "only-b".into()
                    }
                ))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        bind(&node, &a, "", "only-b").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        bind(&node, &root, "tenant-a", "only-b")
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let b_binding = bind(&node, &b, "", "only-b").await.unwrap();
    // Narrowing the scope past a bound tenant is refused.
    let narrow = node
        .definitions()
        .update_definition(with_key(
            &root,
            pb::UpdateDefinitionRequest {
                definition: Some(pb::TaskDefinition {
                    name: "only-b".into(),
                    tenant_scope: Some(pb::TenantScope {
                        scope: Some(pb::tenant_scope::Scope::TenantList(pb::TenantList {
                            tenant_ids: vec!["tenant-c".into()],
                        })),
                    }),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["tenant_scope".into()],
                }),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(narrow.code(), Code::FailedPrecondition, "{narrow:?}");

    // Protected: never deleted, not even forced; it can be disabled.
    let del = |name: &str, force: bool| {
        let mut c = node.definitions();
        let (root, name) = (root.clone(), name.to_string());
        async move {
            code(
                c.delete_definition(with_key(&root, pb::DeleteDefinitionRequest { name, force }))
                    .await,
            )
        }
    };
    assert_eq!(del("builtin", true).await, Code::FailedPrecondition);
    // Bound: needs force; force deletes its bindings too.
    assert_eq!(del("only-b", false).await, Code::FailedPrecondition);
    assert_eq!(del("only-b", true).await, Code::Ok);
    assert_eq!(
        code(
            node.bindings()
                .get_binding(with_key(
                    &b,
                    pb::GetBindingRequest {
                        binding_id: b_binding.id
                    }
                ))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(del("only-b", true).await, Code::NotFound);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mutating_call_leaves_exactly_one_audit_event() {
    let db = TestDb::new().await;
    let (node, root) = secured(&db).await;
    let (a_id, a) = make_key(&node, &root, pb::Role::Admin, "tenant-a").await; // 1 CreateApiKey
    let mut d = sh_def("audited", "echo hi", manual());
    d.overlap_policy = pb::OverlapPolicy::Allow as i32;
    assert_eq!(create_def(&node, &root, d).await, Code::Ok); // 2 CreateDefinition
    node.definitions()
        .update_definition(with_key(
            &root,
            pb::UpdateDefinitionRequest {
                definition: Some(pb::TaskDefinition {
                    name: "audited".into(),
                    description: "d".into(),
                    ..Default::default()
                }),
                update_mask: None,
            },
        ))
        .await
        .unwrap(); // 3 UpdateDefinition
    let b = bind(&node, &a, "", "audited").await.unwrap(); // 4 CreateBinding
    node.bindings()
        .update_binding(with_key(
            &a,
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: b.id.clone(),
                    enabled: Some(false),
                    ..Default::default()
                }),
                update_mask: None,
            },
        ))
        .await
        .unwrap(); // 5 UpdateBinding
    node.bindings()
        .pause_binding(with_key(
            &a,
            pb::PauseBindingRequest {
                binding_id: b.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap(); // 6
    node.bindings()
        .resume_binding(with_key(
            &a,
            pb::ResumeBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .unwrap(); // 7
    // A manual schedule has no fire times to backfill: still one event.
    let backfill = node
        .runs()
        .backfill_runs(with_key(
            &a,
            pb::BackfillRunsRequest {
                binding_id: b.id.clone(),
                start_time: Some(prost_types::Timestamp {
                    seconds: chrono_now() - 3600,
                    nanos: 0,
                }),
                end_time: Some(prost_types::Timestamp {
                    seconds: chrono_now() - 1,
                    nanos: 0,
                }),
                dry_run: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(backfill.run_ids.is_empty());
    let run = trigger_via(&node.channel, "", Some(&a), &b.id).await; // 8 TriggerRun
    let delayed = node
        .runs()
        .trigger_run(with_key(
            &a,
            pb::TriggerRunRequest {
                binding_id: b.id.clone(),
                run_time: Some(prost_types::Timestamp {
                    seconds: chrono_now() + 3600,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner(); // 9 TriggerRun
    node.runs()
        .cancel_run(with_key(
            &a,
            pb::CancelRunRequest {
                run_id: delayed.id.clone(),
                reason: "not needed".into(),
            },
        ))
        .await
        .unwrap(); // 10 CancelRun
    tokio::time::timeout(
        WAIT,
        drain(
            node.logs()
                .tail_run(with_key(
                    &a,
                    pb::TailRunRequest {
                        run_id: run.id.clone(),
                        after_seq: 0,
                        follow: true,
                    },
                ))
                .await
                .unwrap()
                .into_inner(),
        ),
    )
    .await
    .unwrap();
    node.runs()
        .retry_run(with_key(
            &a,
            pb::RetryRunRequest {
                run_id: run.id.clone(),
            },
        ))
        .await
        .unwrap(); // 11 RetryRun
    node.admin()
        .set_tenant_quota(with_key(
            &root,
            pb::SetTenantQuotaRequest {
                quota: Some(pb::TenantQuota {
                    tenant_id: "tenant-a".into(),
                    max_bindings: Some(10),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap(); // 12 SetTenantQuota
    let (v_id, _) = make_key(&node, &a, pb::Role::Viewer, "").await; // 13 CreateApiKey
    node.admin()
        .revoke_api_key(with_key(
            &a,
            pb::RevokeApiKeyRequest {
                key_id: v_id.clone(),
            },
        ))
        .await
        .unwrap(); // 14 RevokeApiKey
    node.bindings()
        .delete_binding(with_key(
            &a,
            pb::DeleteBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .unwrap(); // 15 DeleteBinding
    node.definitions()
        .delete_definition(with_key(
            &root,
            pb::DeleteDefinitionRequest {
                name: "audited".into(),
                force: false,
            },
        ))
        .await
        .unwrap(); // 16 DeleteDefinition

    // Refused and read-only calls leave nothing.
    assert_eq!(
        create_def(&node, &a, def("denied")).await,
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            node.bindings()
                .delete_binding(with_key(
                    &a,
                    pb::DeleteBindingRequest {
                        binding_id: b.id.clone()
                    }
                ))
                .await
        ),
        Code::NotFound
    );
    node.runs()
        .list_runs(with_key(&a, Default::default()))
        .await
        .unwrap();

    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let page = node
            .admin()
            .list_audit_events(with_key(
                &root,
                pb::ListAuditEventsRequest {
                    page_size: 5,
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        events.extend(page.events);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    events.reverse(); // oldest first
    let methods: Vec<&str> = events
        .iter()
        .map(|e| e.method.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(
        methods,
        vec![
            "bootstrap-key",
            "CreateApiKey",
            "CreateDefinition",
            "UpdateDefinition",
            "CreateBinding",
            "UpdateBinding",
            "PauseBinding",
            "ResumeBinding",
            "BackfillRuns",
            "TriggerRun",
            "TriggerRun",
            "CancelRun",
            "RetryRun",
            "SetTenantQuota",
            "CreateApiKey",
            "RevokeApiKey",
            "DeleteBinding",
            "DeleteDefinition",
        ]
        .into_iter()
        .map(|m| if m == "bootstrap-key" {
            "sked admin bootstrap-key"
        } else {
            m
        })
        .collect::<Vec<_>>()
    );
    // Who, what, before/after.
    let bootstrap = &events[0];
    assert_eq!(
        (bootstrap.actor.as_str(), bootstrap.key_id.as_str()),
        ("cli", ""),
        "the CLI's key is audited as actor cli, without a key"
    );
    assert!(bootstrap.target.starts_with("api_key/") && bootstrap.tenant_id.is_empty());
    let by_a: Vec<_> = events.iter().filter(|e| e.key_id == a_id).collect();
    assert_eq!(by_a.len(), 12, "tenant-a's admin key made 12 of the calls");
    assert!(
        by_a.iter()
            .all(|e| e.tenant_id == "tenant-a" && e.actor == format!("key {a_id}"))
    );
    let create_binding = events
        .iter()
        .find(|e| e.method.ends_with("/CreateBinding"))
        .unwrap();
    assert_eq!(create_binding.target, format!("binding/{}", b.id));
    assert!(create_binding.before.is_none() && create_binding.after.is_some());
    let update = events
        .iter()
        .find(|e| e.method.ends_with("/UpdateBinding"))
        .unwrap();
    let enabled =
        |s: &Option<prost_types::Struct>| s.as_ref().unwrap().fields["enabled"].kind.clone();
    assert_eq!(
        enabled(&update.before),
        Some(prost_types::value::Kind::BoolValue(true))
    );
    assert_eq!(
        enabled(&update.after),
        Some(prost_types::value::Kind::BoolValue(false))
    );
    let delete = events
        .iter()
        .find(|e| e.method.ends_with("/DeleteDefinition"))
        .unwrap();
    assert!(delete.before.is_some() && delete.after.is_none() && delete.tenant_id.is_empty());
    // Filters: method short name, target prefix.
    let triggers = node
        .admin()
        .list_audit_events(with_key(
            &root,
            pb::ListAuditEventsRequest {
                method: "TriggerRun".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(triggers.events.len(), 2);
    let on_binding = node
        .admin()
        .list_audit_events(with_key(
            &root,
            pb::ListAuditEventsRequest {
                target_prefix: format!("binding/{}", b.id),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        on_binding.events.len(),
        6,
        "create, update, pause, resume, backfill, delete"
    );
    node.stop().await;
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_never_stored_or_logged_in_clear() {
    let db = TestDb::new().await;
    // The real binary: bootstrap on the command line, then a node with
    // debug logging whose stderr is captured.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sked"))
        .args(["admin", "bootstrap-key", "--name", "first"])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "debug")
        .output()
        .await
        .expect("run sked admin bootstrap-key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(root.starts_with("sked_"), "stdout is the token: {root:?}");
    let mut logs = String::from_utf8_lossy(&out.stderr).into_owned();

    let log_file =
        std::env::temp_dir().join(format!("sked-auth-log-{}", uuid::Uuid::new_v4().simple()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sked"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "debug")
        .stdout(std::fs::File::create(&log_file).unwrap())
        .stderr(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&log_file)
                .unwrap(),
        )
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ch = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(ch) =
                tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
                    .unwrap()
                    .connect()
                    .await
            {
                return ch;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap();
    let mut admin = AdminServiceClient::new(ch.clone());
    let created = admin
        .create_api_key(with_key(
            &root,
            pb::CreateApiKeyRequest {
                name: "ci".into(),
                role: pb::Role::Operator as i32,
                tenant_id: "acme".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let second = created.token.clone();
    // Use both, and fail with a forged one.
    DefinitionServiceClient::new(ch.clone())
        .list_definitions(with_key(&second, Default::default()))
        .await
        .unwrap();
    let forged = format!("{}0", &second[..second.len() - 1]);
    let _ = DefinitionServiceClient::new(ch.clone())
        .list_definitions(with_key(&forged, Default::default()))
        .await;
    // No key in clear in the database, anywhere a key lives.
    let pool = db.pool().await;
    let dump: Vec<String> = sqlx::query_scalar("SELECT row_to_json(k)::text FROM api_keys k UNION ALL SELECT row_to_json(a)::text FROM audit_events a")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(dump.len() >= 4, "two keys and two audit events: {dump:?}");
    for token in [&root, &second] {
        let secret = token.rsplit_once('_').unwrap().1;
        assert_eq!(secret.len(), 64);
        for row in &dump {
            assert!(!row.contains(secret), "a secret is stored in clear: {row}");
        }
    }
    let hashes: Vec<String> = sqlx::query_scalar("SELECT secret_hash FROM api_keys")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(
        hashes.iter().all(|h| h.starts_with("$argon2id$")),
        "{hashes:?}"
    );
    // Nor in the logs.
    nix_term(&child);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    logs.push_str(&std::fs::read_to_string(&log_file).unwrap());
    let _ = std::fs::remove_file(&log_file);
    assert!(
        logs.contains("API key created"),
        "the log was captured: {logs}"
    );
    for token in [&root, &second, &forged] {
        let secret = token.rsplit_once('_').unwrap().1;
        assert!(!logs.contains(secret), "a secret is in the log");
    }
}

fn nix_term(child: &tokio::process::Child) {
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
}

/// One row of [`every_rpc_refuses_a_weaker_role_and_an_unknown_target_is_not_found`].
struct Rpc {
    /// `/sked.v1.<Service>/<Method>`.
    path: &'static str,
    /// The least role SPEC §6 gives the method.
    role: pb::Role,
    /// Platform keys only: a tenant key is refused whatever its role.
    platform: bool,
    /// A minimal request, encoded. When `target` holds it names a
    /// well-formed target (id, run, binding, definition, key) that does not
    /// exist.
    req: Vec<u8>,
    target: bool,
}

fn rpc(
    path: &'static str,
    role: pb::Role,
    platform: bool,
    target: bool,
    req: impl prost::Message,
) -> Rpc {
    Rpc {
        path,
        role,
        platform,
        req: req.encode_to_vec(),
        target,
    }
}

/// Calls `path` with the encoded request `req`; the status code (of a
/// stream: of its opening or first message; `OK` while it stays open).
async fn raw_code(node: &TestNode, path: &str, req: tonic::Request<Vec<u8>>) -> Code {
    match raw_call(node, path, req).await {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Calls `path` with raw bytes; a stream's first error counts as the call's.
async fn raw_call(
    node: &TestNode,
    path: &str,
    req: tonic::Request<Vec<u8>>,
) -> Result<(), tonic::Status> {
    let streaming = path.ends_with("/TailRun") || path.ends_with("/WatchEvents");
    let mut grpc = tonic::client::Grpc::new(node.channel.clone());
    grpc.ready().await.expect("ready");
    let path = path.parse().expect("path");
    if streaming {
        let mut s = grpc
            .server_streaming(req, path, RawCodec)
            .await?
            .into_inner();
        match tokio::time::timeout(Duration::from_secs(1), s.message()).await {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        }
    } else {
        grpc.unary(req, path, RawCodec).await.map(|_| ())
    }
}

/// NOT_FOUND with a `ResourceInfo` detail naming a resource type, or what
/// the call got instead.
fn not_found_with_info(got: Result<(), tonic::Status>) -> Result<(), String> {
    use tonic_types::StatusExt;
    match got {
        Err(s) if s.code() == Code::NotFound => match s.get_details_resource_info() {
            Some(info) if !info.resource_type.is_empty() => Ok(()),
            _ => Err(format!("NOT_FOUND without ResourceInfo: {}", s.message())),
        },
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        Ok(()) => Err("OK".to_string()),
    }
}

/// Every sked.v1 method, from one table: each role below the method's
/// least role is PERMISSION_DENIED (platform and tenant keys; a tenant
/// admin too for a platform-only method), and a well-formed id of nothing
/// is NOT_FOUND for every method that takes a target. The table must list
/// exactly the methods of the proto, so a new RPC needs a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_a_weaker_role_and_an_unknown_target_is_not_found() {
    use pb::Role::{Admin, Operator, Viewer, Worker};
    let db = TestDb::new().await;
    let (node, root) = secured(&db).await;
    // Never issued, but a valid id of every kind.
    let nothing = uuid::Uuid::new_v4().to_string();
    let missing_def = "no-such-definition".to_string();
    let now = now_secs();
    let table = vec![
        rpc(
            "/sked.v1.DefinitionService/CreateDefinition",
            Admin,
            true,
            false,
            pb::CreateDefinitionRequest {
                definition: Some(def("made-by-nobody")),
            },
        ),
        rpc(
            "/sked.v1.DefinitionService/GetDefinition",
            Viewer,
            false,
            true,
            pb::GetDefinitionRequest {
                name: missing_def.clone(),
            },
        ),
        rpc(
            "/sked.v1.DefinitionService/ListDefinitions",
            Viewer,
            false,
            false,
            pb::ListDefinitionsRequest::default(),
        ),
        rpc(
            "/sked.v1.DefinitionService/UpdateDefinition",
            Admin,
            true,
            true,
            pb::UpdateDefinitionRequest {
                definition: Some(pb::TaskDefinition {
                    name: missing_def.clone(),
                    enabled: Some(false),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["enabled".into()],
                }),
            },
        ),
        rpc(
            "/sked.v1.DefinitionService/DeleteDefinition",
            Admin,
            true,
            true,
            pb::DeleteDefinitionRequest {
                name: missing_def.clone(),
                force: false,
            },
        ),
        rpc(
            "/sked.v1.DefinitionService/PreviewSchedule",
            Viewer,
            false,
            false,
            pb::PreviewScheduleRequest {
                schedule: Some(every(60)),
                count: 1,
                after: None,
            },
        ),
        rpc(
            "/sked.v1.BindingService/CreateBinding",
            Operator,
            false,
            true,
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: missing_def.clone(),
                    ..Default::default()
                }),
            },
        ),
        rpc(
            "/sked.v1.BindingService/GetBinding",
            Viewer,
            false,
            true,
            pb::GetBindingRequest {
                binding_id: nothing.clone(),
            },
        ),
        rpc(
            "/sked.v1.BindingService/ListBindings",
            Viewer,
            false,
            false,
            pb::ListBindingsRequest::default(),
        ),
        rpc(
            "/sked.v1.BindingService/UpdateBinding",
            Operator,
            false,
            true,
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: nothing.clone(),
                    enabled: Some(false),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["enabled".into()],
                }),
            },
        ),
        rpc(
            "/sked.v1.BindingService/DeleteBinding",
            Operator,
            false,
            true,
            pb::DeleteBindingRequest {
                binding_id: nothing.clone(),
            },
        ),
        rpc(
            "/sked.v1.BindingService/PauseBinding",
            Operator,
            false,
            true,
            pb::PauseBindingRequest {
                binding_id: nothing.clone(),
                ..Default::default()
            },
        ),
        rpc(
            "/sked.v1.BindingService/ResumeBinding",
            Operator,
            false,
            true,
            pb::ResumeBindingRequest {
                binding_id: nothing.clone(),
            },
        ),
        rpc(
            "/sked.v1.RunService/TriggerRun",
            Operator,
            false,
            true,
            pb::TriggerRunRequest {
                binding_id: nothing.clone(),
                ..Default::default()
            },
        ),
        rpc(
            "/sked.v1.RunService/CancelRun",
            Operator,
            false,
            true,
            pb::CancelRunRequest {
                run_id: nothing.clone(),
                reason: String::new(),
            },
        ),
        rpc(
            "/sked.v1.RunService/RetryRun",
            Operator,
            false,
            true,
            pb::RetryRunRequest {
                run_id: nothing.clone(),
            },
        ),
        rpc(
            "/sked.v1.RunService/GetRun",
            Viewer,
            false,
            true,
            pb::GetRunRequest {
                run_id: nothing.clone(),
            },
        ),
        rpc(
            "/sked.v1.RunService/ListRuns",
            Viewer,
            false,
            false,
            pb::ListRunsRequest::default(),
        ),
        rpc(
            "/sked.v1.RunService/GetRunStats",
            Viewer,
            false,
            true,
            pb::GetRunStatsRequest {
                binding_id: nothing.clone(),
                start_time: Some(ts(now - 3600.0)),
                end_time: Some(ts(now)),
                ..Default::default()
            },
        ),
        rpc(
            "/sked.v1.RunService/BackfillRuns",
            Operator,
            false,
            true,
            pb::BackfillRunsRequest {
                binding_id: nothing.clone(),
                start_time: Some(ts(now - 3600.0)),
                end_time: Some(ts(now - 60.0)),
                dry_run: true,
            },
        ),
        rpc(
            "/sked.v1.NotificationService/SetDefinitionNotificationRules",
            Admin,
            true,
            true,
            pb::SetDefinitionNotificationRulesRequest {
                definition: missing_def.clone(),
                rules: vec![],
            },
        ),
        rpc(
            "/sked.v1.NotificationService/SetBindingNotificationRules",
            Operator,
            false,
            true,
            pb::SetBindingNotificationRulesRequest {
                binding_id: nothing.clone(),
                rules: vec![],
                inherit: true,
            },
        ),
        rpc(
            "/sked.v1.NotificationService/GetBindingNotificationRules",
            Viewer,
            false,
            true,
            pb::GetBindingNotificationRulesRequest {
                binding_id: nothing.clone(),
            },
        ),
        rpc(
            "/sked.v1.NotificationService/ListNotifications",
            Viewer,
            false,
            false,
            pb::ListNotificationsRequest {
                binding_id: nothing.clone(),
                ..Default::default()
            },
        ),
        rpc(
            "/sked.v1.LogService/TailRun",
            Viewer,
            false,
            true,
            pb::TailRunRequest {
                run_id: nothing.clone(),
                after_seq: 0,
                follow: false,
            },
        ),
        rpc(
            "/sked.v1.LogService/WatchEvents",
            Viewer,
            false,
            false,
            pb::WatchEventsRequest::default(),
        ),
        rpc(
            "/sked.v1.LogService/ListRunEvents",
            Viewer,
            false,
            true,
            pb::ListRunEventsRequest {
                run_id: nothing.clone(),
                ..Default::default()
            },
        ),
        rpc(
            "/sked.v1.AdminService/GetTenantQuota",
            Viewer,
            false,
            false,
            pb::GetTenantQuotaRequest::default(),
        ),
        rpc(
            "/sked.v1.AdminService/SetTenantQuota",
            Admin,
            true,
            false,
            pb::SetTenantQuotaRequest {
                quota: Some(pb::TenantQuota {
                    tenant_id: "acme".into(),
                    max_bindings: Some(100),
                    ..Default::default()
                }),
            },
        ),
        rpc(
            "/sked.v1.AdminService/GetQuotaUsage",
            Viewer,
            false,
            false,
            pb::GetQuotaUsageRequest::default(),
        ),
        rpc(
            "/sked.v1.AdminService/CreateApiKey",
            Admin,
            false,
            false,
            pb::CreateApiKeyRequest {
                name: "by-nobody".into(),
                role: Viewer as i32,
                tenant_id: "acme".into(),
            },
        ),
        rpc(
            "/sked.v1.AdminService/RevokeApiKey",
            Admin,
            false,
            true,
            pb::RevokeApiKeyRequest {
                key_id: nothing.clone(),
            },
        ),
        rpc(
            "/sked.v1.AdminService/ListApiKeys",
            Admin,
            false,
            false,
            pb::ListApiKeysRequest::default(),
        ),
        rpc(
            "/sked.v1.AdminService/ListAuditEvents",
            Admin,
            false,
            false,
            pb::ListAuditEventsRequest::default(),
        ),
        rpc(
            "/sked.v1.AdminService/GetSchedulerStatus",
            Admin,
            true,
            false,
            pb::GetSchedulerStatusRequest::default(),
        ),
        // Workers: worker keys and admins only (no viewer or operator).
        rpc(
            "/sked.v1.WorkerService/Work",
            Worker,
            false,
            false,
            pb::WorkerRequest {
                hello: Some(pb::Hello {
                    queue: "q".into(),
                    worker_name: "w".into(),
                    slots: 1,
                    lease_tokens: vec![],
                }),
                ..Default::default()
            },
        ),
        rpc(
            "/sked.v1.WorkerService/CompleteRun",
            Worker,
            false,
            false,
            pb::CompleteRunRequest {
                lease_token: nothing.clone(),
                result: None,
            },
        ),
        rpc(
            "/sked.v1.WorkerService/FailRun",
            Worker,
            false,
            false,
            pb::FailRunRequest {
                lease_token: nothing.clone(),
                error: "x".into(),
                retryable: true,
            },
        ),
        rpc(
            "/sked.v1.WorkerService/AppendLogs",
            Worker,
            false,
            false,
            pb::AppendLogsRequest {
                lease_token: nothing.clone(),
                lines: vec![pb::WorkerLogLine {
                    message: "x".into(),
                    stderr: false,
                }],
            },
        ),
        rpc(
            "/sked.v1.WorkerService/ReportProgress",
            Worker,
            false,
            false,
            pb::ReportProgressRequest {
                lease_token: nothing.clone(),
                percent: 50.0,
                ..Default::default()
            },
        ),
        rpc(
            "/sked.v1.WorkerService/Heartbeat",
            Worker,
            false,
            false,
            pb::HeartbeatRequest {
                lease_tokens: vec![nothing.clone()],
            },
        ),
    ];

    // Exactly the methods of the proto.
    let mut proto: Vec<String> = sked::grpc::boundary::pool()
        .services()
        .filter(|s| s.full_name().starts_with("sked.v1."))
        .flat_map(|s| {
            s.methods()
                .map(|m| format!("/{}/{}", s.full_name(), m.name()))
                .collect::<Vec<_>>()
        })
        .collect();
    proto.sort();
    let mut listed: Vec<String> = table.iter().map(|r| r.path.to_string()).collect();
    listed.sort();
    assert_eq!(listed, proto, "one row per sked.v1 method");

    let mut platform = Vec::new();
    let mut tenant = Vec::new();
    for role in [Viewer, Operator] {
        platform.push((role, make_key(&node, &root, role, "").await.1));
    }
    for role in [Viewer, Operator, Admin] {
        tenant.push((role, make_key(&node, &root, role, "acme").await.1));
    }
    let tenant_admin = tenant[2].1.clone();
    // Worker keys may call WorkerService only.
    let workers = [
        make_key(&node, &root, Worker, "").await.1,
        make_key(&node, &root, Worker, "acme").await.1,
    ];

    let mut wrong = Vec::new();
    let mut checked = 0;
    let mut expect = |what: String, got: Result<(), String>| {
        checked += 1;
        if let Err(e) = got {
            wrong.push(format!("{what}: {e}"));
        }
    };
    let code_is = |got: Code, want: Code| {
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}, want {want:?}"))
        }
    };
    for row in &table {
        // A worker method needs a worker key or an admin; the others
        // order viewer < operator < admin.
        let weaker = |role: &pb::Role| match row.role {
            Worker => !matches!(role, Worker | Admin),
            need => (*role as i32) < (need as i32),
        };
        if row.role != Worker {
            for (i, key) in workers.iter().enumerate() {
                let req = if i == 0 {
                    request("acme", Some(key), row.req.clone())
                } else {
                    with_key(key, row.req.clone())
                };
                let got = raw_code(&node, row.path, req).await;
                let what = format!("{} as a worker key #{i}", row.path);
                expect(what, code_is(got, Code::PermissionDenied));
            }
        }
        for (role, key) in platform.iter().filter(|(r, _)| weaker(r)) {
            let got = raw_code(&node, row.path, request("acme", Some(key), row.req.clone())).await;
            let what = format!("{} as a platform {role:?}", row.path);
            expect(what, code_is(got, Code::PermissionDenied));
        }
        for (role, key) in tenant.iter().filter(|(r, _)| weaker(r)) {
            let got = raw_code(&node, row.path, with_key(key, row.req.clone())).await;
            let what = format!("{} as a tenant {role:?}", row.path);
            expect(what, code_is(got, Code::PermissionDenied));
        }
        if row.platform {
            let got = raw_code(&node, row.path, with_key(&tenant_admin, row.req.clone())).await;
            let what = format!("{} as a tenant admin", row.path);
            expect(what, code_is(got, Code::PermissionDenied));
        }
        if row.target {
            let got = raw_call(
                &node,
                row.path,
                request("acme", Some(&root), row.req.clone()),
            )
            .await;
            let what = format!("{} of nothing as the platform", row.path);
            expect(what, not_found_with_info(got));
            if !row.platform {
                let got = raw_call(&node, row.path, with_key(&tenant_admin, row.req.clone())).await;
                let what = format!("{} of nothing as a tenant admin", row.path);
                expect(what, not_found_with_info(got));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {checked} checks:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    node.stop().await;
}

/// A tenant key with role worker takes only its own tenant's runs of a
/// queue (and, per the table above, may call nothing but WorkerService).
#[tokio::test]
async fn a_tenant_worker_key_receives_only_its_tenants_runs() {
    use sked::proto::v1::worker_service_client::WorkerServiceClient;
    use tokio_stream::wrappers::ReceiverStream;
    let db = TestDb::new().await;
    let (node, root) = secured(&db).await;
    let def = pb::TaskDefinition {
        name: "w.keyed".into(),
        handler: Some(pb::task_definition::Handler::Worker(pb::WorkerHandler {
            queue: "keyed".into(),
            schedule_to_start_timeout: None,
        })),
        schedule: Some(manual()),
        overlap_policy: pb::OverlapPolicy::Allow as i32,
        ..Default::default()
    };
    let ba = define_and_bind_via(&node.channel, "tenant-a", Some(&root), def).await;
    let bb = node
        .bindings()
        .create_binding(request(
            "tenant-b",
            Some(&root),
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "w.keyed".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect("bind b")
        .into_inner();
    let (_, worker_a) = make_key(&node, &root, pb::Role::Worker, "tenant-a").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WorkerRequest {
        hello: Some(pb::Hello {
            queue: "keyed".into(),
            worker_name: "a-1".into(),
            slots: 10,
            lease_tokens: vec![],
        }),
        ..Default::default()
    })
    .await
    .expect("hello");
    let mut stream = WorkerServiceClient::new(node.channel.clone())
        .work(with_key(&worker_a, ReceiverStream::new(rx)))
        .await
        .expect("a worker key may work")
        .into_inner();
    let mut a_runs = Vec::new();
    for _ in 0..3 {
        a_runs.push(
            trigger_via(&node.channel, "tenant-a", Some(&root), &ba.id)
                .await
                .id,
        );
        trigger_via(&node.channel, "tenant-b", Some(&root), &bb.id).await;
    }
    let mut got = Vec::new();
    while let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_secs(3), stream.message()).await
    {
        if let Some(pb::worker_response::Kind::Assigned(a)) = m.kind {
            assert_eq!(a.tenant_id, "tenant-a", "{a:?}");
            got.push(a.run_id);
        }
    }
    got.sort();
    a_runs.sort();
    assert_eq!(got, a_runs, "exactly tenant A's runs");
    // A tenant worker key cannot name another tenant.
    let err = WorkerServiceClient::new(node.channel.clone())
        .heartbeat(request(
            "tenant-b",
            Some(&worker_a),
            pb::HeartbeatRequest {
                lease_tokens: vec![uuid::Uuid::new_v4().to_string()],
            },
        ))
        .await
        .expect_err("another tenant");
    assert_eq!(err.code(), Code::PermissionDenied);
    node.stop().await;
}
