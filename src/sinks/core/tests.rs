//! Tests of the state machine and its parts, driven the way the forwarder
//! drives them: a plan against a fake upstream, the linger rule, and a
//! simulated journal and upstream answering from a script.

use super::*;
use crate::event::Class;

fn ev(seq: u64) -> StoredEvent {
    StoredEvent {
        seq,
        source: "mes".into(),
        id: format!("e{seq}"),
        stream: "s".into(),
        stream_seq: seq,
        class: Class::Critical,
        event_type: "t".into(),
        source_time: None,
        recv_time_us: 0,
        data: b"null".to_vec(),
        attrs: None,
    }
}

/// Drives a plan against a fake upstream that rejects `poison` seqs,
/// naming them or not. Returns (sent-and-acked seqs in order, dead seqs).
fn drive(n: u64, poison: &[u64], names_it: bool) -> (Vec<u64>, Vec<u64>, usize) {
    let mut plan = Plan::new((1..=n).map(ev).collect());
    let (mut acked, mut dead, mut requests) = (Vec::new(), Vec::new(), 0);
    loop {
        match plan.next() {
            Step::Done => break,
            Step::DeadLetter(i) => {
                dead.push(plan.events()[i].seq);
                plan.done();
            }
            Step::Send(a, b) => {
                requests += 1;
                let slice = &plan.events()[a..b];
                match slice.iter().position(|e| poison.contains(&e.seq)) {
                    None => {
                        acked.extend(slice.iter().map(|e| e.seq));
                        plan.done();
                    }
                    Some(i) => plan.rejected(names_it.then_some(i)),
                }
            }
        }
    }
    (acked, dead, requests)
}

#[test]
fn bisection_isolates_every_poison_event_and_keeps_the_rest_in_order() {
    let (acked, dead, requests) = drive(1000, &[17, 500, 999], false);
    assert_eq!(dead, vec![17, 500, 999]);
    let expected: Vec<u64> = (1..=1000).filter(|s| ![17, 500, 999].contains(s)).collect();
    assert_eq!(acked, expected);
    assert!(
        requests < 100,
        "bisection, not one request per event: {requests}"
    );
}

#[test]
fn a_named_poison_event_is_dead_lettered_without_bisection() {
    let (acked, dead, requests) = drive(100, &[40], true);
    assert_eq!(dead, vec![40]);
    assert_eq!(acked.len(), 99);
    assert!(acked.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(requests, 3, "whole batch, the part before, the part after");
}

#[test]
fn a_named_index_out_of_range_falls_back_to_bisection() {
    let mut plan = Plan::new((1..=4).map(ev).collect());
    plan.rejected(Some(99));
    assert_eq!(plan.next(), Step::Send(0, 2));
}

fn lingering(linger_ms: u64) -> ForwarderSettings {
    ForwarderSettings {
        name: "central".into(),
        batch_max_events: 1000,
        batch_max_bytes: 4 << 20,
        max_events_per_sec: 0,
        batch_linger: Duration::from_millis(linger_ms),
        retry: RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        },
        lanes: vec![None],
        streams: crate::route::StreamFilter::all(),
    }
}

#[test]
fn a_small_young_batch_waits_until_its_oldest_event_is_linger_old() {
    let s = lingering(250);
    let now = 10_000_000;
    assert_eq!(
        linger(10, 2_000, now - 50_000, now, &s),
        Some(Duration::from_millis(200))
    );
    assert_eq!(
        linger(1, 200, now, now, &s),
        Some(Duration::from_millis(250))
    );
}

