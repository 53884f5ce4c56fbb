//! The work left of one batch: which ranges are still to send and which
//! event is to be dead-lettered, after partial acknowledgements and the
//! splits around poison events. It must never reorder the batch or drop an
//! event other than through a dead-letter step.

use std::collections::VecDeque;

use crate::event::StoredEvent;

/// The work left of one batch read from the journal, in order. A
/// rejection replaces the front range by smaller ones (or by the poison
/// event alone), so the order of what is sent never changes.
#[derive(Debug)]
pub struct Plan {
    events: Vec<StoredEvent>,
    pending: VecDeque<Step>,
}

/// What the driver must do next for a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send `events[a..b]`.
    Send(usize, usize),
    /// Dead-letter `events[i]`, then continue.
    DeadLetter(usize),
    Done,
}

impl Plan {
    pub fn new(events: Vec<StoredEvent>) -> Plan {
        let mut pending = VecDeque::new();
        if !events.is_empty() {
            pending.push_back(Step::Send(0, events.len()));
        }
        Plan { events, pending }
    }

    pub fn events(&self) -> &[StoredEvent] {
        &self.events
    }

    pub fn next(&self) -> Step {
        self.pending.front().copied().unwrap_or(Step::Done)
    }

    /// The front step is done (range acknowledged, or event dead-lettered).
    pub fn done(&mut self) {
        self.pending.pop_front();
    }

    /// Steps left, the front one included.
    pub fn remaining(&self) -> usize {
        self.pending.len()
    }

    /// Keeps only the first `n` events (the rate limiter let no more go).
    /// Before anything of the plan was sent.
    pub fn truncate(&mut self, n: usize) {
        if n < self.events.len() {
            self.events.truncate(n);
            self.pending.clear();
            if n > 0 {
                self.pending.push_back(Step::Send(0, n));
            }
        }
    }

    /// The first `k` events of the front range are delivered (a partial
    /// acknowledgement): the range starts after them.
    pub fn skip_front(&mut self, k: usize) {
        if let Some(Step::Send(a, b)) = self.pending.front().copied() {
            let a2 = (a + k).min(b);
            self.pending.pop_front();
            if a2 < b {
                self.pending.push_front(Step::Send(a2, b));
            }
        }
    }

    /// The front range was rejected; `index` (relative to the range) is the
    /// event the upstream named, if it named one.
    pub fn rejected(&mut self, index: Option<usize>) {
        let Some(Step::Send(a, b)) = self.pending.front().copied() else {
            return;
        };
        self.pending.pop_front();
        let mut replace = Vec::with_capacity(3);
        match index {
            Some(i) if a + i < b => {
                let at = a + i;
                if a < at {
                    replace.push(Step::Send(a, at));
                }
                replace.push(Step::DeadLetter(at));
                if at + 1 < b {
                    replace.push(Step::Send(at + 1, b));
                }
            }
            _ if b - a == 1 => replace.push(Step::DeadLetter(a)),
            _ => {
                let mid = a + (b - a) / 2;
                replace.push(Step::Send(a, mid));
                replace.push(Step::Send(mid, b));
            }
        }
        for step in replace.into_iter().rev() {
            self.pending.push_front(step);
        }
    }
}
