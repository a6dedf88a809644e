//! The one polling helper of the tests: ask again until the answer is there, or fail naming what
//! was awaited and what was seen last.
#![allow(dead_code)] // each test binary uses its own subset of these helpers

use std::future::Future;
use std::time::{Duration, Instant};

/// Calls `f` every `every` until it returns `Ok`; after `timeout`, the last `Err` (a description
/// of what was seen).
pub async fn poll<T, F, Fut>(timeout: Duration, every: Duration, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let end = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() > end => return Err(last),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// [`poll`] every 100 ms, panicking after `timeout` with `what` and the last thing seen.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    match poll(timeout, Duration::from_millis(100), f).await {
        Ok(v) => v,
        Err(last) => panic!("timed out after {timeout:?} waiting for {what}; last seen:\n{last}"),
    }
}
