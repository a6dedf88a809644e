//! Resolving a set's selector into a snapshot: which `GET /api/machines` reads to make (batched,
//! filtered on MDE's side where MDE can), and which of the machines they return match (always
//! checked here too, exactly: MDE's filters narrow the reads, this decides).
//!
//! `rbacGroupNames` are matched here only (MDE filters device groups by id, not by name), and
//! `isolatedBy` against the shared view of actions, which the batch poller loads anyway. So a
//! selection costs ⌈N / 10,000⌉ reads of machines (explicit ids and names in batches) and no read
//! of actions of its own.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};

use crate::crd::{DevicePreview, DeviceSelector, Exclusion, IsolatedBy, PREVIEW_LEN};
use crate::mde::model::{ActionStatus, Machine};
use crate::mde::odata::{Filter, ListQuery};
use crate::reconcile::{ActionFact, ActionKind};

/// Quota key of selection reads.
pub const SELECTION_KEY: &str = "fleet-selection";

/// Ids per `id in (...)` read: 100 ids keep the URL near 4 KB.
const IDS_PER_CALL: usize = 100;

/// Names per read, as the device-name resolver batches them.
const NAMES_PER_CALL: usize = 20;

/// The reads that cover every machine `selector` can match.
pub fn queries(selector: &DeviceSelector) -> Vec<ListQuery> {
    let tags = selector
        .machine_tags
        .iter()
        .map(|t| Filter::any_eq("machineTags", t.as_str()))
        .reduce(Filter::and);
    let with_tags = |f: Filter| match &tags {
        Some(t) => f.and(t.clone()),
        None => f,
    };
    let filters: Vec<Option<Filter>> = if !selector.machine_ids.is_empty() {
        selector
            .machine_ids
            .chunks(IDS_PER_CALL)
            .map(|c| Some(with_tags(Filter::is_in("id", c.iter().map(String::as_str)))))
            .collect()
    } else if !selector.device_names.is_empty() {
        selector
            .device_names
            .chunks(NAMES_PER_CALL)
            .map(|c| {
                c.iter()
                    .map(|n| Filter::eq("computerDnsName", n.as_str()))
                    .reduce(Filter::or)
                    .map(with_tags)
            })
            .collect()
    } else {
        vec![tags.clone()]
    };
    filters
        .into_iter()
        .map(|filter| ListQuery {
            filter,
            top: Some(10_000),
            ..ListQuery::default()
        })
        .collect()
}

/// What a selector picked out of the machines read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Picked {
    /// Matching devices in rollout order (by name, then id), exclusions removed.
    pub machines: Vec<DevicePreview>,
    /// Matching devices the exclusions removed.
    pub excluded: u32,
}

impl Picked {
    /// The first devices, for status.
    pub fn preview(&self) -> Vec<DevicePreview> {
        self.machines.iter().take(PREVIEW_LEN).cloned().collect()
    }

    /// Every machine id, in rollout order.
    pub fn machine_ids(&self) -> Vec<String> {
        self.machines.iter().map(|m| m.machine_id.clone()).collect()
    }
}

/// The machines of `read` that `selector` matches, less `exclude`. `actions_of` gives a
/// machine's known Isolate/Unisolate actions (the view), for `isolatedBy`.
pub fn pick<F>(
    read: &[Machine],
    selector: &DeviceSelector,
    exclude: &Exclusion,
    actions_of: F,
) -> Picked
where
    F: Fn(&str) -> Vec<ActionFact>,
{
    let ids: HashSet<&str> = selector.machine_ids.iter().map(String::as_str).collect();
    let names: HashSet<&str> = selector.device_names.iter().map(String::as_str).collect();
    let groups: HashSet<&str> = selector
        .rbac_group_names
        .iter()
        .map(String::as_str)
        .collect();
    let mut by_id: BTreeMap<&str, &Machine> = BTreeMap::new();
    for m in read {
        by_id.insert(m.id.as_str(), m);
    }
    let mut picked = Picked::default();
    for m in by_id.values() {
        let name = m.computer_dns_name.as_deref();
        let matches = (ids.is_empty() || ids.contains(m.id.as_str()))
            && (names.is_empty() || name.is_some_and(|n| names.contains(n)))
            && selector
                .machine_tags
                .iter()
                .all(|t| m.machine_tags.contains(t))
            && (groups.is_empty()
                || m.rbac_group_name
                    .as_deref()
                    .is_some_and(|g| groups.contains(g)))
            && selector
                .isolated_by
                .as_ref()
                .is_none_or(|by| isolated_by(&actions_of(&m.id), by));
        if !matches {
            continue;
        }
        let excluded = exclude.machine_ids.contains(&m.id)
            || m.machine_tags
                .iter()
                .any(|t| exclude.machine_tags.contains(t));
        if excluded {
            picked.excluded += 1;
            continue;
        }
        picked.machines.push(DevicePreview {
            machine_id: m.id.clone(),
            computer_dns_name: m.computer_dns_name.clone(),
        });
    }
    picked.machines.sort_by(|a, b| {
        (a.computer_dns_name.as_deref(), &a.machine_id)
            .cmp(&(b.computer_dns_name.as_deref(), &b.machine_id))
    });
    picked
}

/// Whether the device is isolated now by an action matching `by`: its latest succeeded
/// Isolate/Unisolate is an Isolate whose requestor, requestSource and creation time match every
/// given field (empty strings are not given).
pub fn isolated_by(actions: &[ActionFact], by: &IsolatedBy) -> bool {
    let Some(last) = actions
        .iter()
        .filter(|a| a.status == ActionStatus::Succeeded)
        .max_by_key(|a| a.finished_at())
    else {
        return false;
    };
    let given = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    let since: Option<DateTime<Utc>> = by
        .since
        .as_deref()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc));
    last.kind == ActionKind::Isolate
        && given(&by.requestor).is_none_or(|r| last.requestor.as_deref() == Some(r.as_str()))
        && given(&by.request_source)
            .is_none_or(|s| last.request_source.as_deref() == Some(s.as_str()))
        && since.is_none_or(|t| last.created_at.is_some_and(|c| c >= t))
}

/// Digest of what selects (selector and exclusions): the snapshot is resolved again only when it
/// changes, so pausing, unpausing or raising maxDevices keep the reviewed selection.
pub fn criteria(selector: &DeviceSelector, exclude: &Exclusion) -> String {
    let text = serde_json::to_string(&(selector, exclude)).unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests;
