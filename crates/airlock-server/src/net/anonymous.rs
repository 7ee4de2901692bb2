//! What anonymous peers may hold in memory (logins in progress, join challenges), counted by where they come from and whom they are for: one budget, one home.
//!
//! Each entry counts against its source address (an IPv6 /64, [`super::prefix::address_key`]), its network (an IPv6 /48 or an IPv4 /24, [`super::prefix::network_key`]), its party when one is known (the tenant a sign-in is for), and the whole table.
//! Each level's budget is a small share of the next: one /48 (65,536 /64s, cheap from any IPv6 host provider) holds what eight hosts would, so filling the table takes [`Budget::networks_to_fill`] networks, not one.
//! A party's budget is a share of the table, so a flood aimed at one tenant's sign-in leaves every other tenant room.
//! A party's first few entries are its own ([`Budget::reserved_per_party`]) and take no place in the table: a table filled by floods aimed at other parties leaves each party nobody flooded its reserve, without evicting anyone for it (the reserves add at most that many per party, and parties are made by operators, not by peers).
//! The table only counts; its owner decides what a full level means (refuse the newcomer, or let an address displace its own oldest entry).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use super::prefix::{address_key, network_key};

/// How much each level may hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub per_address: usize,
    pub per_network: usize,
    /// Per party (tenant); entries with no party count only against the others.
    pub per_party: usize,
    /// Each party's first entries that take no place in the table (`total`): what a party nobody flooded can still
    /// hold when the table is full. At most `per_party`.
    pub reserved_per_party: usize,
    /// The table's places: entries beyond their party's reserve, and entries with no party.
    pub total: usize,
}

impl Budget {
    /// How many networks, each at its cap, it takes to fill the table.
    pub const fn networks_to_fill(&self) -> usize {
        self.total.div_ceil(self.per_network)
    }
}

/// The level that is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Over {
    /// The newcomer's address (an IPv6 /64) holds its share.
    Address,
    /// The newcomer's network (an IPv6 /48, an IPv4 /24) holds its share.
    Network,
    /// The party the newcomer asks for (a tenant) holds its share.
    Party,
    /// The table is full (and the newcomer's party holds its reserve, if it has one).
    Total,
}

/// Where one entry counts: kept beside the entry, and given back when it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder<P> {
    /// `None`: an in-process caller with no address (tests, the CLI's in-memory server); such callers share one budget.
    address: Option<IpAddr>,
    network: Option<IpAddr>,
    party: Option<P>,
}

impl<P> Holder<P> {
    pub fn new(from: Option<IpAddr>, party: Option<P>) -> Self {
        Self { address: from.map(address_key), network: from.map(network_key), party }
    }

    /// The address key it counts under (an IPv6 /64).
    pub fn address(&self) -> Option<IpAddr> {
        self.address
    }

    /// The network key it counts under (an IPv6 /48, an IPv4 /24).
    pub fn network(&self) -> Option<IpAddr> {
        self.network
    }

    /// The party it counts under, if any.
    pub fn party(&self) -> Option<&P> {
        self.party.as_ref()
    }
}

/// What each address, network and party holds, and the table in all.
#[derive(Debug)]
pub struct Holdings<P> {
    budget: Budget,
    by_address: HashMap<Option<IpAddr>, usize>,
    by_network: HashMap<Option<IpAddr>, usize>,
    by_party: HashMap<P, usize>,
    total: usize,
    /// Entries that take a place in the table: beyond their party's reserve, or with no party.
    in_table: usize,
}

impl<P: Eq + Hash + Clone> Holdings<P> {
    pub fn new(budget: Budget) -> Self {
        Self {
            budget,
            by_address: HashMap::new(),
            by_network: HashMap::new(),
            by_party: HashMap::new(),
            total: 0,
            in_table: 0,
        }
    }

    /// What `party` holds now.
    pub fn held_by(&self, party: &P) -> usize {
        self.by_party.get(party).copied().unwrap_or(0)
    }