#[test]
fn a_full_batch_or_one_already_late_goes_out_at_once() {
    let s = lingering(250);
    let now = 10_000_000;
    assert_eq!(linger(1000, 200_000, now, now, &s), None, "full by count");
    assert_eq!(
        linger(10, 2 << 20, now, now, &s),
        None,
        "half of batch_max_bytes"
    );
    assert_eq!(
        linger(10, 2_000, now - 250_000, now, &s),
        None,
        "oldest is linger old"
    );
    assert_eq!(
        linger(10, 2_000, now - 3_600_000_000, now, &s),
        None,
        "a backlog after an outage"
    );
    assert_eq!(
        linger(1, 200, now, now, &lingering(0)),
        None,
        "batch_linger = 0"
    );
}

#[test]
fn a_clock_stepping_back_never_stretches_the_linger() {
    let s = lingering(250);
    let now = 10_000_000;
    assert_eq!(
        linger(1, 200, now + 60_000_000, now, &s),
        Some(Duration::from_millis(250))
    );
}

/// A journal of `n` events (seqs 1..=n) and an upstream answering from
/// a script, driven through [`Core`] the way the forwarder drives it.
/// Returns what the upstream kept, in order, the dead-lettered seqs and
/// the number of sends.
struct Sim {
    events: Vec<StoredEvent>,
    core: Core,
    upstream: Vec<u64>,
    dead: Vec<u64>,
    sends: usize,
    sleeps: Vec<Duration>,
}

fn settings(max: usize) -> ForwarderSettings {
    ForwarderSettings {
        batch_linger: Duration::ZERO,
        batch_max_events: max,
        ..lingering(0)
    }
}

impl Sim {
    fn new(n: u64, max: usize) -> Sim {
        Sim {
            events: (1..=n).map(ev).collect(),
            core: Core::new(settings(max), 0, Instant::now()),
            upstream: Vec::new(),
            dead: Vec::new(),
            sends: 0,
            sleeps: Vec::new(),
        }
    }

    fn now(&self) -> Now {
        Now {
            at: Instant::now(),
            unix_us: 0,
            evictions: 0,
        }
    }

    /// Runs until the core waits for commits; `answer` maps the batch
    /// sent to the upstream's answer (and records what it kept).
    fn run(&mut self, mut answer: impl FnMut(&[StoredEvent]) -> SendOutcome) {
        for _ in 0..100_000 {
            let now = self.now();
            match self.core.next(&now) {
                Action::Read { after } => {
                    let max = self.core.settings.batch_max_events;
                    let batch: Vec<StoredEvent> = self
                        .events
                        .iter()
                        .filter(|e| e.seq > after)
                        .take(max)
                        .cloned()
                        .collect();
                    self.core.on_read(batch, 0, false);
                }
                Action::WaitForCommit => return,
                Action::Linger { .. } => self.core.flush(),
                Action::Sleep(d) => self.sleeps.push(d),
                Action::Send { range } => {
                    self.sends += 1;
                    let slice = self.core.events()[range].to_vec();
                    let outcome = answer(&slice);
                    let kept = match &outcome {
                        SendOutcome::Ack => slice.len(),
                        SendOutcome::Retry { acked, .. } | SendOutcome::Reject { acked, .. } => {
                            *acked
                        }
                    };
                    self.upstream.extend(slice.iter().take(kept).map(|e| e.seq));
                    self.core.on_sent(outcome, 1.0);
                }
                Action::DeadLetter { index, .. } => {
                    self.dead.push(self.core.events()[index].seq);
                    self.core.on_dead_lettered(true);
                }
                Action::Advance { from, to, .. } => {
                    assert_eq!(from, self.core.cursor());
                    assert!(to > from, "a cursor only moves forward: {from} -> {to}");
                    self.core.on_advanced(Ok(Some(to)));
                }
            }
        }
        panic!("the core did not settle");
    }
}

#[test]
fn acked_batches_move_the_cursor_batch_by_batch() {
    let mut sim = Sim::new(250, 100);
    sim.run(|_| SendOutcome::Ack);
    assert_eq!(sim.upstream, (1..=250).collect::<Vec<_>>());
    assert_eq!(sim.sends, 3);
    assert_eq!(sim.core.cursor(), 250);
}

