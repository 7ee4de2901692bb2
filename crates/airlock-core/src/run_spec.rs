//! What vendor code asks of the box it runs in, and what the customer allows it.
//!
//! A template may ask (`[run]` in `template.toml`) to run as root and for its limits: wall
//! time, processes, memory. What it asks is part of the rendered command, so it is in the
//! digest the customer signs and shown in review. The customer's policy caps the limits
//! (`[vendor_code]`); without caps, the defaults are the caps, so a template may ask for less
//! than the defaults, never more. Running as root needs the customer's signature on the
//! request itself (a grant, or a pre-approval of that template version): a standing window
//! never covers it.

use serde::{Deserialize, Serialize};

/// Who vendor code runs as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunUser {
    /// The appliance's dedicated unprivileged box user.
    #[default]
    Box,
    /// Root (still in its cell and under Landlock): only with the customer's approval of the
    /// request.
    Root,
}

/// What a template asks of its box. The default asks nothing and is not serialized, so
/// commands rendered before it existed keep their digest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    #[serde(default, skip_serializing_if = "is_box")]
    pub user: RunUser,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_time_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
}

fn is_box(user: &RunUser) -> bool {
    *user == RunUser::Box
}

impl RunSpec {
    pub fn is_default(&self) -> bool {
        *self == RunSpec::default()
    }
}

/// The customer's caps on what vendor code may use, and whether it may run as the appliance's
/// own user (where the appliance is not root and so cannot switch users).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VendorCodeCaps {
    /// Accept Deploy and Operate work run as the appliance's own user. Off by default: such an
    /// appliance refuses that work. Shown in `phase status` and audited at every run.
    #[serde(default)]
    pub same_user: bool,
    pub max_wall_time_seconds: Option<u32>,
    pub max_processes: Option<u32>,
    pub max_memory_mib: Option<u32>,
}

/// The limits a run gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLimits {
    pub wall_time_seconds: u32,
    pub processes: u32,
    pub memory_mib: u32,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self { wall_time_seconds: 3600, processes: 256, memory_mib: 4096 }
    }
}

/// A limit the template asks above the customer's cap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverCap {
    pub limit: &'static str,
    pub asked: u32,
    pub cap: u32,
}

/// The limits for `spec` under `caps`: what it asks, or the default (never above the cap).
pub fn resolve(spec: &RunSpec, caps: Option<&VendorCodeCaps>) -> Result<RunLimits, OverCap> {
    let defaults = RunLimits::default();
    let one = |limit: &'static str, asked: Option<u32>, cap: Option<u32>, default: u32| {
        let cap = cap.unwrap_or(default);
        match asked {
            Some(asked) if asked > cap || asked == 0 => Err(OverCap { limit, asked, cap }),
            Some(asked) => Ok(asked),
            None => Ok(default.min(cap)),
        }
    };
    let caps = caps.cloned().unwrap_or_default();
    Ok(RunLimits {
        wall_time_seconds: one(
            "wall_time_seconds",
            spec.wall_time_seconds,
            caps.max_wall_time_seconds,
            defaults.wall_time_seconds,
        )?,
        processes: one("processes", spec.processes, caps.max_processes, defaults.processes)?,
        memory_mib: one("memory_mib", spec.memory_mib, caps.max_memory_mib, defaults.memory_mib)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_what_the_template_asks_within_the_customers_caps() {
        let asks = RunSpec { wall_time_seconds: Some(60), ..RunSpec::default() };
        assert_eq!(resolve(&asks, None).unwrap().wall_time_seconds, 60);
        // No caps: the defaults are the caps.
        let greedy = RunSpec { processes: Some(10_000), ..RunSpec::default() };
        assert_eq!(resolve(&greedy, None), Err(OverCap { limit: "processes", asked: 10_000, cap: 256 }));
        let caps =
            VendorCodeCaps { max_processes: Some(20_000), max_wall_time_seconds: Some(30), ..Default::default() };
        assert_eq!(resolve(&greedy, Some(&caps)).unwrap().processes, 10_000);
        // A cap below the default lowers what a template that asks nothing gets.
        assert_eq!(resolve(&RunSpec::default(), Some(&caps)).unwrap().wall_time_seconds, 30);
        let zero = RunSpec { memory_mib: Some(0), ..RunSpec::default() };
        assert!(resolve(&zero, None).is_err());
    }

    #[test]
    fn asking_nothing_serializes_to_nothing() {
        assert_eq!(serde_json::to_string(&RunSpec::default()).unwrap(), "{}");
        let root = RunSpec { user: RunUser::Root, ..RunSpec::default() };
        assert_eq!(serde_json::to_string(&root).unwrap(), r#"{"user":"root"}"#);
    }
}
