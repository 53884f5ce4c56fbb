//! A scripted in-process sink, and the scenarios only it can play: partial
//! acknowledgements (message-by-message upstreams), a sink that panics, a
//! connection that fails before it works, and encoding kept off the async
//! workers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use plantrelay::event::{Class, StoredEvent};
use plantrelay::sinks::{ForwarderSettings, RetryPolicy, SendOutcome, Sink};

use crate::conformance::rig::{Reply, Rig, Upstream, check_complete};

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    kept: Mutex<Vec<u64>>,
    /// Sends whose encoding was not of exactly the events sent.
    mismatched: AtomicUsize,
    /// Encodings made on the thread that runs the async tasks.
    encoded_inline: AtomicUsize,
    /// How many connects fail before one works.
    connect_failures: AtomicUsize,
    connects: AtomicUsize,
    closes: AtomicUsize,
    /// The first seq of every send, in order.
    sends: Mutex<Vec<(u64, usize)>>,
}

pub struct FakeUpstream {
    shared: Arc<Shared>,
    /// The test's runtime thread (the tests run on a current-thread
    /// runtime): encoding must happen elsewhere.
    async_thread: ThreadId,
}

pub struct FakeSink {
    shared: Arc<Shared>,
    async_thread: ThreadId,
}

const TIMEOUT: Duration = Duration::from_secs(5);

impl FakeUpstream {
    pub fn new() -> FakeUpstream {
        FakeUpstream {
            shared: Arc::default(),
            async_thread: std::thread::current().id(),
        }
    }

    fn sends(&self) -> Vec<(u64, usize)> {
        self.shared.sends.lock().unwrap().clone()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        assert_eq!(
            self.shared.mismatched.load(Ordering::Relaxed),
            0,
            "a send carried the encoding of other events"
        );
        assert_eq!(
            self.shared.encoded_inline.load(Ordering::Relaxed),
            0,
            "a batch was encoded on the async runtime's thread"
        );
    }
}

impl Upstream for FakeUpstream {
    type S = FakeSink;

