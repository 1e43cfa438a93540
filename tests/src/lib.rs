//! Test support for segtrain's end-to-end tests and the `make demo` script.
//!
//! The coordinator keeps its state in PostgreSQL, and the end-to-end tests run
//! it against a real server rather than a mock: [`pg::TempPostgres`] starts a
//! throwaway cluster in a temporary directory and removes it again on drop.

pub mod pg;
