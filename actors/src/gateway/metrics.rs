//! Every metric the gateway and its approvals broker record, named and described in one
//! place.
//!
//! Labels: `role` (of a session), `reason` (of a refusal), `code` (a close code),
//! `decision` (of an approval).

crate::supervision::metrics::declare! {
    /// Gauge: authenticated sessions, by `role`.
    gauge SESSIONS = "warden_gateway_sessions", "Authenticated gateway sessions.";
    /// Gauge: connections holding a pre-auth slot, from accept (or from the upgrade request
    /// for one authenticated by its `Authorization` header) to `hello-ok` or close.
    gauge HANDSHAKING = "warden_gateway_handshaking",
        "Gateway connections holding a pre-auth slot (not yet past hello-ok).";
    /// Counter: upgrades refused with 503 because an IP had too many handshaking sockets.
    counter PREAUTH_REJECTIONS_TOTAL = "warden_gateway_preauth_rejections_total",
        "Upgrades answered 503 because their address had too many handshaking connections.";
    /// Counter: connections answered 503 at accept because their address had
    /// `4 × max_preauth_per_ip` unauthenticated connections open.
    counter ADDRESS_CAP_REFUSALS_TOTAL = "warden_gateway_address_cap_refusals_total",
        "Connections answered 503 because their address had too many unauthenticated connections open.";
    /// Gauge: open connections to the listener, from accept to close (WebSockets included).
    gauge CONNECTIONS = "warden_gateway_connections", "Open connections to the gateway listener.";
    /// Counter: connections answered 503 because `max_connections` were open.
    counter CONNECTION_CAP_REFUSALS_TOTAL = "warden_gateway_connection_cap_refusals_total",
        "Connections answered 503 because gateway.max_connections were open.";
    /// Counter: upgrades refused before the WebSocket opened, by `reason` (`origin`: 403
    /// for an `Origin` not allowed; `unauthorized`: 401 for an unknown credential).
    counter UPGRADE_REFUSALS_TOTAL = "warden_gateway_upgrade_refusals_total",
        "WebSocket upgrades refused for their Origin or their credential.";
    /// Counter: sockets the server closed, by `code`.
    counter CLOSES_TOTAL = "warden_gateway_closes_total", "Gateway sockets the server closed.";
    /// Counter: sessions closed with 4000 after two ticks without a client frame.
    counter IDLE_CLOSES_TOTAL = "warden_gateway_idle_closes_total",
        "Gateway sessions closed after two ticks without a client frame.";
    /// Counter: sessions closed with 4001 because they fell behind the event stream.
    counter SLOW_CONSUMER_CLOSES_TOTAL = "warden_gateway_slow_consumer_closes_total",
        "Gateway sessions closed because they fell behind the event stream.";
    /// Counter: sockets closed with 4408 because the handshake took too long.
    counter HANDSHAKE_TIMEOUTS_TOTAL = "warden_gateway_handshake_timeouts_total",
        "Gateway sockets closed because the handshake took too long.";
    /// Counter: `connect` requests refused, by `reason` (`unauthorized`, `bad_request`).
    counter CONNECT_REFUSALS_TOTAL = "warden_gateway_connect_refusals_total",
        "Gateway connect requests refused.";
    /// Counter: approvals decided, by `decision` (`approved`, `denied`, `timeout`).
    counter APPROVALS_TOTAL = "warden_approvals_total", "Approvals decided.";
    /// Gauge: approvals waiting for a decision.
    gauge APPROVALS_PENDING = "warden_approvals_pending", "Approvals waiting for a decision.";
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_gateway_metric_is_declared_as_a_scraper_wants_and_described() {
        crate::supervision::metrics::check_declared(super::ALL);
        crate::supervision::metrics::tests::check_described(super::ALL, super::describe);
    }
}
