//! Loader benchmark (placeholder until the data pipeline lands): prints nothing yet.
fn main() {}
