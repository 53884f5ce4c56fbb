//! Hostile input: ingest.
