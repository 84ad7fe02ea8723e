//! The scenarios, one module per kind of measurement.

pub(crate) mod catch_up;
pub(crate) mod cluster;
pub(crate) mod console;
pub(crate) mod fan_out;
pub(crate) mod ingest;
pub(crate) mod lookup;
