//! The HTTP(S) server: our own accept loop around hyper, so that a handler can drop or reset
//! its connection without answering (the `drop` and `lost-response` faults).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Lets a handler abort the connection it is served on.
#[derive(Clone, Debug)]
pub struct ConnAbort(Arc<Notify>);

impl ConnAbort {
    /// Closes the connection (with a TCP reset) instead of answering. Never returns: the
    /// connection task drops the pending handler together with the connection.
    pub async fn abort<T>(&self) -> T {
        self.0.notify_one();
        std::future::pending().await
    }
}

/// Accepts connections forever.
pub async fn serve(listener: TcpListener, app: Router, tls: Option<TlsAcceptor>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move { connection(tcp, peer, app, tls).await });
    }
}

async fn connection(tcp: TcpStream, peer: SocketAddr, app: Router, tls: Option<TlsAcceptor>) {
    let _ = tcp.set_nodelay(true);
    // A second handle on the socket, to set SO_LINGER=0 (reset on close) when aborting.
    let Ok(std_tcp) = tcp.into_std() else { return };
    let Ok(raw) = std_tcp.try_clone() else { return };
    let Ok(tcp) = TcpStream::from_std(std_tcp) else {
        return;
    };
    let abort = Arc::new(Notify::new());
    let handle = ConnAbort(abort.clone());
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(handle.clone());
        app.clone().oneshot(req.map(Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let aborted = match tls {
        Some(acceptor) => {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                tracing::debug!(%peer, "TLS handshake failed");
                return;
            };
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => false,
                _ = abort.notified() => true,
            }
        }
        None => {
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => false,
                _ = abort.notified() => true,
            }
        }
    };
    if aborted {
        reset(raw);
    }
}

/// Closes the socket with RST: with a zero linger time the kernel resets instead of FIN.
fn reset(raw: std::net::TcpStream) {
    if let Ok(s) = TcpStream::from_std(raw) {
        // Deprecated because a non-zero linger blocks on drop; zero never blocks.
        #[allow(deprecated)]
        let _ = s.set_linger(Some(Duration::ZERO));
        drop(s);
    }
}
