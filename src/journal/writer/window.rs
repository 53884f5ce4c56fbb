//! The commit window: under a trickle, appends that arrive shortly after a
//! first one join its batch and share its commit. It only decides how long
//! the writer gathers; it never touches the journal and never answers an
//! append, so every ack still follows the commit, later by at most the
//! window. A delivered batch's cursor move that comes meanwhile goes back
//! to the writer, which answers it at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{trace, warn};

use super::event_count;
use crate::journal::Request;

/// A commit window ends early once this many events are gathered: a
/// source with this many waiting is batching by itself, and holding its
/// acks longer would only cap its rate (a source with `max_inflight`
/// unacknowledged messages cannot send more until they are acked).
pub(crate) const WINDOW_ENOUGH_EVENTS: usize = 32;
/// ... or once the events gathered fill this many bytes (a few pages):
/// waiting longer no longer saves page writes.
const WINDOW_ENOUGH_BYTES: u64 = 16 * 1024;
/// The shortest quiet time that ends a commit window early (see
/// `CommitWindow::gather`).
const WINDOW_QUIET: Duration = Duration::from_millis(2);
/// After this many windows in a row that gathered nothing, batches commit
/// at once (see `CommitWindow::gather`) ...
const FRUITLESS_LIMIT: u32 = 3;
/// ... but every this many-th of them waits again, to see whether others
/// would now join.
const FRUITLESS_RETRY: u32 = 8;

/// `commit_window`: under a trickle, the appends that arrive shortly after
/// a first one share its commit (one fsync and one page write for several
/// events instead of one each). Every caller is still answered only after
/// the commit, so the wait adds at most the window to an ack.
pub(super) struct CommitWindow {
    len: Duration,
    /// Drives the timed receive; the writer thread is no runtime worker.
    rt: tokio::runtime::Runtime,
    /// When the last batch of appends began, and the mean time between
    /// such beginnings (a moving average).
    last_start: Option<tokio::time::Instant>,
    spacing: Option<Duration>,
    /// Events per committed batch of appends (a moving average).
    events: Option<f64>,
    /// Windows in a row that no request joined, and the batches committed
    /// at once since.
    fruitless: u32,
    skipped: u32,
    /// Four times the mean time between requests that joined recent
    /// windows (a moving average): how long a window sleeps before it
    /// first looks for more.
    quiet: Option<Duration>,
    /// Notified by the senders of requests that end a window.
    urgent: Arc<Notify>,
}

