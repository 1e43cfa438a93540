//! What the coordinator and the worker daemon share for being watched: [`logging`] (JSON lines
//! for services, readable text on a terminal) and [`metrics_http`] (the Prometheus `/metrics`
//! endpoint), and [`host`] (what the machine is, for benchmark reports).

pub mod host;
pub mod logging;
pub mod metrics_http;