#[test]
fn a_partial_ack_keeps_the_prefix_and_resends_only_the_rest_after_a_pause() {
    let mut sim = Sim::new(100, 100);
    let mut first = true;
    sim.run(|batch| {
        if std::mem::take(&mut first) {
            assert_eq!(batch.len(), 100);
            SendOutcome::Retry {
                acked: 40,
                after: Some(Duration::from_secs(2)),
                reason: "publish timed out".into(),
            }
        } else {
            assert_eq!(batch[0].seq, 41, "resent from the first unacknowledged");
            SendOutcome::Ack
        }
    });
    assert_eq!(sim.upstream, (1..=100).collect::<Vec<_>>());
    assert_eq!(sim.sleeps, vec![Duration::from_secs(2)]);
    assert_eq!(sim.core.cursor(), 100);
    assert_eq!(sim.core.failures(), 0, "success resets the backoff");
}

#[test]
fn a_partial_ack_then_a_named_rejection_dead_letters_only_that_event() {
    let mut sim = Sim::new(50, 50);
    sim.run(|batch| match batch.iter().position(|e| e.seq == 30) {
        Some(i) => SendOutcome::Reject {
            acked: i,
            index: Some(i),
            reason: "bad quantity".into(),
        },
        None => SendOutcome::Ack,
    });
    assert_eq!(sim.dead, vec![30]);
    let expected: Vec<u64> = (1..=50).filter(|s| *s != 30).collect();
    assert_eq!(sim.upstream, expected);
    assert_eq!(
        sim.sends, 2,
        "the batch, then what followed the poison event"
    );
}

#[test]
fn a_partial_ack_then_an_unnamed_rejection_bisects_the_rest() {
    let mut sim = Sim::new(64, 64);
    sim.run(|batch| {
        if let Some(i) = batch.iter().position(|e| e.seq == 60) {
            // Everything before the poison event goes through.
            SendOutcome::Reject {
                acked: i.min(8),
                index: None,
                reason: "refused".into(),
            }
        } else {
            SendOutcome::Ack
        }
    });
    assert_eq!(sim.dead, vec![60]);
    let expected: Vec<u64> = (1..=64).filter(|s| *s != 60).collect();
    assert_eq!(sim.upstream, expected);
}

#[test]
fn an_acked_count_beyond_the_batch_or_a_rejection_of_nothing_left_is_an_ack() {
    let mut sim = Sim::new(10, 10);
    sim.run(|b| SendOutcome::Retry {
        acked: b.len() + 5,
        after: None,
        reason: "odd".into(),
    });
    assert_eq!(sim.upstream, (1..=10).collect::<Vec<_>>());
    assert!(sim.sleeps.is_empty());
}

#[test]
fn a_plain_retry_keeps_the_cursor_and_reads_the_batch_again() {
    let mut sim = Sim::new(10, 10);
    let mut n = 0;
    sim.run(|_| {
        n += 1;
        if n < 4 {
            SendOutcome::retry(None, "503")
        } else {
            SendOutcome::Ack
        }
    });
    assert_eq!(sim.upstream, (1..=10).collect::<Vec<_>>());
    assert_eq!(sim.sleeps.len(), 3);
    assert!(
        sim.sleeps.windows(2).all(|w| w[0] < w[1]),
        "backoff grows: {:?}",
        sim.sleeps
    );
}

#[test]
fn an_eviction_after_the_read_sends_nothing_of_the_stale_batch() {
    let mut core = Core::new(settings(10), 0, Instant::now());
    let now = |evictions| Now {
        at: Instant::now(),
        unix_us: 0,
        evictions,
    };
    assert_eq!(core.next(&now(0)), Action::Read { after: 0 });
    core.on_read((1..=5).map(ev).collect(), 0, false);
    assert_eq!(core.next(&now(1)), Action::Read { after: 0 });
}

