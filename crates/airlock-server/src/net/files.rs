//! The open-file budget: the soft `RLIMIT_NOFILE` raised to the hard limit at start, and split between the two listeners.
//!
//! Every connection is a file descriptor, so a listener's connection cap is a share of the file limit.
//! The API and the gateway each get their own share, with headroom for the store, the logs and the process's other files, so exhausting one listener never blocks the other.

/// Files kept out of both listeners' shares: the database and its WAL, logs, listeners, and whatever the runtime opens.
const RESERVED_MIN: u64 = 64;

/// The file limit in force and how it was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLimit {
    /// The soft limit now in force.
    pub soft: u64,
    /// The soft limit the process started with.
    pub started_with: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and reports the limit in force.
///
/// A failure to raise it is not fatal: the budgets are then cut from the limit the process has.
pub fn raise_nofile_limit() -> FileLimit {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return FileLimit { soft: 1024, started_with: 1024 };
    };
    if soft >= hard {
        return FileLimit { soft, started_with: soft };
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => FileLimit { soft: hard, started_with: soft },
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit; budgeting within the soft limit");
            FileLimit { soft, started_with: soft }
        }
    }
}

/// How many connections each listener may hold, cut from the file limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileBudgets {
    pub api: usize,
    pub gateway: usize,
}

impl FileBudgets {
    /// An eighth of the limit (at least [`RESERVED_MIN`]) stays in reserve; the API gets a third of the rest and
    /// the gateway, which holds a connection per appliance, two thirds.
    pub fn split(limit: u64) -> Self {
        let reserve = (limit / 8).max(RESERVED_MIN);
        let usable = usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX).max(2);
        let api = (usable / 3).max(1);
        Self { api, gateway: (usable - api).max(1) }
    }

    /// Caps the configured maxima to the budgets, so neither listener can reach the file limit.
    pub fn cap(self, api_max: usize, gateway_max: usize) -> Self {
        Self { api: api_max.min(self.api), gateway: gateway_max.min(self.gateway) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shares_and_the_reserve_fit_the_limit() {
        for limit in [16, 256, 1024, 65_536, 1 << 20] {
            let b = FileBudgets::split(limit);
            assert!(b.api >= 1 && b.gateway >= 1, "{limit}: {b:?}");
            if limit >= 256 {
                assert!(
                    (b.api + b.gateway) as u64 + RESERVED_MIN <= limit,
                    "{limit}: {b:?} leaves no room for the store"
                );
            }
        }
        assert_eq!(FileBudgets::split(1024), FileBudgets { api: 298, gateway: 598 });
        assert_eq!(FileBudgets::split(1024).cap(100, 10_000), FileBudgets { api: 100, gateway: 598 });
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let limit = raise_nofile_limit();
        let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
        assert_eq!(limit.soft, soft);
        assert!(limit.started_with <= limit.soft);
    }
}