impl CommitWindow {
    /// `None` when the window is 0, or when no timer can be made (then
    /// every batch commits at once, as with a window of 0).
    pub(super) fn new(len: Duration, urgent: Arc<Notify>) -> Option<CommitWindow> {
        if len.is_zero() {
            return None;
        }
        match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => Some(CommitWindow {
                len,
                rt,
                last_start: None,
                spacing: None,
                events: None,
                fruitless: 0,
                skipped: 0,
                quiet: None,
                urgent,
            }),
            Err(e) => {
                warn!(error = %e, "cannot set up the commit window's timer; committing every batch at once (as with commit_window = \"0s\")");
                None
            }
        }
    }

    /// Waits up to the window for more appends to join `batch`. A lazy
    /// cursor move that comes meanwhile is handed to `at_once` (the writer
    /// answers it without a transaction) and the window goes on: a
    /// forwarder has one batch in flight, and must not wait for a window
    /// at each. Ends at once when the batch is not appends alone (any
    /// other cursor move or an admin request must not wait either), when
    /// it already holds enough events to fill a few pages (under load:
    /// group commit as before),
    /// and at shutdown. It looks for new requests from time to time rather
    /// than being woken by each. Once two or more requests are in, it also
    /// ends when a look finds none came for four times their mean spacing
    /// (at least [`WINDOW_QUIET`]): appenders that each wait for their answer before
    /// sending more (a source's batch loop) have all arrived by then, and
    /// waiting longer would only delay them. Nor does a batch wait when
    /// batches of appends begin more than two windows apart (or when there
    /// is no history yet, just after start): under so thin a trickle the
    /// window would rarely gather a second request. And it never waits
    /// longer than, at the rate appends arrive, it takes to gather
    /// [`WINDOW_ENOUGH_EVENTS`]: a source with a bounded number of
    /// unacknowledged messages (MQTT `max_inflight`) could otherwise send no
    /// faster than that number per window. Nor, after [`FRUITLESS_LIMIT`]
    /// windows in a row that no request joined, until one of the retries
    /// (every [`FRUITLESS_RETRY`]-th batch) gathers again: such a window
    /// only delays, and one client that waits for each answer before it
    /// posts again (an MES posting its events one by one) would be held to
    /// one request per window.
    pub(super) fn gather(
        &mut self,
        rx: &mut mpsc::Receiver<Request>,
        batch: &mut Vec<Request>,
        maintain: &mut bool,
        shutdown: &mut Option<oneshot::Sender<()>>,
        at_once: &mut dyn FnMut(Request),
    ) {
        if batch.is_empty() || !batch.iter().all(|r| matches!(r, Request::Append { .. })) {
            return;
        }
        let start = tokio::time::Instant::now();
        let spacing = self.last_start.map(|t| start - t);
        self.last_start = Some(start);
        self.spacing = match (self.spacing, spacing) {
            (Some(avg), Some(s)) => Some((avg * 3 + s.min(self.len * 100)) / 4),
            (None, s) => s,
            (avg, None) => avg,
        };
        let Some(spacing) = self
            .spacing
            .filter(|s| *s <= self.len * 2 && window_applies(batch))
        else {
            self.count(batch);
            return;
        };
        if self.fruitless >= FRUITLESS_LIMIT {
            self.skipped = self.skipped.wrapping_add(1);
            if !self.skipped.is_multiple_of(FRUITLESS_RETRY) {
                self.count(batch);
                return;
            }
        }
        let initial = batch.len();
        let len = match self.events {
            Some(per_batch) if per_batch > 0.0 => self
                .len
                .min(spacing.mul_f64(WINDOW_ENOUGH_EVENTS as f64 / per_batch)),
            _ => self.len,
        };
        let deadline = start + len;
        // Looks rather than waits on the queue: a receive would wake this
        // thread for every request that joins (an MES posting one event per
        // request: a wake-up and two context switches each, on both
        // sides), where a sleep wakes it once per quiet time and takes
        // whatever came meanwhile. A request that ends the window wakes it
        // at once through `urgent` (a permit left by one that came before
        // this window costs one early look at most). `last` is the last
        // look that found something: arrivals are known to that precision.
        let mut last = start;
        // With two requests or more in, a look that finds nothing ends the
        // window; with one, it is only a look (and the window ends at its
        // deadline, as when it waits for one client that posts again only
        // once answered).
        let mut quiet_ends = false;
        'window: loop {
            let before = batch.len();
            let mut answered = false;
            while window_applies(batch) {
                match rx.try_recv() {
                    Ok(r @ Request::Advance { lazy: true, .. }) => {
                        at_once(r);
                        answered = true;
                    }
                    Ok(Request::Maintain) => *maintain = true,
                    Ok(Request::Shutdown { reply }) => {
                        *shutdown = Some(reply);
                        break 'window;
                    }
                    Ok(other) => batch.push(other),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    // The journal is going away.
                    Err(mpsc::error::TryRecvError::Disconnected) => break 'window,
                }
            }
            let now = tokio::time::Instant::now();
            if !window_applies(batch) || now >= deadline {
                break;
            }
            if batch.len() > before {
                last = now;
            } else if quiet_ends && !answered {
                // (A look that a cursor move woke is not a quiet one.)
                break;
            }
            let until = match u32::try_from(batch.len()) {
                Ok(n) if n >= 2 => {
                    quiet_ends = true;
                    deadline.min(last + quiet_time(last - start, n))
                }
                _ => deadline.min(now + self.quiet.unwrap_or(WINDOW_QUIET)),
            };
            self.rt.block_on(async {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = self.urgent.notified() => {}
                }
            });
        }
        if let Ok(n) = u32::try_from(batch.len())
            && n >= 2
            && batch.len() > initial
        {
            let q = quiet_time(last - start, n);
            self.quiet = Some(self.quiet.map_or(q, |avg| (avg * 3 + q) / 4));
        }
        if batch.len() > initial {
            self.fruitless = 0;
            self.skipped = 0;
        } else {
            self.fruitless = self.fruitless.saturating_add(1);
        }
        trace!(
            requests = batch.len(),
            appends = batch
                .iter()
                .filter(|r| matches!(r, Request::Append { .. }))
                .count(),
            events = batch.iter().map(event_count).sum::<usize>(),
            waited_us = start.elapsed().as_micros() as u64,
            window_us = len.as_micros() as u64,
            "commit window closed"
        );
        self.count(batch);
    }

    /// Keeps the moving average of events per batch.
    fn count(&mut self, batch: &[Request]) {
        let n = batch.iter().map(event_count).sum::<usize>() as f64;
        self.events = Some(self.events.map_or(n, |avg| (avg * 3.0 + n) / 4.0));
    }
}

/// How long a window with `n` (at least 2) requests in, the last seen
/// `span` after the first, waits for the next before it ends: four times
/// their mean spacing, at least [`WINDOW_QUIET`].
fn quiet_time(span: Duration, n: u32) -> Duration {
    (span / n.saturating_sub(1).max(1) * 4).max(WINDOW_QUIET)
}

/// True when a commit window must look at `request` at once: anything but
/// a small append that no caller gathered already. A lazy cursor move is
/// answered and the window goes on; anything else ends it.
pub(crate) fn wakes_window(request: &Request) -> bool {
    !window_applies(std::slice::from_ref(request))
}