    fn script(&self, replies: Vec<Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    fn sink(&self) -> FakeSink {
        FakeSink {
            shared: self.shared.clone(),
            async_thread: self.async_thread,
        }
    }

    fn settings(&self, batch_max_events: usize) -> ForwarderSettings {
        ForwarderSettings {
            name: crate::conformance::rig::SINK.into(),
            batch_max_events,
            batch_max_bytes: 4 << 20,
            max_events_per_sec: 0,
            batch_linger: Duration::ZERO,
            retry: RetryPolicy {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
            lanes: vec![None],
            streams: plantrelay::route::StreamFilter::all(),
        }
    }

    fn received(&self) -> Vec<u64> {
        self.shared.kept.lock().unwrap().clone()
    }

    fn timeout(&self) -> Duration {
        TIMEOUT
    }
}

impl Sink for FakeSink {
    /// The seqs encoded.
    type Encoded = Vec<u64>;

    fn encode(&self, batch: &[StoredEvent]) -> Vec<u64> {
        if std::thread::current().id() == self.async_thread {
            self.shared.encoded_inline.fetch_add(1, Ordering::Relaxed);
        }
        batch.iter().map(|e| e.seq).collect()
    }

    async fn send(&self, batch: &[StoredEvent], encoded: Vec<u64>) -> SendOutcome {
        let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
        if seqs != encoded {
            self.shared.mismatched.fetch_add(1, Ordering::Relaxed);
        }
        self.shared
            .sends
            .lock()
            .unwrap()
            .push((seqs[0], seqs.len()));
        let reply = self
            .shared
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Reply::Ack);
        let keep = |n: usize| self.shared.kept.lock().unwrap().extend(&seqs[..n]);
        match reply {
            Reply::Ack => {
                keep(seqs.len());
                SendOutcome::Ack
            }
            Reply::Partial(n) => {
                let n = n.min(seqs.len());
                keep(n);
                SendOutcome::Retry {
                    acked: n,
                    after: None,
                    reason: format!("{} of {} publishes acknowledged", n, seqs.len()),
                }
            }
            Reply::Retry(after) => SendOutcome::retry(after, "upstream busy"),
            Reply::Reject(index) => SendOutcome::reject(index, "refused by the script"),
            Reply::RejectAfter { acked, index } => {
                let acked = acked.min(seqs.len());
                keep(acked);
                SendOutcome::Reject {
                    acked,
                    index,
                    reason: "refused by the script after a prefix".into(),
                }
            }
            Reply::Timeout => {
                tokio::time::sleep(TIMEOUT).await;
                SendOutcome::retry(None, "timed out")
            }
            Reply::Slow(d) => {
                tokio::time::sleep(d).await;
                keep(seqs.len());
                SendOutcome::Ack
            }
            Reply::Panic => panic!("scripted panic in the sink"),
        }
    }

    async fn connect(&self) -> Result<(), String> {
        self.shared.connects.fetch_add(1, Ordering::Relaxed);
        let left = self.shared.connect_failures.load(Ordering::Relaxed);
        if left > 0 {
            self.shared
                .connect_failures
                .store(left - 1, Ordering::Relaxed);
            return Err("connection refused (scripted)".into());
        }
        Ok(())
    }

    async fn close(&self) {
        self.shared.closes.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(start_paused = true)]
async fn a_partial_ack_moves_the_cursor_over_the_prefix_and_resends_only_the_rest() {
    let up = FakeUpstream::new();
    let mut rig = Rig::new(100).await;
    up.script(vec![
        Reply::Partial(30),
        Reply::Partial(0),
        Reply::Partial(25),
    ]);
    rig.start(&up, 100);
    rig.until_drained().await;
    assert_eq!(check_complete(&up.received(), 100, &[]), 0);
    assert_eq!(
        up.sends(),
        vec![(1, 100), (31, 70), (31, 70), (56, 45)],
        "each resend starts at the first unacknowledged event"
    );
    assert!(rig.dead_letters().is_empty());
    assert_eq!(rig.status.progress().delivered, 100);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_partial_ack_then_a_named_rejection_dead_letters_only_that_event() {
    let up = FakeUpstream::new();
    let mut rig = Rig::new(50).await;
    // 1..=20 acknowledged, the 21st (index 20) refused for good.
    up.script(vec![Reply::RejectAfter {
        acked: 20,
        index: Some(20),
    }]);
    rig.start(&up, 50);
    rig.until_drained().await;
    assert_eq!(check_complete(&up.received(), 50, &[21]), 0);
    let dead = rig.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, 21);
    assert!(dead[0].1.contains("after a prefix"), "{}", dead[0].1);
    assert_eq!(up.sends(), vec![(1, 50), (22, 29)]);
    let p = rig.status.progress();
    assert_eq!((p.delivered, p.dead_letters), (49, 1));
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_sink_stops_its_forwarder_visibly_and_loses_nothing() {
    let up = FakeUpstream::new();
    let mut rig = Rig::new(200).await;
    up.script(vec![Reply::Ack, Reply::Panic]);
    rig.start(&up, 100);
    rig.join().await;
    let failures = rig.supervisor.failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].task, "forwarder of sink 'up'");
    assert!(
        failures[0].how.contains("scripted panic in the sink"),
        "{}",
        failures[0].how
    );
    assert_eq!(
        rig.cursor(),
        100,
        "the cursor stays before what was not acked"
    );
    // The agent restarts (systemd): a new forwarder goes on from the cursor.
    rig.start(&up, 100);
    rig.until_drained().await;
    assert_eq!(check_complete(&up.received(), 200, &[]), 0);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_cannot_connect_is_retried_and_closed_at_stop() {
    let up = FakeUpstream::new();
    up.shared.connect_failures.store(3, Ordering::Relaxed);
    let mut rig = Rig::new(10).await;
    rig.start(&up, 100);
    rig.until_drained().await;
    assert_eq!(up.shared.connects.load(Ordering::Relaxed), 4);
    assert!(
        rig.status
            .progress()
            .last_error
            .is_some_and(|(_, e)| e.contains("connection refused")),
    );
    rig.stop().await;
    assert_eq!(up.shared.closes.load(Ordering::Relaxed), 1);
    assert_eq!(check_complete(&up.received(), 10, &[]), 0);
}

#[tokio::test(start_paused = true)]
async fn parts_of_a_batch_are_encoded_anew_and_off_the_async_thread() {
    // Bisection sends parts; the upstream checks each part's encoding is of
    // exactly its events and was not made on the runtime thread (checked
    // when `up` is dropped).
    let up = FakeUpstream::new();
    let mut rig = Rig::new(64).await;
    up.script(vec![
        Reply::Reject(None),
        Reply::Reject(None),
        Reply::Reject(None),
    ]);
    rig.start(&up, 64);
    rig.until_drained().await;
    assert_eq!(
        up.sends().len(),
        3 + 4,
        "three splits, then four parts acked"
    );
    assert_eq!(rig.dead_letters().len(), 0);
    assert_eq!(check_complete(&up.received(), 64, &[]), 0);
    rig.stop().await;
}

fn lanes(up: &FakeUpstream, batch: usize) -> ForwarderSettings {
    ForwarderSettings {
        lanes: vec![Some(Class::Critical), Some(Class::Telemetry)],
        ..up.settings(batch)
    }
}

#[tokio::test(start_paused = true)]
async fn critical_first_sends_critical_ahead_of_a_telemetry_backlog_without_starving_it() {
    let up = FakeUpstream::new();
    // 2,000 telemetry events first, then 2,000 critical ones.
    let classes: Vec<Class> = (0..4000)
        .map(|i| {
            if i < 2000 {
                Class::Telemetry
            } else {
                Class::Critical
            }
        })
        .collect();
    let mut rig = Rig::with_classes(&classes).await;
    rig.start_with(&up, lanes(&up, 100));
    rig.until_drained().await;
    let got = up.received();
    assert_eq!(got.len(), 4000, "nothing lost, nothing twice");
    let critical = |s: &u64| *s > 2000;
    // Ten critical batches, then one telemetry batch (the rule that keeps
    // telemetry moving under a steady critical flow), then the rest of the
    // critical events, then the telemetry backlog.
    let shape: Vec<(bool, usize)> = got
        .chunk_by(|a, b| critical(a) == critical(b))
        .map(|run| (critical(&run[0]), run.len()))
        .collect();
    assert_eq!(
        shape,
        vec![(true, 1000), (false, 100), (true, 1000), (false, 1900)],
        "runs of (critical, length)"
    );
    // Within each class, journal order.
    for class in [true, false] {
        let seqs: Vec<u64> = got
            .iter()
            .copied()
            .filter(|s| critical(s) == class)
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "class order");
    }
    let c = rig.journal.reader().unwrap();
    assert_eq!(c.lane_cursor("up/critical").unwrap(), 4000);
    assert_eq!(c.lane_cursor("up/telemetry").unwrap(), 2000);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn journal_order_sends_everything_in_seq_order() {
    let up = FakeUpstream::new();
    let classes: Vec<Class> = (0..1000)
        .map(|i| {
            if i % 3 == 0 {
                Class::Critical
            } else {
                Class::Telemetry
            }
        })
        .collect();
    let mut rig = Rig::with_classes(&classes).await;
    rig.start(&up, 100);
    rig.until_drained().await;
    assert_eq!(check_complete(&up.received(), 1000, &[]), 0);
    assert_eq!(rig.cursor(), 1000);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_sink_taking_one_class_gets_exactly_that_class() {
    let up = FakeUpstream::new();
    let classes: Vec<Class> = (0..600)
        .map(|i| {
            if i % 2 == 0 {
                Class::Critical
            } else {
                Class::Telemetry
            }
        })
        .collect();
    let mut rig = Rig::with_classes(&classes).await;
    rig.start_with(
        &up,
        ForwarderSettings {
            lanes: vec![Some(Class::Telemetry)],
            ..up.settings(100)
        },
    );
    rig.until_drained().await;
    let expected: Vec<u64> = (1..=600).filter(|s| s % 2 == 0).collect();
    assert_eq!(
        up.received(),
        expected,
        "only telemetry (the even seqs), in order"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_sink_with_stream_filters_gets_exactly_those_streams_and_its_cursor_reaches_the_head() {
    let up = FakeUpstream::new();
    // Streams line/0 .. line/3 (seq mod 4).
    let mut rig = Rig::new(2000).await;
    rig.start_with(
        &up,
        ForwarderSettings {
            streams: plantrelay::route::StreamFilter::new(&["line/1", "nothing/#"]),
            ..up.settings(100)
        },
    );
    rig.until_drained().await;
    let expected: Vec<u64> = (1..=2000).filter(|s| s % 4 == 1).collect();
    assert_eq!(up.received(), expected);
    assert_eq!(
        rig.journal.reader().unwrap().lane_cursor("up").unwrap(),
        2000,
        "the cursor moved over what the sink does not take"
    );
    rig.stop().await;
}
