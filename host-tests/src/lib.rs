//! Test support: real Redis, real Envoy, the real filter.
