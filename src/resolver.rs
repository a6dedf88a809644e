//! Resolves device names (spec.deviceName) to MDE machines in batches: names asked for within a
//! short window share one `GET /api/machines` call, `computerDnsName eq 'a' or computerDnsName eq
//! 'b' ...`, through the quota gate. Matching is exact (MDE has several records for one host under
//! short and full names; a prefix or case-folded match could release the wrong device).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::mde::client::MdeClient;
use crate::mde::error::MdeError;
use crate::mde::model::Machine;
use crate::mde::odata::{Filter, ListQuery};

/// Quota key of resolver reads.
pub const RESOLVER_KEY: &str = "device-resolver";

/// How long the first name of a batch waits for others. Real time, never divided by the time
/// scale: it gathers reconciles that start together (a watch's initial list, a restart, names
/// applied one after another), and those take the same real time to run at any scale.
pub const WINDOW: Duration = Duration::from_millis(100);

/// Names per call: keeps the URL well under common limits.
const NAMES_PER_CALL: usize = 20;

type Reply = oneshot::Sender<Result<Vec<Machine>, Arc<MdeError>>>;

/// Batches name lookups.
pub struct DeviceResolver {
    client: MdeClient,
    window: Duration,
    waiting: Mutex<HashMap<String, Vec<Reply>>>,
}

impl DeviceResolver {
    /// A resolver that gathers names for `window` before calling MDE.
    pub fn new(client: MdeClient, window: Duration) -> Arc<Self> {
        Arc::new(DeviceResolver {
            client,
            window,
            waiting: Mutex::new(HashMap::new()),
        })
    }

    /// The machines whose computerDnsName is exactly `name`.
    pub async fn resolve(self: &Arc<Self>, name: &str) -> Result<Vec<Machine>, Arc<MdeError>> {
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let first = waiting.is_empty();
            waiting.entry(name.to_string()).or_default().push(tx);
            first
        };
        if first {
            // The first name of a batch starts its timer; the others ride along.
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(me.window).await;
                me.flush().await;
            });
        }
        rx.await.unwrap_or_else(|_| Ok(Vec::new()))
    }

    async fn flush(&self) {
        let batch: HashMap<String, Vec<Reply>> =
            std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        let names: Vec<String> = batch.keys().cloned().collect();
        let mut replies = batch;
        for chunk in names.chunks(NAMES_PER_CALL) {
            let result = self
                .client
                .list_machines(&query_for(chunk), RESOLVER_KEY)
                .await
                .map_err(Arc::new);
            for name in chunk {
                let answer = match &result {
                    Ok(machines) => Ok(matches(machines, name)),
                    Err(e) => Err(e.clone()),
                };
                for reply in replies.remove(name).unwrap_or_default() {
                    let _ = reply.send(answer.clone());
                }
            }
        }
    }
}

/// `computerDnsName eq 'a' or computerDnsName eq 'b' ...`, with `$top` covering duplicates.
pub fn query_for(names: &[String]) -> ListQuery {
    let filter = names
        .iter()
        .map(|n| Filter::eq("computerDnsName", n.as_str()))
        .reduce(Filter::or);
    ListQuery {
        filter,
        top: Some(10_000),
        ..ListQuery::default()
    }
}

/// Exact, case-sensitive matches.
pub fn matches(machines: &[Machine], name: &str) -> Vec<Machine> {
    machines
        .iter()
        .filter(|m| m.computer_dns_name.as_deref() == Some(name))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, name: &str) -> Machine {
        serde_json::from_value(serde_json::json!({"id": id, "computerDnsName": name})).unwrap()
    }

    #[test]
    fn one_call_asks_for_every_name_with_exact_equality() {
        let q = query_for(&["a.contoso.local".into(), "b'x".into()]);
        assert_eq!(
            q.filter.unwrap().to_string(),
            "computerDnsName eq 'a.contoso.local' or computerDnsName eq 'b''x'"
        );
    }

    #[test]
    fn matching_is_exact_never_prefix_or_case_folded() {
        let all = [
            machine("1", "laptop-042"),
            machine("2", "laptop-042.contoso.local"),
            machine("3", "LAPTOP-042.contoso.local"),
            machine("4", "laptop-042.contoso.local"),
        ];
        let ids: Vec<String> = matches(&all, "laptop-042.contoso.local")
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, ["2", "4"]);
    }
}
