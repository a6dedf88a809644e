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
use crate::state::{Settings, SimState};
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
        now,
    ));
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
        let base = cli
            .seed
            .as_deref()
            .and_then(std::path::Path::parent)
            .unwrap_or(std::path::Path::new("."));
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
    SimState::new(
        clock,
        settings,
        faults,
        cli.foreign_load.clone().unwrap_or_default().0,
        apps,
        machines,
        cli.machines + 1,
        cli.rng_seed,
    )
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
        machines = state.machines().len(),
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
