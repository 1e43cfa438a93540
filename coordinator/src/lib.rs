//! The segtrain coordinator: the job API, the PostgreSQL store and the state machines.
//!
//! Data flow: a gRPC request enters [`api`], which validates it and calls [`store`]; the store
//! checks every state change against [`state`] and writes it with its event in one transaction.
//! [`scheduler`] places queued jobs onto idle workers (gang, all or none) and reaps expired leases.
//! [`auth`] checks every request's bearer token and role before it reaches [`api`]; [`certs`]
//! makes a private CA and certificates for TLS; [`limits`] bounds what one client may hold
//! (streams, WatchJobs per token, handshakes, request bodies).
//! [`teams`] decides per-team limits (priority, GPUs held) from the rows the store reads.
//! [`metrics`] exports Prometheus metrics on `/metrics` (`--metrics-listen`); [`retention`] is
//! `segtrain-coordinator prune`.

pub mod api;
pub mod auth;
pub mod certs;
pub mod events;
pub mod limits;
pub mod metrics;
pub mod retention;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod store;
pub mod teams;
pub mod web;
