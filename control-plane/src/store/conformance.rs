//! What every [`Store`] must do, run against SQLite always and PostgreSQL when there is one.

use super::*;

pub fn agent(node: &str) -> AgentRecord {
    AgentRecord {
        node: node.into(),
        labels: [("role".to_string(), "web".to_string())].into(),
        version: "0.1.0".into(),
        capabilities: vec!["offers.candidate".into()],
        effective_config_hash: "e1".into(),
        applied_offer_hash: String::new(),
        first_seen: 1,
        last_seen: 2,
        last_report: None,
    }
}

fn config(store: &dyn Store) -> String {
    store
        .put_config(&ConfigVersion {
            hash: "h1".into(),
            document: "pipelines: {}".into(),
            created_at: 1,
            created_by: "alice".into(),
        })
        .unwrap();
    // Storing the same content again is a no-op.
    store
        .put_config(&ConfigVersion {
            hash: "h1".into(),
            document: "pipelines: {}".into(),
            created_at: 2,
            created_by: "bob".into(),
        })
        .unwrap();
    assert_eq!(store.config("h1").unwrap().unwrap().created_by, "alice");
    "h1".into()
}

fn rollout(hash: &str) -> NewRollout {
    NewRollout {
        selector: "role=web".into(),
        config_hash: hash.into(),
        role: "candidate".into(),
        max_unavailable: 1,
        wave_delay_ms: 0,
        created_by: "alice".into(),
    }
}

pub fn agents_upsert_and_report(store: &dyn Store) {
    store.upsert_agent(&agent("a")).unwrap();
    let mut changed = agent("a");
    changed.version = "0.2.0".into();
    changed.first_seen = 50;
    store.upsert_agent(&changed).unwrap();
    let stored = store.agent("a").unwrap().unwrap();
    assert_eq!(stored.version, "0.2.0");
    assert_eq!(stored.first_seen, 1, "first_seen is kept");
    store
        .set_agent_report("a", &serde_json::json!({"x": 1}), 9)
        .unwrap();
    store.set_agent_hashes("a", "e2", "o2", 10).unwrap();
    let stored = store.agent("a").unwrap().unwrap();
    assert_eq!(stored.last_report, Some(serde_json::json!({"x": 1})));
    assert_eq!(
        (
            stored.effective_config_hash.as_str(),
            stored.applied_offer_hash.as_str(),
            stored.last_seen
        ),
        ("e2", "o2", 10)
    );
    assert_eq!(store.agent("nope").unwrap(), None);
    assert_eq!(store.agents().unwrap().len(), 1);
}

pub fn rollouts_deployments_and_events(store: &dyn Store) {
    let hash = config(store);
    let id = store
        .create_rollout(
            &rollout(&hash),
            &[
                NewDeployment {
                    node: "a".into(),
                    wave: 0,
                    previous: None,
                },
                NewDeployment {
                    node: "b".into(),
                    wave: 1,
                    previous: None,
                },
            ],
        )
        .unwrap();
    let deployments = store.deployments(id).unwrap();
    assert_eq!(deployments.len(), 2);
    assert_eq!(deployments[1].wave, 1);
    assert_eq!(
        (
            deployments[0].previous_hash.as_str(),
            deployments[0].previous_role.as_str()
        ),
        ("", "clear")
    );
    store
        .set_deployment_state(id, "a", DeploymentState::Applying, "")
        .unwrap();
    assert!(matches!(
        store.set_deployment_state(id, "a", DeploymentState::RolledBack, ""),
        Err(StoreError::Conflict(_))
    ));
    store
        .set_rollout_state(
            id,
            RolloutState::RollingBack,
            "a failed",
            Some(RolloutState::Failed),
        )
        .unwrap();
    assert!(store
        .set_rollout_state(id, RolloutState::Succeeded, "", None)
        .is_err());
    let r = store.rollout(id).unwrap().unwrap();
    assert_eq!(r.state, RolloutState::RollingBack);
    assert_eq!(r.reason, "a failed");
    assert_eq!(r.rollback_outcome, Some(RolloutState::Failed));
    assert_eq!(store.active_rollouts().unwrap().len(), 1);
    store
        .set_rollout_state(id, RolloutState::Failed, "", None)
        .unwrap();
    assert!(store.active_rollouts().unwrap().is_empty());
    assert_eq!(
        store.rollout_counts().unwrap(),
        vec![(RolloutState::Failed, 1)]
    );
    assert_eq!(
        store.rollout(id).unwrap().unwrap().reason,
        "a failed",
        "kept"
    );
    store.add_event(id, "note", "hello").unwrap();
    let kinds: Vec<String> = store
        .events(id)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        vec!["created", "deployment", "state", "state", "note"]
    );
    assert_eq!(store.rollouts().unwrap().len(), 1);
    assert_eq!(store.rollout(id + 100).unwrap(), None);
}

