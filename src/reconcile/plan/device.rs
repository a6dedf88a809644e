//! The machine: resolving spec.deviceName, and two resources that disagree about it (rule 6).

use super::*;

impl Planner<'_> {
    /// Resolves spec.deviceName by an exact computerDnsName match; refuses when several devices
    /// carry the name (never pick one) or none does.
    pub(super) fn resolve_device(&mut self) -> Option<Decision> {
        let Some(name) = self.input.spec.device_name.clone() else {
            return Some(stalled(
                Reason::InvalidSpec,
                "neither spec.machineId nor spec.deviceName is set".into(),
            ));
        };
        match &self.facts().resolution {
            Resolution::NotDone => Some(reconciling(
                Reason::ResolvingDevice,
                format!("looking up the MDE device named {name}"),
                Some(self.input.timing.transient_retry),
                Effect::ResolveDevice { device_name: name },
            )),
            Resolution::Failed(failure) => Some(self.failure_decision(failure)),
            Resolution::Found(found) => match found.as_slice() {
                [] => Some(stalled(
                    Reason::MachineNotFound,
                    format!(
                        "no MDE device is named {name} (exact computerDnsName match); check the \
                         name or set spec.machineId"
                    ),
                )),
                [one] => {
                    self.machine = Some(one.id.clone());
                    None
                }
                many => {
                    let listed: Vec<String> = many
                        .iter()
                        .map(|c| {
                            format!(
                                "{} ({})",
                                c.id,
                                c.health_status.as_deref().unwrap_or("health unknown")
                            )
                        })
                        .collect();
                    Some(stalled(
                        Reason::AmbiguousDevice,
                        format!(
                            "{} MDE devices are named {name}: {}; the operator never picks one: \
                             use spec.machineId in a new DeviceIsolation",
                            many.len(),
                            listed.join(", ")
                        ),
                    ))
                }
            },
        }
    }

    /// Rule 6: two resources for one machine that disagree both stall, and neither calls MDE.
    pub(super) fn conflict(&mut self) -> Option<Decision> {
        let others: Vec<&str> = self
            .input
            .siblings
            .iter()
            .filter(|s| s.isolated != self.input.spec.isolated)
            .map(|s| s.key.as_str())
            .collect();
        if others.is_empty() {
            return None;
        }
        let message = format!(
            "machine {} is also managed by {} with the opposite desired state; delete or align one of them",
            self.machine_id(),
            others.join(", ")
        );
        Some(stalled(Reason::Conflict, message))
    }
}
