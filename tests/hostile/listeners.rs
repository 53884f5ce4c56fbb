//! Hostile input: listeners.
