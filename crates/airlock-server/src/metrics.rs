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
        Self { registry, http_responses, appliances_connected, heartbeats, joins, renewals, handshake_failures, audit }
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
