//! The fault matrix: one test per fault, each with the same checks.
//!
//! Every scenario runs the real operator binary against a real kube-apiserver and `mde-sim`
//! (`--duplicate-mode allow`, so a blind re-POST would create a second action instead of being
//! refused), switches a fault on at run time (`POST /sim/faults`, `/sim/settings`, or a process
//! restart), keeps it for a while, switches it off, and then asserts:
//!
//! - every resource ends Ready for its generation and every device is in its desired state
//!   (the simulator's ground truth);
//! - every machine received exactly one action (no duplicate from a retry);
//! - the operator never panicked;
//! - while the fault lasted the conditions told the truth: a monitor samples every resource and
//!   the ground truth several times a second, and fails on any Ready=True whose device is not in
//!   the desired state and on any Stalled (a transient fault must never need a person); the
//!   reasons it saw are printed, and each scenario names the reasons its fault must produce.
//!
//! Faults: bursts of 500s, latency beyond the client timeout, applied-but-response-lost,
//! dropped connections, a 429 storm with the simulator's quota far below the operator's budget
//! (the operator must pause, not hammer), the token endpoint down while short-lived tokens
//! expire, the kube-apiserver restarted (a private control plane behind a small proxy), and a
//! concurrent writer patching annotations and status.

#[path = "../common/mod.rs"]
mod common;
mod harness;
mod kube_faults;
mod late_apply;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::cluster::{client_from, cluster};
use common::operator::condition;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use harness::*;
use kube_faults::*;
use late_apply::*;