    /// Whether one more entry of `holder` takes a place in the table (its party holds its reserve, or it has none).
    fn takes_a_place(&self, holder: &Holder<P>) -> bool {
        holder.party.as_ref().is_none_or(|p| self.held_by(p) >= self.budget.reserved_per_party)
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// The narrowest level that has no room for one more entry of `holder`, if any.
    pub fn over(&self, holder: &Holder<P>) -> Option<Over> {
        let held = |map: &HashMap<Option<IpAddr>, usize>, key: &Option<IpAddr>| map.get(key).copied().unwrap_or(0);
        if held(&self.by_address, &holder.address) >= self.budget.per_address {
            Some(Over::Address)
        } else if held(&self.by_network, &holder.network) >= self.budget.per_network {
            Some(Over::Network)
        } else if holder
            .party
            .as_ref()
            .is_some_and(|p| self.by_party.get(p).copied().unwrap_or(0) >= self.budget.per_party)
        {
            Some(Over::Party)
        } else if self.takes_a_place(holder) && self.in_table >= self.budget.total {
            Some(Over::Total)
        } else {
            None
        }
    }

    /// Counts one entry of `holder`; the caller checked [`Self::over`] first.
    pub fn add(&mut self, holder: &Holder<P>) {
        if self.takes_a_place(holder) {
            self.in_table += 1;
        }
        *self.by_address.entry(holder.address).or_default() += 1;
        *self.by_network.entry(holder.network).or_default() += 1;
        if let Some(p) = &holder.party {
            *self.by_party.entry(p.clone()).or_default() += 1;
        }
        self.total += 1;
    }

    /// Gives back one entry of `holder`.
    pub fn remove(&mut self, holder: &Holder<P>) {
        fn down<K: Eq + Hash>(map: &mut HashMap<K, usize>, key: &K) {
            if let Some(n) = map.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
        // The entries of a party are alike: the one that goes frees a table place if the party held more than its reserve.
        if holder.party.as_ref().is_none_or(|p| self.held_by(p) > self.budget.reserved_per_party) {
            self.in_table = self.in_table.saturating_sub(1);
        }
        down(&mut self.by_address, &holder.address);
        down(&mut self.by_network, &holder.network);
        if let Some(p) = &holder.party {
            down(&mut self.by_party, p);
        }
        self.total = self.total.saturating_sub(1);
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// The entries that take a place in the table.
    pub fn in_table(&self) -> usize {
        self.in_table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget { per_address: 2, per_network: 4, per_party: 6, reserved_per_party: 0, total: 8 };

    fn at(s: &str, party: Option<u8>) -> Holder<u8> {
        Holder::new(Some(s.parse().unwrap()), party)
    }

    #[test]
    fn each_level_holds_its_share_and_gives_it_back() {
        let mut h = Holdings::new(BUDGET);
        let host = at("2001:db8:1:1::1", None);
        h.add(&host);
        h.add(&at("2001:db8:1:1::ffff", None));
        assert_eq!(h.over(&host), Some(Over::Address), "the /64 is one address");
        // Other /64s of the same /48 share the network's budget.
        let neighbour = at("2001:db8:1:2::1", None);
        h.add(&neighbour);
        h.add(&neighbour);
        assert_eq!(h.over(&at("2001:db8:1:3::1", None)), Some(Over::Network));
        assert_eq!(h.over(&at("2001:db8:2::1", None)), None, "another /48 has room");
        h.remove(&neighbour);
        assert_eq!(h.over(&at("2001:db8:1:3::1", None)), None);
        // IPv4 by /24.
        h.add(&at("192.0.2.1", None));
        h.add(&at("192.0.2.2", None));
        h.add(&at("192.0.2.3", None));
        h.add(&at("192.0.2.4", None));
        assert_eq!(h.over(&at("192.0.2.200", None)), Some(Over::Network));
        assert_eq!(h.over(&at("::ffff:192.0.2.9", None)), Some(Over::Network), "mapped IPv4 is IPv4");
        assert_eq!(h.total(), 7);
        h.add(&at("198.51.100.1", None));
        assert_eq!(h.over(&at("203.0.113.1", None)), Some(Over::Total));
    }

    #[test]
    fn a_party_holds_only_its_share() {
        let mut h = Holdings::new(Budget { total: 100, ..BUDGET });
        for i in 0..6 {
            h.add(&at(&format!("2001:db8:{i}::1"), Some(1)));
        }
        assert_eq!(h.over(&at("203.0.113.1", Some(1))), Some(Over::Party));
        assert_eq!(h.over(&at("203.0.113.1", Some(2))), None, "another party has room");
        assert_eq!(h.over(&at("203.0.113.1", None)), None);
    }

    #[test]
    fn a_partys_reserve_takes_no_place_in_the_table_and_leaves_it_with_its_last_entries() {
        let mut h = Holdings::new(Budget { reserved_per_party: 2, total: 3, ..BUDGET });
        // Party 1 holds its reserve and the whole table.
        let flood: Vec<_> = (0..5).map(|i| at(&format!("10.0.{i}.1"), Some(1))).collect();
        for holder in &flood {
            assert_eq!(h.over(holder), None);
            h.add(holder);
        }
        assert_eq!((h.total(), h.in_table()), (5, 3));
        assert_eq!(h.over(&at("10.9.0.1", Some(1))), Some(Over::Total));
        assert_eq!(h.over(&at("10.9.0.1", None)), Some(Over::Total), "no party, no reserve");
        // Party 2, which nobody flooded, holds its reserve and no more.
        let two = at("203.0.113.1", Some(2));
        assert_eq!(h.over(&two), None);
        h.add(&two);
        h.add(&at("203.0.113.2", Some(2)));
        assert_eq!(h.over(&at("203.0.113.3", Some(2))), Some(Over::Total));
        assert_eq!(h.in_table(), 3);
        // Party 1's entries leave the table first, then its reserve; the table counts right throughout.
        for (left, holder) in flood.iter().enumerate() {
            h.remove(holder);
            assert_eq!(h.in_table(), 2usize.saturating_sub(left), "after {} left", left + 1);
        }
        assert_eq!(h.over(&at("203.0.113.3", Some(2))), None);
    }
}
