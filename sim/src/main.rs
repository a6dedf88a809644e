//! `mde-sim`: a simulator of the Microsoft Defender for Endpoint machine-action API
//! (token endpoints, machines, isolate/unisolate, machine actions with OData, quotas, action
//! lifecycles, faults, TLS) with an admin API exposing ground truth. It implements the wire
//! contract of shared/mde-api.md independently of the operator's library.

mod admin;
mod api;
mod auth;
mod calls;
mod clock;
mod config;
mod credentials;
mod errors;
mod faults;
mod foreign;
mod handlers;
mod lifecycle;
mod odata;
mod quota;
mod server;
mod state;
mod tenant;
mod tls;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use axum::Router;
use clap::Parser;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tracing_subscriber::EnvFilter;

use crate::clock::SimClock;
use crate::config::Cli;
use crate::faults::FaultSettings;
use crate::lifecycle::Delays;
use crate::state::{Settings, SimState, Tenant, TenantKey};
use crate::tenant::{App, SeedFile};

fn build_state(cli: &Cli) -> Result<SimState, String> {
    let start = cli.start_time.unwrap_or_else(chrono::Utc::now);
    let clock = SimClock::new(start, cli.time_scale);
    let now = clock.now();
    let seed: SeedFile = match &cli.seed {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            serde_yaml::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?
        }
        None => SeedFile::default(),
    };
    let mut rng = StdRng::seed_from_u64(cli.rng_seed);
    let mut machines = Vec::new();
    for m in seed.machines {
        machines.push(tenant::machine_from_seed(m, &mut rng, now)?);
    }
    machines.extend(tenant::generate_machines(
        &mut rng,
        1,
        cli.machines,
        cli.offline_ratio,
        cli.failing_ratio,
        tenant::DEFAULT_DOMAIN,
        now,
    ));
    let base = cli
        .seed
        .as_deref()
        .and_then(std::path::Path::parent)
        .unwrap_or(std::path::Path::new("."));
    let apps: Vec<App> = if seed.apps.is_empty() {
        vec![App {
            client_id: cli.client_id.clone(),
            client_secret: Some(cli.client_secret.clone()),
            roles: cli.app_roles.clone(),
            display_name: cli.client_id.clone(),
            // It has no keys to verify assertions with.
            allow_assertion: true,
            certificates: Vec::new(),
            federated: Vec::new(),
        }]
    } else {
        seed.apps
            .into_iter()
            .map(|a| a.into_app(base))
            .collect::<Result<_, _>>()?
    };
    let settings = Settings {
        quota_per_minute: cli.quota_per_minute,
        quota_per_hour: cli.quota_per_hour,
        quota_key: cli.quota_key,
        retry_after: cli.retry_after,
        duplicate_mode: cli.duplicate_mode,
        overlap_order: cli.overlap_order,
        delays: Delays {
            pending_delay: cli.pending_delay,
            progress_delay: cli.progress_delay,
            offline_timeout: cli.offline_timeout,
        },
        token_lifetime: cli.token_lifetime,
        page_size: cli.page_size,
        audiences: cli.audience.clone(),
        empty_filter_404: cli.empty_filter_404,
        v1_string_numbers: cli.v1_string_numbers,
    };
    let faults = FaultSettings {
        fault_5xx_rate: cli.fault_5xx_rate,
        latency_ms: cli.latency_ms,
        drop_rate: cli.drop_rate,
        lost_response_rate: cli.lost_response_rate,
        apis: None,
        one_shot: Vec::new(),
    };
    let default = Tenant::new(
        None,
        apps,
        machines,
        cli.foreign_load.clone().unwrap_or_default().0,
        cli.machines + 1,
        cli.rng_seed,
        now,
    )?;
    let mut state = SimState::new(clock, settings, faults, default, cli.rng_seed);
    for t in seed.tenants {
        let id = t.tenant_id.clone();
        if state.resolve(&id) != TenantKey::Default {
            return Err(format!("tenant {id} appears twice in the seed file"));
        }
        state.put_tenant(Tenant::from_seed(t, base, cli.rng_seed, now)?);
    }
    Ok(state)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("MDE_SIM_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(e) = cli.validate() {
        eprintln!("mde-sim: {e}");
        return ExitCode::from(2);
    }
    let state = match build_state(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mde-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = if cli.tls {
        match tls::setup(&cli.tls_san) {
            Ok(t) => {
                if let Some(path) = &cli.ca_out
                    && let Err(e) = std::fs::write(path, &t.ca_pem)
                {
                    eprintln!("mde-sim: writing {}: {e}", path.display());
                    return ExitCode::from(2);
                }
                Some(t.acceptor)
            }
            Err(e) => {
                eprintln!("mde-sim: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let listener = match tokio::net::TcpListener::bind(cli.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mde-sim: cannot listen on {}: {e}", cli.listen);
            return ExitCode::from(1);
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mde-sim: {e}");
            return ExitCode::from(1);
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(
        %addr,
        machines = state.default_tenant().machines().len(),
        tenants = state.tenants.len(),
        time_scale = cli.time_scale,
        duplicate_mode = ?cli.duplicate_mode,
        "mde-sim ready"
    );
    let shared = Arc::new(api::Shared {
        state: Mutex::new(state),
        scheme,
        host: addr.to_string(),
    });
    let app = Router::new().fallback(api::dispatch).with_state(shared);
    // The one line on stdout: callers wait for it to learn the address.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "LISTENING {scheme}://{addr}");
    let _ = out.flush();
    drop(out);
    tokio::select! {
        _ = server::serve(listener, app, tls) => {}
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const SEED: &str = r#"
machines:
  - id: "1e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    computerDnsName: a.contoso.local
    rbacGroupName: Servers
    isolatedBy:
      requestor: Automatic Attack Disruption
      requestSource: AutomaticAttackDisruption
      at: "2026-12-01T10:00:00Z"
      comment: Contained
  - id: "2e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    computerDnsName: b.contoso.local
    rbacGroupName: Laptops
  - id: "3e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    computerDnsName: c.contoso.local
    rbacGroupName: Servers
    isolatedBy: {requestor: soc@contoso.com, isolationType: Selective}
  - id: "4e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    computerDnsName: d.contoso.local
"#;

    fn state(yaml: &str, rng_seed: &str) -> Result<SimState, String> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(yaml.as_bytes()).unwrap();
        let cli = Cli::try_parse_from([
            "mde-sim",
            "--seed",
            f.path().to_str().unwrap(),
            "--rng-seed",
            rng_seed,
            "--time-scale",
            "0",
            "--start-time",
            "2026-12-05T08:00:00Z",
        ])
        .unwrap();
        build_state(&cli)
    }

    fn action_ids(st: &SimState) -> Vec<String> {
        st.default_tenant()
            .actions()
            .iter()
            .map(|a| a.id.clone())
            .collect()
    }

    #[test]
    fn isolated_by_puts_a_succeeded_isolate_into_the_history() {
        let mut st = state(SEED, "7").unwrap();
        let now = st.clock.now();
        let views: Vec<serde_json::Value> = st
            .default_tenant()
            .actions()
            .iter()
            .map(|a| serde_json::to_value(a.view(now)).unwrap())
            .collect();
        assert_eq!(views.len(), 2);
        let a = &views[0];
        assert_eq!(a["type"], "Isolate");
        assert_eq!(a["status"], "Succeeded");
        assert_eq!(a["scope"], "Full");
        assert_eq!(a["requestor"], "Automatic Attack Disruption");
        assert_eq!(a["requestSource"], "AutomaticAttackDisruption");
        assert_eq!(a["requestorComment"], "Contained");
        assert_eq!(a["machineId"], "1e5bc9d7e413ddd7902c2932e418702b84d0cc07");
        assert_eq!(a["computerDnsName"], "a.contoso.local");
        assert_eq!(a["creationDateTimeUtc"], "2026-12-01T10:00:00.0000000Z");
        assert_eq!(a["lastUpdateDateTimeUtc"], "2026-12-01T10:00:00.0000000Z");
        let b = &views[1];
        assert_eq!(b["requestSource"], "Portal");
        assert_eq!(b["scope"], "Selective");
        assert_eq!(b["creationDateTimeUtc"], "2026-12-05T08:00:00.0000000Z");

        let g = st
            .default_tenant()
            .ground_truth("1e5bc9d7e413ddd7902c2932e418702b84d0cc07", now)
            .unwrap();
        assert!(g.isolated);
        assert_eq!(g.last_change_action_id.as_deref(), a["id"].as_str());
        assert_eq!(
            g.last_change.as_deref(),
            Some("2026-12-01T10:00:00.0000000Z")
        );
        let g = st
            .default_tenant()
            .ground_truth("4e5bc9d7e413ddd7902c2932e418702b84d0cc07", now)
            .unwrap();
        assert!(!g.isolated && g.actions.is_empty());
        // Not a call, so no quota.
        assert!(st.default_tenant().calls.is_empty());
        let one = crate::quota::Limits {
            per_minute: 1,
            per_hour: 1,
            key: crate::config::QuotaKey::App,
        };
        let mut tenant = st.tenants.remove(&TenantKey::Default).unwrap();
        let app = tenant.apps[0].client_id.clone();
        for api in crate::calls::ApiName::ALL {
            assert!(tenant.quota.check(&app, api, now, one).is_ok(), "{api:?}");
        }

        st.tenants.insert(TenantKey::Default, tenant);

        // Ids follow --rng-seed and come back after a reset.
        let ids = action_ids(&st);
        assert_eq!(ids, action_ids(&state(SEED, "7").unwrap()));
        assert_ne!(ids, action_ids(&state(SEED, "8").unwrap()));
        st.reset();
        assert_eq!(ids, action_ids(&st));
    }

    #[test]
    fn device_groups_get_stable_ids() {
        let st = state(SEED, "1").unwrap();
        let gid = |i: usize| {
            (
                st.default_tenant().machines()[i].rbac_group_name.clone(),
                st.default_tenant().machines()[i].rbac_group_id,
            )
        };
        assert_eq!(gid(0), ("Servers".into(), 1));
        assert_eq!(gid(1), ("Laptops".into(), 2));
        assert_eq!(gid(2), ("Servers".into(), 1));
        assert_eq!(gid(3), ("UnassignedGroup".into(), 0));
    }

    #[test]
    fn bad_isolated_by_refuses_to_start() {
        let e = state(
            "machines:\n  - computerDnsName: a\n    isolatedBy: {requestor: x, at: soon}\n",
            "1",
        )
        .err()
        .unwrap();
        assert!(e.contains("isolatedBy.at \"soon\""), "{e}");
        let e = state(
            "machines:\n  - computerDnsName: a\n    isolatedBy: {requestor: x, by: y}\n",
            "1",
        )
        .err()
        .unwrap();
        assert!(e.contains("unknown field `by`"), "{e}");
    }

    const TENANTS: &str = r#"
tenants:
  - tenantId: Fabrikam.onmicrosoft.com
    apps: [{clientId: operator, clientSecret: f, roles: [Machine.Read.All]}]
    machines:
      - computerDnsName: dc-01.fabrikam.local
        isolatedBy: {requestor: soc@fabrikam.com}
    generate: {count: 3, domain: fabrikam.local}
    foreignLoad: [{api: unisolate, perMinute: 5}]
  - tenantId: 0b7c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3
    apps: [{clientId: operator, clientSecret: n}]
    generate: {count: 2}
"#;

    fn named(st: &SimState, id: &str) -> Vec<(String, String)> {
        st.tenants[&TenantKey::named(id)]
            .machines()
            .iter()
            .map(|m| (m.id.clone(), m.computer_dns_name.clone()))
            .collect()
    }

    #[test]
    fn seed_tenants_have_their_own_machines_apps_and_load() {
        let st = state(&format!("{SEED}{TENANTS}"), "7").unwrap();
        assert_eq!(st.tenants.len(), 3);
        // The default tenant is exactly what it was without named tenants.
        let alone = state(SEED, "7").unwrap();
        assert_eq!(
            action_ids(&st),
            action_ids(&alone),
            "named tenants must not shift the default tenant's ids"
        );
        assert_eq!(st.default_tenant().machines().len(), 4);
        assert_eq!(st.default_tenant().apps[0].client_id, "mde-sim-client");

        let f = st.resolve("fabrikam.ONMICROSOFT.com");
        let fab = &st.tenants[&f];
        assert_eq!(fab.id.as_deref(), Some("Fabrikam.onmicrosoft.com"));
        let names: Vec<String> = named(&st, "fabrikam.onmicrosoft.com")
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(
            names,
            [
                "dc-01.fabrikam.local",
                "host-0001.fabrikam.local",
                "host-0002.fabrikam.local",
                "host-0003.fabrikam.local"
            ]
        );
        assert_eq!(fab.actions().len(), 1, "the isolatedBy of dc-01");
        assert_eq!(fab.next_number, 4);
        assert_eq!(fab.foreign.describe()["load"][0]["perMinute"], 5);
        assert_eq!(fab.apps[0].client_secret.as_deref(), Some("f"));

        let n = &st.tenants[&st.resolve("0B7C1D2E-3F40-4A5B-8C6D-7E8F90A1B2C3")];
        assert_eq!(n.apps[0].client_secret.as_deref(), Some("n"));
        assert_eq!(n.machines()[1].computer_dns_name, "host-0002.contoso.local");
        // Same names as the default tenant's generated machines would have, other ids.
        let other = named(&st, "0b7c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3");
        let tenants_only = state(TENANTS, "7").unwrap();
        assert_eq!(
            other,
            named(&tenants_only, "0b7c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3"),
            "a tenant's machines follow --rng-seed and its id"
        );
        let reseeded = state(TENANTS, "8").unwrap();
        assert_ne!(
            other,
            named(&reseeded, "0b7c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3")
        );
        // Any other tenant id is the default tenant.
        assert_eq!(st.resolve("contoso.onmicrosoft.com"), TenantKey::Default);
    }

    #[test]
    fn bad_seed_tenants_refuse_to_start() {
        for (yaml, says) in [
            (
                "tenants: [{tenantId: a.com, apps: [{clientId: x}]}, {tenantId: A.COM, apps: [{clientId: y}]}]",
                "tenant A.COM appears twice",
            ),
            (
                "tenants: [{tenantId: a.com, apps: []}]",
                "tenant a.com: needs at least one app",
            ),
            ("tenants: [{tenantId: a.com}]", "missing field `apps`"),
            (
                "tenants: [{tenantId: a/b, apps: [{clientId: x}]}]",
                "is not a GUID or domain name",
            ),
            (
                "tenants: [{tenantId: a.com, apps: [{clientId: x}], machine: []}]",
                "unknown field `machine`",
            ),
            (
                "tenants: [{tenantId: a.com, apps: [{clientId: x}], generate: {count: 1, offlineRatio: 2}}]",
                "offlineRatio and failingRatio must be 0..1",
            ),
            (
                "tenants: [{tenantId: a.com, apps: [{clientId: x}], foreignLoad: [{api: isolate, perMinute: 1, app: y}]}]",
                "tenant a.com: foreign load names an unknown app \"y\"",
            ),
            (
                "tenants: [{tenantId: a.com, apps: [{clientId: x}], machines: [{id: \"1e5bc9d7e413ddd7902c2932e418702b84d0cc07\", computerDnsName: a}, {id: \"1e5bc9d7e413ddd7902c2932e418702b84d0cc07\", computerDnsName: b}]}]",
                "tenant a.com: machine id 1e5bc9d7e413ddd7902c2932e418702b84d0cc07 already exists",
            ),
        ] {
            let e = state(yaml, "1").expect_err(yaml);
            assert!(e.contains(says), "{yaml}: {e}");
        }
    }
}