// ---------------------------------------------------------------------------------------------
// MDE-side faults
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_500s() {
    let s = Scenario::start("bursts-500", &[], &[]).await;
    let m = s.monitor();
    m.fault(true);
    // Three bursts: 60 % of API calls answer 500 for two seconds, then a short calm.
    s.faults(json!({"fault5xxRate": 0.6})).await;
    s.create(0..N).await;
    for _ in 0..3 {
        s.faults(json!({"fault5xxRate": 0.6})).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.faults(json!({"fault5xxRate": 0.0})).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    m.fault(false);
    let r = s.finish(m, &["TransientError", "OutcomeUnknown"]).await;
    assert!(r.injected() > 0, "no 500 was injected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_beyond_the_client_timeout() {
    // The operator gives up on a request after one second; the simulator answers after two.
    let s = Scenario::start("timeouts", &[], &["--request-timeout-seconds", "1"]).await;
    let m = s.monitor();
    m.fault(true);
    // First every call is slow, reads too: the operator cannot even load its view of MDE.
    s.faults(json!({"latencyMs": 2000})).await;
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Then only the POSTs are slow: each one times out after it was sent.
    s.faults(json!({"latencyMs": 2000, "apis": ["isolate", "unisolate"]}))
        .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.faults(json!({"latencyMs": 0, "apis": null})).await;
    m.fault(false);
    let r = s.finish(m, &["OutcomeUnknown", "TransientError"]).await;
    let calls = s.sim.admin_calls().await;
    let posts = calls
        .iter()
        .filter(|c| c["api"] == "isolate" || c["api"] == "unisolate")
        .count();
    let timed_out = s.op.output().matches("timed out").count();
    eprintln!(
        "[timeouts] POSTs received by the simulator: {posts} for {} actions; operator log lines \
         saying 'timed out': {timed_out}",
        r.actions
    );
    assert!(timed_out > 0, "no request timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_but_response_lost() {
    let s = Scenario::start("lost-response", &[], &[]).await;
    let m = s.monitor();
    m.fault(true);
    s.faults(json!({"lostResponseRate": 0.5})).await;
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.faults(json!({"lostResponseRate": 0.0})).await;
    m.fault(false);
    // The OutcomeUnknown phase is usually resolved by a lookup within the same reconcile, so a
    // sampler rarely sees it; the operator's log shows each ambiguous outcome.
    let r = s.finish(m, &[]).await;
    let lost_posts = ["isolate", "unisolate"]
        .iter()
        .map(|a| {
            r.faults
                .get(&format!("{a}/lost-response"))
                .copied()
                .unwrap_or(0)
        })
        .sum::<usize>();
    let ambiguous = ambiguous_outcomes(&s.op);
    eprintln!(
        "[lost-response] {lost_posts} POSTs applied with their response lost; {ambiguous} \
         ambiguous outcomes in the operator log; {} actions for {} resources",
        r.actions, r.expected
    );
    assert!(lost_posts > 0, "no POST lost its response: {:?}", r.faults);
    assert!(
        ambiguous > 0,
        "the operator never reported an ambiguous outcome"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_drops() {
    let s = Scenario::start("drops", &[], &[]).await;
    let m = s.monitor();
    m.fault(true);
    s.faults(json!({"dropRate": 0.5})).await;
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.faults(json!({"dropRate": 0.0})).await;
    m.fault(false);
    let r = s.finish(m, &["TransientError", "OutcomeUnknown"]).await;
    eprintln!(
        "[drops] {} ambiguous outcomes in the operator log",
        ambiguous_outcomes(&s.op)
    );
    assert!(r.injected() > 0, "no connection was dropped");
}

/// 429s per throttling episode of one API: an episode starts with a 429 at simulated time `t`
/// and lasts the `Retry-After` the simulator gave it (recomputed from the call log: until the
/// oldest counted call of the window leaves it). A client that pauses as told gets 429s in an
/// episode only for calls already in flight when it learned of the first one.
fn throttle_episodes(calls: &[Value], api: &str, per_minute: usize) -> Vec<usize> {
    let time = |c: &Value| {
        c["simTime"]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    let mine: Vec<(DateTime<Utc>, bool, bool)> = calls
        .iter()
        .filter(|c| c["api"] == api)
        .filter_map(|c| Some((time(c)?, c["status"] == 429, c["counted"] == true)))
        .collect();
    let mut episodes = Vec::new();
    let mut end: Option<DateTime<Utc>> = None;
    for (i, &(t, throttled, _)) in mine.iter().enumerate() {
        if !throttled {
            continue;
        }
        if end.is_some_and(|e| t < e) {
            *episodes.last_mut().unwrap() += 1;
            continue;
        }
        // Retry-After: when the oldest of the last `per_minute` counted calls leaves the window.
        let counted: Vec<DateTime<Utc>> = mine[..i]
            .iter()
            .filter(|c| c.2 && c.0 > t - chrono::Duration::seconds(60))
            .map(|c| c.0)
            .collect();
        let oldest = counted
            .len()
            .checked_sub(per_minute)
            .map(|k| counted[k])
            .unwrap_or(t);
        let retry_after =
            (oldest + chrono::Duration::seconds(60) - t).max(chrono::Duration::seconds(1));
        end = Some(t + retry_after);
        episodes.push(1);
    }
    episodes
}

/// The 429 storm with the checks every fault gets: all converge, one action per machine, no
/// panic, and a truthful condition (RateLimited seen) while it lasts. How many 429s each pause
/// ends with is the stricter test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_storm_converges_with_truthful_conditions() {
    let s = Scenario::start("storm-429-converge", &[], &[]).await;
    let m = s.monitor();
    m.fault(true);
    s.sim
        .admin_post("settings", json!({"quotaPerMinute": 5}))
        .await;
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    s.sim
        .admin_post("settings", json!({"quotaPerMinute": 100}))
        .await;
    m.fault(false);
    let r = s.finish(m, &["RateLimited"]).await;
    assert!(r.throttled > 0, "the storm produced no 429");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_storm_pauses_instead_of_hammering() {
    storm_is_learned("storm-429", &[]).await;
}

/// The same when the 429 has no `Retry-After` (the wait is in its body, or nowhere: 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_storm_without_retry_after() {
    storm_is_learned("storm-429-body", &["--retry-after", "body-only"]).await;
    storm_is_learned("storm-429-none", &["--retry-after", "none"]).await;
}

/// The same when `Retry-After` is longer than the window that refused (capped to the window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_storm_with_a_retry_after_longer_than_the_window() {
    storm_is_learned("storm-429-long", &["--retry-after", "long"]).await;
}

async fn storm_is_learned(name: &'static str, sim_extra: &[&str]) {
    // The operator's budget is MDE's full 100/min, but the simulator admits only 5 calls a
    // minute per API (as when other tools spend the rest): every API is throttled with real
    // 429s, and the operator must learn the limit rather than burst into it.
    const PER_MINUTE: usize = 5;
    let s = Scenario::start(name, sim_extra, &[]).await;
    let m = s.monitor();
    m.fault(true);
    s.sim
        .admin_post("settings", json!({"quotaPerMinute": PER_MINUTE}))
        .await;
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    s.sim
        .admin_post("settings", json!({"quotaPerMinute": 100}))
        .await;
    m.fault(false);
    let r = s.finish(m, &["RateLimited"]).await;
    let calls = s.sim.admin_calls().await;
    let mut worst = Vec::new();
    for api in [
        "isolate",
        "unisolate",
        "machineactions-list",
        "machineactions-get",
    ] {
        let episodes = throttle_episodes(&calls, api, PER_MINUTE);
        eprintln!(
            "[{name}] {api}: {} 429s in {} episodes: {episodes:?}",
            episodes.iter().sum::<usize>(),
            episodes.len()
        );
        // The first episode holds the calls already in flight when the first 429 came, before
        // the operator could know that MDE's limit is below its budget. After that it knows
        // (the learned limit, calls spaced evenly): at most one 429 per episode, the probe's.
        if let Some(&max) = episodes.iter().skip(1).max()
            && max > 1
        {
            worst.push(format!("{api}: {episodes:?}"));
        }
    }
    assert!(r.throttled > 0, "the storm produced no 429");
    assert!(
        worst.is_empty(),
        "after the first 429 the operator kept sending calls that MDE throttled: {worst:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_down_while_tokens_expire() {
    // Tokens live 120 simulated seconds (2 s real): several expire during the outage.
    let s = Scenario::start("token", &["--token-lifetime", "120"], &[]).await;
    let m = s.monitor();
    s.create(0..N / 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    m.fault(true);
    // Every token request answers 500 (the /api calls themselves are not faulted).
    s.faults(json!({"fault5xxRate": 1.0, "apis": ["token"]}))
        .await;
    // Past the cached token's refresh time (1 s) and expiry (2 s) before the second half
    // needs one for its POSTs.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.create(N / 2..N).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.faults(json!({"fault5xxRate": 0.0, "apis": null})).await;
    m.fault(false);
    let r = s.finish(m, &["TransientError"]).await;
    assert!(r.token_failures > 0, "the token endpoint never failed");
    assert!(
        r.token_calls - r.token_failures >= 3,
        "tokens were not refreshed as they expired: {r:?}"
    );
}

/// Token requests answered 500 by the simulator, i.e. made while the endpoint was down.
fn failed_token_requests(calls: &[Value]) -> usize {
    calls
        .iter()
        .filter(|c| c["api"] == "token" && c["fault"] == "5xx")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_outage_is_not_hammered() {
    const OUTAGE: Duration = Duration::from_millis(8500);
    let s = Scenario::start("token-hammer", &["--token-lifetime", "120"], &[]).await;
    let m = s.monitor();
    s.create(0..N / 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.faults(json!({"fault5xxRate": 1.0, "apis": ["token"]}))
        .await;
    // The cached token reaches its refresh time (1 s) and expires (2 s); then 20 resources
    // need a token for their POSTs.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.create(N / 2..N).await;
    tokio::time::sleep(OUTAGE - Duration::from_millis(2500)).await;
    s.faults(json!({"fault5xxRate": 0.0, "apis": null})).await;
    let failed = failed_token_requests(&s.sim.admin_calls().await);
    s.finish(m, &[]).await;
    // A transient failure is retried after 10 s (scaled: 1/6 s here). One token request per
    // retry interval for the whole process is 51 in 8.5 seconds; allow three times that.
    let bound = (OUTAGE.as_secs_f64() * 60.0 / 10.0 * 3.0) as usize;
    eprintln!("[token-hammer] {failed} token requests during a {OUTAGE:?} outage (bound {bound})");
    assert!(
        failed <= bound,
        "{failed} token requests while the token endpoint was down for {OUTAGE:?}: every waiting \
         reconcile asks again instead of sharing one back-off"
    );
}

/// A proxy in front of the simulator's API that, while `late` is up, holds every isolate and
/// unisolate POST past the client's timeout and forwards it to the simulator 1.5 s after it
/// arrived, whatever the client did meanwhile: a request that MDE applies after the client gave
/// up on it. (`mde-sim`'s own latency cannot do this: it comes before processing, and a request
/// whose client disconnected is never processed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_applied_after_the_client_gave_up() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("late-apply").await;
    let client = c.client().await;
    // The operator reaches the API through the proxy (tokens come from the simulator directly);
    // the proxy learns the simulator's address once it runs.
    let proxy = LateApplyProxy::start().await;
    let s = Scenario::start_in(
        "late-apply",
        &c.kubeconfig,
        client,
        ns,
        &[],
        &["--request-timeout-seconds", "1"],
        Some(&proxy.base),
    );
    *proxy.upstream.write().unwrap() = s.sim.base_url.clone();
    let m = s.monitor();
    m.fault(true);
    proxy.late.store(true, Ordering::SeqCst);
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.late.store(false, Ordering::SeqCst);
    m.fault(false);
    let delayed = proxy.delayed.load(Ordering::SeqCst);
    // What the simulator saw for the first machine with more than one action, if any (real
    // times, so that the order of the late POSTs and the operator's lookup shows).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let actions = s.sim.admin_get("actions").await["value"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let first = s
        .resources
        .iter()
        .map(|r| &r.machine)
        .find(|m| {
            actions
                .iter()
                .filter(|a| a["machineId"] == m.as_str())
                .count()
                > 1
        })
        .unwrap_or(&s.resources[0].machine);
    for c in s.sim.admin_calls().await.iter().filter(|c| {
        c["path"].as_str().unwrap_or("").contains(first.as_str())
            || c["query"].as_str().unwrap_or("").contains(first.as_str())
    }) {
        eprintln!(
            "[late-apply] {} {} {} {} -> {} {}",
            c["realTime"].as_str().unwrap_or(""),
            c["method"].as_str().unwrap_or(""),
            c["api"].as_str().unwrap_or(""),
            c["path"].as_str().unwrap_or(""),
            c["status"],
            c["actionId"].as_str().unwrap_or("")
        );
    }
    eprintln!(
        "[late-apply] {delayed} POSTs applied 1.5 s after they were sent (client timeout 1 s)"
    );
    assert!(delayed > 0, "no POST was delayed");
    s.finish(m, &["OutcomeUnknown", "TransientError"]).await;
}

/// The README: `Forbidden` "names the missing permission (`Machine.Isolate` to act,
/// `Machine.Read.All` to read)". An app that may isolate but not read never gets there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_read_permission_stalls_as_forbidden() {
    let s = Scenario::start("no-read", &["--app-roles", "Machine.Isolate"], &[]).await;
    s.create(0..2).await;
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let d = s.api.get("d00").await.expect("d00");
        if let Some((_, reason, message)) = condition(&d, "Stalled").filter(|c| c.0 == "True") {
            assert_eq!(reason, "Forbidden", "{message}");
            assert!(message.contains("Machine.Read.All"), "{message}");
            return;
        }
        assert!(
            Instant::now() < end,
            "d00 never stalled; conditions {:?}\noperator log tail:\n{}",
            d.status.map(|s| s.conditions),
            s.op.tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_restarted_mid_run() {
    // Make sure the harness binary exists (the shared cluster builds it), then run our own.
    let _ = cluster();
    let mut cp = PrivateControlPlane::start();
    let proxy = KubeProxy::start(Upstream::from_kubeconfig(&cp.kubeconfig()).await).await;
    let client = client_from(&proxy.kubeconfig).await;
    install_crd(&client).await;
    let ns = "apiserver-restart".to_string();
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("namespace");
    let s = Scenario::start_in(
        "apiserver-restart",
        &proxy.kubeconfig,
        client.clone(),
        ns,
        &[],
        &[],
        None,
    );
    let m = s.monitor();
    s.create(0..N / 2).await;
    // Some actions are requested, some recorded, some still open when the server goes away.
    tokio::time::sleep(Duration::from_millis(700)).await;
    m.fault(true);
    let down = Instant::now();
    cp.restart();
    proxy.point_to(Upstream::from_kubeconfig(&cp.kubeconfig()).await);
    let downtime = down.elapsed();
    // New resources while the operator's watches reconnect.
    s.create(N / 2..N).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    m.fault(false);
    let r = s.finish(m, &[]).await;
    eprintln!(
        "[apiserver-restart] API server down for {downtime:?} (restart on the same data directory \
         and port); {} actions for {} resources",
        r.actions, r.expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writer_patches_annotations_and_status() {
    let s = Scenario::start("concurrent-writer", &[], &[]).await;
    let m = s.monitor();
    m.fault(true);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Mutex::new(BTreeMap::<&'static str, usize>::new()));
    let names: Vec<String> = s.resources.iter().map(|r| r.name.clone()).collect();
    // Three writers at once, for the whole time the operator works:
    // - annotation pokes (merge patches, no precondition): every one is a new resourceVersion
    //   and a watch event;
    // - optimistic status writers: read, wait a little, write the status back with the
    //   resourceVersion they read (a 409 Conflict when the operator wrote in between);
    // - a careless status writer that merge-patches stale status copies (up to a second old)
    //   without any precondition: lost updates the operator must repair.
    let mut writers = Vec::new();
    for kind in ["annotate", "optimistic", "stale"] {
        let (api, stop, counts, names) =
            (s.api.clone(), stop.clone(), counts.clone(), names.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(match kind {
                "annotate" => 1,
                "optimistic" => 2,
                _ => 3,
            });
            let mut snapshots: HashMap<String, (Instant, Value)> = HashMap::new();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let name = &names[rng.random_range(0..names.len())];
                let outcome = match kind {
                    "annotate" => api
                        .patch(
                            name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"metadata": {"annotations": {"test.mde.dev/poke": n.to_string()}}})),
                        )
                        .await
                        .map(|_| "annotation patched"),
                    "optimistic" => match api.get_status(name).await {
                        Ok(obj) => {
                            tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
                            api.replace_status(name, &PostParams::default(), &obj)
                                .await
                                .map(|_| "status written back")
                        }
                        Err(e) => Err(e),
                    },
                    _ => {
                        let now = Instant::now();
                        let stale = snapshots
                            .get(name)
                            .filter(|(at, _)| now.duration_since(*at) > Duration::from_millis(300))
                            .map(|(_, v)| v.clone());
                        match stale {
                            Some(status) => {
                                snapshots.remove(name);
                                api.patch_status(
                                    name,
                                    &PatchParams::default(),
                                    &Patch::Merge(json!({"status": status})),
                                )
                                .await
                                .map(|_| "stale status restored")
                            }
                            None => match api.get_status(name).await {
                                Ok(obj) => {
                                    // Every status field, with null for the absent ones, so
                                    // that the merge patch really restores the old copy.
                                    let mut status = json!({"observedGeneration": null,
                                        "isolated": null, "action": null, "intent": null,
                                        "requests": null, "failedAttempts": null,
                                        "nextAttemptAt": null, "lastHandledRetry": null,
                                        "conditions": null});
                                    if let Ok(Value::Object(cur)) = serde_json::to_value(&obj.status)
                                    {
                                        for (k, v) in cur {
                                            status[k] = v;
                                        }
                                    }
                                    snapshots.entry(name.clone()).or_insert((now, status));
                                    Ok("snapshot taken")
                                }
                                Err(e) => Err(e),
                            },
                        }
                    }
                };
                let key = match outcome {
                    Ok(what) => what,
                    Err(kube::Error::Api(e)) if e.code == 409 => "409 conflict",
                    Err(_) => "other error",
                };
                *counts.lock().unwrap().entry(key).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(if kind == "annotate" { 10 } else { 25 }))
                    .await;
            }
        }));
    }
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.expect("writer");
    }
    m.fault(false);
    let counts = counts.lock().unwrap().clone();
    let r = s.finish(m, &[]).await;
    eprintln!("[concurrent-writer] writer outcomes {counts:?}; {r:?}");
    assert!(
        counts.get("409 conflict").copied().unwrap_or(0) > 0,
        "the optimistic writer never met a conflict: {counts:?}"
    );
}
