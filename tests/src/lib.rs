//! Test support for segtrain's end-to-end tests and the `make demo` script.
//!
//! The coordinator keeps its state in PostgreSQL, and the end-to-end tests run
//! it against a real server rather than a mock: [`pg::TempPostgres`] starts a
//! throwaway cluster in a temporary directory and removes it again on drop.
//! [`coordinator::CoordinatorProcess`] runs the real `segtrain-coordinator`
//! binary against it, so tests can kill and restart it; [`service::Service`] is the two with a
//! store connection. [`metrics`] scrapes and checks Prometheus `/metrics` pages; [`sql`] reads the tables for
//! assertions.

pub mod binaries;
pub mod cluster;
pub mod coordinator;
pub mod daemon;
pub mod dataset;
pub mod gcs;
pub mod metrics;
pub mod pg;
pub mod service;
pub mod sql;
pub mod wait;
