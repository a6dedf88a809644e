//! Small HTTP pieces for the tests' own fakes and proxies (axum on loopback).
#![allow(dead_code)] // each test binary uses its own subset of these helpers

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::request::Parts;

/// Serves `app` on a free loopback port in the background; returns its address.
pub async fn serve_loopback(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// A request's head, its path with the query (what a proxy appends to its upstream), and its
/// body of at most `limit` bytes; `None` when the body cannot be read.
pub async fn split(req: Request, limit: usize) -> Option<(Parts, String, Bytes)> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, limit).await.ok()?;
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    Some((parts, path, bytes))
}