/// True while a batch is appends alone that no caller gathered already
/// ([`crate::journal::Journal::append_gathered`]), and small: fewer than
/// [`WINDOW_ENOUGH_EVENTS`] events in fewer than [`WINDOW_ENOUGH_BYTES`].
fn window_applies(batch: &[Request]) -> bool {
    let (mut events, mut bytes) = (0usize, 0u64);
    for r in batch {
        let Request::Append {
            events: evs,
            gathered: false,
            ..
        } = r
        else {
            return false;
        };
        events += evs.len();
        bytes += evs.iter().map(|e| e.size() as u64).sum::<u64>();
    }
    !batch.is_empty() && events < WINDOW_ENOUGH_EVENTS && bytes < WINDOW_ENOUGH_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Class, NewEvent};
    use std::time::Instant;

    fn append(gathered: bool) -> Request {
        let (reply, _) = oneshot::channel();
        Request::Append {
            events: vec![NewEvent {
                source: "mes".into(),
                id: "e".into(),
                stream: "line/0".into(),
                class: Class::Critical,
                event_type: "test.window".into(),
                source_time: None,
                data: b"{}".to_vec(),
                attrs: None,
            }],
            gathered,
            reply,
        }
    }

    /// A window of `len` that applies at once: appends seen 10 ms apart.
    fn window(len: Duration, urgent: &Arc<Notify>) -> CommitWindow {
        let mut w = CommitWindow::new(len, urgent.clone()).unwrap();
        w.spacing = Some(Duration::from_millis(10));
        w
    }

    /// Sends `request` after `after` from another thread, notifying
    /// `urgent` as [`crate::journal::Journal`] does for one the window must
    /// look at at once.
    fn send_later(
        tx: mpsc::Sender<Request>,
        urgent: Arc<Notify>,
        after: Duration,
        request: Request,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            let notify = wakes_window(&request);
            assert!(tx.blocking_send(request).is_ok());
            if notify {
                urgent.notify_one();
            }
        })
    }

    /// A delivered batch's cursor move, as a forwarder sends it.
    fn lazy_advance() -> Request {
        let (reply, _) = oneshot::channel();
        Request::Advance {
            sink: "central".into(),
            from: Some(0),
            to: 1,
            read_at_evictions: Some(0),
            lazy: true,
            reply,
        }
    }

    /// One window of `len` over one small append, `quiet` known from
    /// earlier windows, while `request` comes `after` into it: how many
    /// requests it took, how long it lasted, and when (from its start) it
    /// handed requests on to be answered at once.
    fn gather_with(
        len: Duration,
        quiet: Duration,
        after: Duration,
        request: Request,
    ) -> (usize, Duration, Vec<Duration>) {
        let urgent = Arc::new(Notify::new());
        let (tx, mut rx) = mpsc::channel(16);
        let (mut maintain, mut shutdown) = (false, None);
        let mut w = window(len, &urgent);
        w.quiet = Some(quiet);
        let mut batch = vec![append(false)];
        // Held to the end: a closed queue would end the window too.
        let t = send_later(tx.clone(), urgent, after, request);
        let t0 = Instant::now();
        let mut answered = Vec::new();
        w.gather(
            &mut rx,
            &mut batch,
            &mut maintain,
            &mut shutdown,
            &mut |_| answered.push(t0.elapsed()),
        );
        let took = t0.elapsed();
        t.join().unwrap();
        (batch.len(), took, answered)
    }

    #[test]
    fn a_request_that_ends_the_window_is_taken_at_once_small_appends_at_a_look() {
        // A gathered append 100 ms into a 5 s window ends it then, though
        // with one request in and a quiet time of 5 s known the window
        // would not look before its deadline.
        let (n, took, _) = gather_with(
            Duration::from_secs(5),
            Duration::from_secs(5),
            Duration::from_millis(100),
            append(true),
        );
        assert_eq!(n, 2);
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(2),
            "the window ended after {took:?}, not when the gathered append came"
        );

        // A small append does not end the window: with a quiet time of
        // 300 ms known, it is taken at the first look, and the window ends
        // at a later one that finds nothing (four times the spacing the
        // looks saw, 1.2 s, after).
        let (n, took, _) = gather_with(
            Duration::from_secs(5),
            Duration::from_millis(300),
            Duration::from_millis(50),
            append(false),
        );
        assert_eq!(n, 2);
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
            "the window ended after {took:?}"
        );
    }

    #[test]
    fn a_delivered_batchs_cursor_move_is_handed_on_at_once_and_the_window_goes_on() {
        // 100 ms into a 1.5 s window that, with one request in and a quiet
        // time of 5 s known, would not look before its deadline: the move
        // wakes it and is handed on then, and the window goes on to its
        // deadline with its one append.
        let (n, took, answered) = gather_with(
            Duration::from_millis(1_500),
            Duration::from_secs(5),
            Duration::from_millis(100),
            lazy_advance(),
        );
        assert_eq!(n, 1, "the move joined the batch");
        assert_eq!(answered.len(), 1, "the move was not handed on");
        assert!(
            answered[0] >= Duration::from_millis(100) && answered[0] < Duration::from_millis(1_000),
            "the move was handed on after {:?}, not when it came",
            answered[0]
        );
        assert!(
            took >= Duration::from_millis(1_500),
            "the move ended the window after {took:?}"
        );
    }
}
