//! A real journal with events in it, a forwarder on it, and waits for
//! conditions (never for fixed times).

use std::sync::Arc;
use std::time::Duration;

use plantrelay::event::{Class, NewEvent};
use plantrelay::journal::{Journal, JournalOptions, Reader, SyncMode};
use plantrelay::sinks::{Forwarder, ForwarderSettings, Sink};
use plantrelay::status::SinkStatus;
use plantrelay::supervise::{Supervised, Supervisor};
use tokio_util::sync::CancellationToken;

/// The sink's name in every scenario.
pub const SINK: &str = "up";

/// An upstream kind under test: makes sinks and says what its upstream
/// kept.
pub trait Upstream {
    type S: Sink;
    /// Queues answers for the next sends, one each; then it acks.
    fn script(&self, replies: Vec<Reply>);
    fn sink(&self) -> Self::S;
    fn settings(&self, batch_max_events: usize) -> ForwarderSettings;
    /// The seqs the upstream kept, in arrival order, duplicates included.
    fn received(&self) -> Vec<u64>;
    /// How long a send takes before the sink reports a timeout.
    fn timeout(&self) -> Duration;
}

/// One scripted answer of the upstream.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Ack,
    /// The first n events are taken, the rest is not (message-by-message
    /// upstreams only).
    Partial(usize),
    Retry(Option<Duration>),
    /// Refused for good, naming the event at this index or none.
    Reject(Option<usize>),
    /// The first `acked` events are taken, then the rest refused for good
    /// (message-by-message upstreams only).
    RejectAfter {
        acked: usize,
        index: Option<usize>,
    },
    /// No answer within the sink's timeout.
    Timeout,
    /// Acked after this long.
    Slow(Duration),
    Panic,
}

pub struct Rig {
    _dir: tempfile::TempDir,
    pub journal: Journal,
    pub status: Arc<SinkStatus>,
    pub supervisor: Arc<Supervisor>,
    stop: CancellationToken,
    task: Option<Supervised>,
    pub head: u64,
    /// The lanes of the forwarder last started.
    lanes: Vec<Option<Class>>,
}

impl Rig {
    /// A journal holding `n` critical events over 4 streams, ids `e-<i>`.
    pub async fn new(n: usize) -> Rig {
        Rig::with_classes(&vec![Class::Critical; n]).await
    }

    /// A journal holding one event per entry of `classes`, in that order,
    /// ids `e-<seq>`, streams `<class>/<seq mod 4>` (a stream has one class).
    pub async fn with_classes(classes: &[Class]) -> Rig {
        let n = classes.len();
        plantrelay::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let mut opts = JournalOptions::new(dir.path().join("journal.db"));
        opts.sinks = vec![SINK.to_string()];
        opts.sync = SyncMode::Normal;
        opts.commit_window = Duration::ZERO;
        let journal = Journal::open(opts).unwrap();
        let events: Vec<NewEvent> = (1..=n)
            .map(|i| NewEvent {
                source: "mes".into(),
                id: format!("e-{i}"),
                stream: match classes[i - 1] {
                    Class::Critical => format!("line/{}", i % 4),
                    Class::Telemetry => format!("machine/{}", i % 4),
                },
                class: classes[i - 1],
                event_type: "com.example.mes.confirmation".into(),
                source_time: None,
                data: format!("{{\"n\":{i}}}").into_bytes(),
                attrs: None,
            })
            .collect();
        for chunk in events.chunks(500) {
            journal.append(chunk.to_vec()).await.unwrap();
        }
        Rig {
            _dir: dir,
            journal,
            status: Arc::new(SinkStatus::new(SINK, "test")),
            supervisor: Arc::new(Supervisor::new()),
            stop: CancellationToken::new(),
            task: None,
            head: n as u64,
            lanes: vec![None],
        }
    }

    /// Starts a forwarder with a new sink of `up`.
    pub fn start<U: Upstream>(&mut self, up: &U, batch_max_events: usize) {
        self.start_with(up, up.settings(batch_max_events));
    }

    /// Starts a forwarder with a new sink of `up` and these settings.
    pub fn start_with<U: Upstream>(&mut self, up: &U, settings: ForwarderSettings) {
        self.stop = CancellationToken::new();
        self.lanes = settings.lanes.clone();
        let fwd = Forwarder::new(
            settings,
            up.sink(),
            self.journal.clone(),
            self.status.clone(),
        );
        self.task = Some(self.supervisor.spawn(
            format!("forwarder of sink '{SINK}'"),
            fwd.run(self.stop.clone()),
        ));
    }

    /// Stops the forwarder as the agent does at shutdown and waits for it.
    pub async fn stop(&mut self) {
        self.supervisor.stopping();
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.join().await;
        }
    }

    /// Waits for the forwarder task to end (a panic, an exit).
    pub async fn join(&mut self) {
        if let Some(t) = self.task.take() {
            t.join().await;
        }
    }

    /// Where the sink stands in the journal: every event at or before it
    /// is delivered (over its lanes, as the status reports it).
    pub fn cursor(&self) -> u64 {
        self.journal
            .reader()
            .unwrap()
            .position(SINK, &self.lanes, self.head)
            .unwrap()
            .cursor
    }

    pub fn dead_letters(&self) -> Vec<(u64, String)> {
        Reader::open(self.journal.path())
            .unwrap()
            .dead_letters(Some(SINK))
            .unwrap()
            .into_iter()
            .map(|d| (d.seq, d.reason))
            .collect()
    }

    /// Waits until `cond` holds, for at most a minute of real time (under
    /// paused tokio time the journal writer still runs in real time).
    pub async fn until(&self, what: &str, mut cond: impl FnMut(&Rig) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !cond(self) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; status {:?}",
                self.status.progress()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the sink's cursor in the journal is at the head, and
    /// the forwarder has counted it in its status (which it does after the
    /// journal answered).
    pub async fn until_drained(&self) {
        let head = self.head;
        self.until("the cursor at the head", |r| r.cursor() >= head)
            .await;
        self.until("the status to show it", |r| {
            r.status.progress().cursor >= head
        })
        .await;
    }
}

/// Checks that `received` holds every seq of 1..=head but `dead`, first
/// arrivals in seq order; returns the number of duplicates.
pub fn check_complete(received: &[u64], head: u64, dead: &[u64]) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut first = Vec::new();
    let mut dups = 0;
    for s in received {
        if seen.insert(*s) {
            first.push(*s);
        } else {
            dups += 1;
        }
    }
    let expected: Vec<u64> = (1..=head).filter(|s| !dead.contains(s)).collect();
    assert_eq!(first.len(), expected.len(), "count of distinct events kept");
    assert_eq!(first, expected, "events kept, in order of first arrival");
    dups
}