#[test]
fn a_cursor_short_of_the_batch_end_after_an_ack_reads_again() {
    // The journal placed gap events in the range: it moved the cursor
    // only to before them.
    let mut core = Core::new(settings(10), 0, Instant::now());
    let now = Now {
        at: Instant::now(),
        unix_us: 0,
        evictions: 0,
    };
    core.next(&now);
    core.on_read((1..=5).map(ev).collect(), 0, false);
    assert_eq!(core.next(&now), Action::Send { range: 0..5 });
    core.on_sent(SendOutcome::Ack, 0.5);
    assert_eq!(
        core.next(&now),
        Action::Advance {
            from: 0,
            to: 5,
            evictions_at_read: 0
        }
    );
    core.on_advanced(Ok(Some(3)));
    assert_eq!(core.next(&now), Action::Read { after: 3 });
}

#[test]
fn a_journal_that_cannot_store_the_cursor_pauses_and_resends() {
    let mut core = Core::new(settings(10), 0, Instant::now());
    let now = Now {
        at: Instant::now(),
        unix_us: 0,
        evictions: 0,
    };
    core.next(&now);
    core.on_read((1..=5).map(ev).collect(), 0, false);
    core.next(&now);
    core.on_sent(SendOutcome::Ack, 0.5);
    core.next(&now);
    let err = JournalError::Sqlite {
        path: "/tmp/j.db".into(),
        detail: "disk full".into(),
    };
    assert_eq!(core.on_advanced(Err(&err)), Advanced::Failed);
    assert_eq!(core.next(&now), Action::Sleep(JOURNAL_RETRY));
    assert_eq!(core.next(&now), Action::Read { after: 0 });
}

#[test]
fn a_small_young_batch_lingers_and_a_rewind_drops_what_is_in_hand() {
    let mut core = Core::new(lingering(250), 0, Instant::now());
    let now = Now {
        at: Instant::now(),
        unix_us: 1_000_000,
        evictions: 0,
    };
    core.next(&now);
    let mut events: Vec<StoredEvent> = (1..=3).map(ev).collect();
    for e in &mut events {
        e.recv_time_us = 1_000_000;
    }
    core.on_read(events, 0, false);
    assert_eq!(
        core.next(&now),
        Action::Linger {
            wait: Duration::from_millis(250),
            fill_at: 3 + 997
        }
    );
    core.on_rewind(0);
    assert_eq!(core.next(&now), Action::Read { after: 0 });
}

#[test]
fn an_empty_read_waits_for_a_commit_unless_it_was_read_ahead() {
    let mut core = Core::new(settings(10), 7, Instant::now());
    let now = Now {
        at: Instant::now(),
        unix_us: 0,
        evictions: 0,
    };
    core.next(&now);
    core.on_read(Vec::new(), 0, true);
    assert_eq!(core.next(&now), Action::Read { after: 7 });
    core.on_read(Vec::new(), 0, false);
    assert_eq!(core.next(&now), Action::WaitForCommit);
    core.on_woken();
    assert_eq!(core.next(&now), Action::Read { after: 7 });
}

#[test]
fn the_rate_limiter_shortens_a_batch_before_it_is_sent() {
    let mut s = settings(100);
    s.max_events_per_sec = 10;
    let mut core = Core::new(s, 0, Instant::now());
    let now = Now {
        at: Instant::now(),
        unix_us: 0,
        evictions: 0,
    };
    core.next(&now);
    core.on_read((1..=100).map(ev).collect(), 0, false);
    assert_eq!(core.next(&now), Action::Send { range: 0..10 });
    core.on_sent(SendOutcome::Ack, 0.5);
    assert!(matches!(core.next(&now), Action::Advance { to: 10, .. }));
    core.on_advanced(Ok(Some(10)));
    assert_eq!(core.next(&now), Action::Read { after: 10 });
    core.on_read((11..=100).map(ev).collect(), 0, false);
    assert!(matches!(core.next(&now), Action::Sleep(_)), "bucket empty");
}

