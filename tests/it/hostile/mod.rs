//! The hostile-input suite: what a client on the plant network or a
//! publisher on the plant broker can send the agent, tried as an attacker
//! would, with assertions on what must hold: the agent stays up, memory stays
//! under a stated bound, legitimate clients are served in time, and every
//! event acknowledged before and during the attack is delivered.
//!
//! One module per attack surface.

mod ingest;
mod listeners;
mod ops;
mod sparkplug;