pub fn node_configs_audit_and_tokens(store: &dyn Store) {
    let hash = config(store);
    let id = store.create_rollout(&rollout(&hash), &[]).unwrap();
    let nc = NodeConfig {
        node: "a".into(),
        config_hash: hash,
        role: "candidate".into(),
        rollout_id: id,
    };
    store.set_node_config("a", Some(&nc)).unwrap();
    assert_eq!(store.node_config("a").unwrap(), Some(nc));
    store.set_node_config("a", None).unwrap();
    assert_eq!(store.node_config("a").unwrap(), None);

    for action in ["one", "two"] {
        store
            .audit(&AuditEntry {
                at: 1,
                actor: "alice".into(),
                role: "admin".into(),
                action: action.into(),
                target: "t".into(),
                detail: String::new(),
            })
            .unwrap();
    }
    let log = store.audit_log(10).unwrap();
    assert_eq!(log[0].action, "two");
    assert_eq!(store.audit_log(1).unwrap().len(), 1);

    store.add_token("ci", Role::Operator, "abc").unwrap();
    assert!(matches!(
        store.add_token("ci", Role::Viewer, "def"),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.token_by_hash("abc").unwrap().map(|t| t.role),
        Some(Role::Operator)
    );
    assert_eq!(store.token_by_hash("zzz").unwrap(), None);
    assert_eq!(store.tokens().unwrap().len(), 1);
}

pub fn experiments_states_events_windows(store: &dyn Store) {
    use crate::experiment::ExperimentState::*;
    let id = store
        .create_experiment("balanced", "name: balanced", "alice")
        .unwrap();
    let created = store.experiment(id).unwrap().unwrap();
    assert_eq!((created.state, created.name.as_str()), (Draft, "balanced"));
    assert_eq!(created.progress, serde_json::json!({}));
    assert!(store.live_experiments().unwrap().is_empty());

    let progress = serde_json::json!({ "targets": ["a"] });
    store
        .transition_experiment(id, Pending, "alice", "started", Some(&progress))
        .unwrap();
    assert_eq!(store.experiment(id).unwrap().unwrap().progress, progress);
    assert_eq!(store.live_experiments().unwrap().len(), 1);
    // An invalid transition is refused with the reason and changes nothing.
    let refused = store
        .transition_experiment(id, Promoted, "alice", "", None)
        .unwrap_err();
    assert!(
        matches!(&refused, StoreError::Conflict(m) if m.contains("is pending") && m.contains("deploying")),
        "{refused}"
    );
    assert_eq!(store.experiment(id).unwrap().unwrap().state, Pending);

    let window = serde_json::json!({ "index": 0, "baseline": { "datapoints": 10 } });
    let after = serde_json::json!({ "targets": ["a"], "windows": 1 });
    store.add_experiment_window(id, 0, &window, &after).unwrap();
    assert_eq!(store.experiment_windows(id).unwrap(), vec![window.clone()]);
    assert_eq!(store.experiment(id).unwrap().unwrap().progress, after);
    // A window index is stored once.
    assert!(store.add_experiment_window(id, 0, &window, &after).is_err());

    store
        .transition_experiment(id, Cancelled, "engine", "stopped by bob", None)
        .unwrap();
    let events = store.experiment_events(id).unwrap();
    let steps: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e.from.as_str(), e.to.as_str(), e.actor.as_str()))
        .collect();
    assert_eq!(
        steps,
        vec![
            ("", "draft", "alice"),
            ("draft", "pending", "alice"),
            ("pending", "cancelled", "engine")
        ]
    );
    assert_eq!(events[2].reason, "stopped by bob");
    assert!(store.live_experiments().unwrap().is_empty());
    assert_eq!(store.experiments().unwrap().len(), 1);
    // A transition without progress keeps the stored one.
    assert_eq!(store.experiment(id).unwrap().unwrap().progress, after);
    assert_eq!(store.experiment_counts().unwrap(), vec![(Cancelled, 1)]);
    assert!(store.experiment(id + 100).unwrap().is_none());
}
