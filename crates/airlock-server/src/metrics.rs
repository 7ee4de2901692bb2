//! Prometheus metrics served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// A connection a listener shed or closed, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `api` or `gateway`.
    pub listener: &'static str,
    pub reason: &'static str,
}

/// What the listeners shed ([`crate::net`]); `/readyz` answers 503 while they are shedding.
#[derive(Clone, Debug)]
pub struct ConnectionMetrics {
    /// Connections refused or evicted for room, by [`crate::net::Shed`] reason (`airlock_shed_connections_total`).
    pub shed: Family<ConnectionLabels, Counter>,
    /// Connections the server closed: at a deadline (handshake, ClientHello, idle, request, stream open), or displaced by their certificate's newer one (`airlock_closed_connections_total`).
    pub closed: Family<ConnectionLabels, Counter>,
    epoch: tokio::time::Instant,
    /// Milliseconds since `epoch` at the last connection shed because a pool was full, plus one (0: never).
    last_shed_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Default for ConnectionMetrics {
    fn default() -> Self {
        Self {
            shed: Family::default(),
            closed: Family::default(),
            epoch: tokio::time::Instant::now(),
            last_shed_ms: Default::default(),
        }
    }
}

impl ConnectionMetrics {
    /// Counts a connection refused or evicted for room; only a full pool ([`crate::net::Shed::pool_pressure`])
    /// counts as shedding for `/readyz`, not an address displacing or refused its own connections.
    pub fn shed(&self, listener: &'static str, shed: crate::net::Shed) {
        self.shed.get_or_create(&ConnectionLabels { listener, reason: shed.label() }).inc();
        if !shed.pool_pressure() {
            return;
        }
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        self.last_shed_ms.store(now, std::sync::atomic::Ordering::Release);
    }

    /// Counts a connection the server closed: at one of its deadlines, or displaced (housekeeping, not shedding).
    pub fn closed(&self, listener: &'static str, reason: &'static str) {
        self.closed.get_or_create(&ConnectionLabels { listener, reason }).inc();
    }

    /// Whether a connection was shed because a pool was full within the last `window`.
    pub fn shedding_within(&self, window: std::time::Duration) -> bool {
        match self.last_shed_ms.load(std::sync::atomic::Ordering::Acquire) {
            0 => false,
            at => {
                let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
                now.saturating_sub(at) < u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
            }
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub http_responses: Family<HttpLabels, Counter>,
    pub appliances_connected: Gauge,
    pub heartbeats: Counter,
    pub joins: Counter,
    pub renewals: Counter,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub audit: AuditMetrics,
    pub connections: ConnectionMetrics,
}

/// The group-committed audit writer's counters (`store::AuditWriter`).
#[derive(Clone, Debug, Default)]
pub struct AuditMetrics {
    /// Batches committed (one fsync each).
    pub commits: Counter,
    /// Records committed through the writer.
    pub records: Counter,
    /// Routine read records that were queued but never written (their batch failed, or the writer had stopped).
    pub queued_records_lost: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("airlock");
        let http_responses = Family::<HttpLabels, Counter>::default();
        let appliances_connected = Gauge::default();
        let heartbeats = Counter::default();
        let joins = Counter::default();
        let renewals = Counter::default();
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register("http_responses", "API responses by status code", http_responses.clone());
        registry.register(
            "gateway_appliances_connected",
            "Appliances with a live stream",
            appliances_connected.clone(),
        );
        registry.register("gateway_heartbeats", "Heartbeats received", heartbeats.clone());
        registry.register("appliance_joins", "Successful appliance joins", joins.clone());
        registry.register("appliance_renewals", "Appliance certificates renewed", renewals.clone());
        registry.register("gateway_handshake_failures", "Refused gateway TLS handshakes", handshake_failures.clone());
        let audit = AuditMetrics::default();
        registry.register("audit_commits", "Group-committed audit batches", audit.commits.clone());
        registry.register("audit_records", "Audit records committed by the group-commit writer", audit.records.clone());
        registry.register(
            "audit_queued_records_lost",
            "Queued read audit records that could not be written",
            audit.queued_records_lost.clone(),
        );
        let connections = ConnectionMetrics::default();
        registry.register(
            "shed_connections",
            "Connections refused or evicted for room: pool_full and evicted when a pool was full, address_full and address_evicted when one address was at its cap",
            connections.shed.clone(),
        );
        registry.register(
            "closed_connections",
            "Connections the server closed: at a deadline (handshake, ClientHello, idle, request, stream open) or displaced by a newer one of the same certificate",
            connections.closed.clone(),
        );
        Self {
            registry,
            http_responses,
            appliances_connected,
            heartbeats,
            joins,
            renewals,
            handshake_failures,
            audit,
            connections,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
