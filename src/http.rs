//! The operator's one HTTP port: `/metrics`, `/livez`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::leader::Leading;
use crate::metrics::Metrics;

/// Liveness and readiness as the process sees them.
#[derive(Debug)]
pub struct Health {
    /// Every watch cache has synced.
    pub caches_synced: AtomicBool,
    /// This replica may talk to MDE (it is the leader, or leader election is off).
    pub leading: Leading,
    /// Another live replica holds the leader-election lease (this one is a hot standby). Shared
    /// with the election, which sets it whenever it reads the Lease.
    pub leader_known: Arc<AtomicBool>,
    /// The controllers are running (false once one of them has stopped).
    pub controllers_running: AtomicBool,
    /// Unix time (ms) the batch poller last started a cycle.
    pub poller_heartbeat_ms: AtomicI64,
    /// Longest a healthy poller may go between cycles.
    pub poller_max_silence: Duration,
}

impl Health {
    /// Health before anything has started.
    pub fn new(poller_max_silence: Duration, leading: Leading) -> Self {
        Health {
            caches_synced: AtomicBool::new(false),
            leading,
            leader_known: Arc::new(AtomicBool::new(false)),
            controllers_running: AtomicBool::new(true),
            poller_heartbeat_ms: AtomicI64::new(now_ms()),
            poller_max_silence,
        }
    }

    /// Records a poller cycle.
    pub fn poller_beat(&self) {
        self.poller_heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Live: the controllers run and the poller has not gone silent. A wedged process fails this
    /// and is restarted; a process merely waiting for quota or leadership stays live.
    pub fn live(&self) -> Result<(), String> {
        if !self.controllers_running.load(Ordering::Relaxed) {
            return Err("a controller stopped".into());
        }
        let silent_ms = now_ms() - self.poller_heartbeat_ms.load(Ordering::Relaxed);
        if self.leading.now() && silent_ms > self.poller_max_silence.as_millis() as i64 {
            return Err(format!("batch poller silent for {} s", silent_ms / 1000));
        }
        Ok(())
    }

    /// Ready: watch caches synced and a leader known, this replica or another (design.md §4). A
    /// hot standby is ready, so that a Deployment of two replicas is Available and can roll; the
    /// answer says which role this replica has.
    pub fn ready(&self) -> Result<&'static str, String> {
        self.live()?;
        if !self.caches_synced.load(Ordering::Relaxed) {
            return Err("watch caches not synced yet".into());
        }
        if self.leading.now() {
            return Ok("leader");
        }
        if self.leader_known.load(Ordering::Relaxed) {
            return Ok("standby");
        }
        Err("no leader known yet".into())
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The router, separate from binding so tests can drive it.
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

/// Serves on `listener` (bound by the caller, so that a bind error stops start-up with a message)
/// until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /livez, /readyz");
    }
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn livez(State(state): State<AppState>) -> impl IntoResponse {
    verdict(state.health.live().map(|()| "live"))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    verdict(state.health.ready())
}

fn verdict(result: Result<&'static str, String>) -> (StatusCode, String) {
    match result {
        Ok(what) => (StatusCode::OK, format!("ok: {what}\n")),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_synced_caches_and_leadership() {
        let (leader, leading) = crate::leader::leading(false);
        let h = Health::new(Duration::from_secs(60), leading);
        assert!(h.live().is_ok());
        assert!(h.ready().is_err());
        h.caches_synced.store(true, Ordering::Relaxed);
        assert_eq!(h.ready().unwrap_err(), "no leader known yet");
        h.leader_known.store(true, Ordering::Relaxed);
        assert_eq!(h.ready(), Ok("standby"));
        leader.lead();
        assert_eq!(h.ready(), Ok("leader"));
    }

    #[test]
    fn liveness_fails_when_the_poller_goes_silent_or_a_controller_stops() {
        let (_leader, leading) = crate::leader::leading(true);
        let h = Health::new(Duration::from_secs(60), leading);
        h.poller_heartbeat_ms
            .store(now_ms() - 120_000, Ordering::Relaxed);
        assert!(h.live().unwrap_err().contains("poller silent"));
        h.poller_beat();
        assert!(h.live().is_ok());
        h.controllers_running.store(false, Ordering::Relaxed);
        assert!(h.live().is_err());
    }
}
