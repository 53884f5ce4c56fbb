//! Hostile input: sparkplug.