/// A sink with stream filters: what its reads pass over must move its
/// cursor, or retention could never delete those rows.
fn filtered(max: usize) -> ForwarderSettings {
    let mut s = settings(max);
    s.streams = crate::route::StreamFilter::new(&["mes/#"]);
    s
}

#[test]
fn rows_passed_over_move_the_cursor_only_in_bulk_or_now_and_then() {
    let t0 = Instant::now();
    let mut core = Core::new(filtered(100), 0, t0);
    let now = Now {
        at: t0,
        unix_us: 0,
        evictions: 0,
    };
    assert_eq!(core.next(&now), Action::Read { after: 0 });
    // A read that passed over 20,000 rows of other streams.
    core.on_read_routed(Vec::new(), 20_000, true, 0, false, t0);
    assert_eq!(
        core.next(&now),
        Action::Advance {
            from: 0,
            to: 20_000,
            evictions_at_read: 0
        }
    );
    core.on_advanced(Ok(Some(20_000)));
    assert_eq!(core.next(&now), Action::Read { after: 20_000 });
    // A few more, just after: no cursor write, but the next read starts
    // after them.
    core.on_read_routed(Vec::new(), 20_100, false, 0, false, t0);
    assert_eq!(core.next(&now), Action::WaitForCommit);
    core.on_woken();
    assert_eq!(core.next(&now), Action::Read { after: 20_100 });
    // Later, the few move it too.
    let later = t0 + SKIP_ADVANCE_EVERY;
    core.on_read_routed(Vec::new(), 20_200, false, 0, false, later);
    assert!(matches!(
        core.next(&now),
        Action::Advance { to: 20_200, .. }
    ));
}

#[test]
fn a_delivered_batch_moves_the_cursor_over_the_rows_its_read_passed_over() {
    let t0 = Instant::now();
    let mut core = Core::new(filtered(100), 0, t0);
    let now = Now {
        at: t0,
        unix_us: 0,
        evictions: 0,
    };
    core.next(&now);
    core.on_read_routed(vec![ev(7), ev(9)], 500, false, 0, false, t0);
    assert_eq!(core.after_batch(), Some(500));
    assert_eq!(core.next(&now), Action::Send { range: 0..2 });
    core.on_sent(SendOutcome::Ack, 0.5);
    assert!(matches!(core.next(&now), Action::Advance { to: 500, .. }));
}

/// A lane of an unfiltered sink passes over the other class's rows: its
/// next read starts past them, but no cursor write is spent on them and a
/// delivery moves its cursor to its own last event only.
#[test]
fn a_lane_reads_on_past_the_other_class_without_moving_its_cursor_over_it() {
    let t0 = Instant::now();
    let mut core = Core::new(settings(100), 0, t0);
    let now = Now {
        at: t0,
        unix_us: 0,
        evictions: 0,
    };
    assert_eq!(core.next(&now), Action::Read { after: 0 });
    core.on_read_routed(Vec::new(), 20_000, false, 0, false, t0);
    assert_eq!(core.next(&now), Action::WaitForCommit, "no cursor write");
    core.on_woken();
    assert_eq!(core.next(&now), Action::Read { after: 20_000 });
    let later = t0 + SKIP_ADVANCE_EVERY;
    core.on_read_routed(Vec::new(), 20_200, false, 0, false, later);
    assert_eq!(core.next(&now), Action::WaitForCommit, "not later either");
    core.on_woken();
    assert_eq!(core.next(&now), Action::Read { after: 20_200 });
    core.on_read_routed(vec![ev(20_301), ev(20_305)], 20_400, false, 0, false, later);
    assert_eq!(core.next(&now), Action::Send { range: 0..2 });
    core.on_sent(SendOutcome::Ack, 0.5);
    assert!(matches!(
        core.next(&now),
        Action::Advance { to: 20_305, .. }
    ));
}
