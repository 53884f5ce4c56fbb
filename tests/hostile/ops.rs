//! Hostile input: ops.
