//! The backlog history of the last hour, per sink and class: sampled from
//! the status reports (at most one sample every 30 s, 120 samples) for the
//! status page's sparklines. It keeps only numbers and names the report
//! already holds, and never reads the journal itself.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::StatusReport;

/// One sample every this many µs at most.
const SAMPLE_EVERY_US: i64 = 30_000_000;
/// An hour of samples.
const SAMPLES: usize = 120;

/// Backlogs over the last hour, per sink and class (`"all"` for a sink in
/// journal order), sampled from the status reports (the health server asks
/// for one every 30 s).
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

#[derive(Debug, Clone)]
struct Sample {
    at_us: i64,
    backlogs: Vec<(String, String, u64)>,
}

impl History {
    /// Keeps `report`'s backlogs if the last sample is 30 s old or more.
    pub fn record(&self, report: &StatusReport, now_us: i64) {
        let Ok(mut samples) = self.samples.lock() else {
            return;
        };
        if samples
            .back()
            .is_some_and(|s| now_us - s.at_us < SAMPLE_EVERY_US)
        {
            return;
        }
        let mut backlogs = Vec::new();
        for s in &report.sinks {
            if s.classes.is_empty() {
                backlogs.push((s.name.clone(), "all".to_owned(), s.backlog_events));
            }
            for c in &s.classes {
                backlogs.push((s.name.clone(), c.class.to_string(), c.backlog_events));
            }
        }
        samples.push_back(Sample {
            at_us: now_us,
            backlogs,
        });
        while samples.len() > SAMPLES {
            samples.pop_front();
        }
    }

    /// The backlog of `sink`/`class` per sample, oldest first.
    pub(crate) fn series(&self, sink: &str, class: &str) -> Vec<u64> {
        let Ok(samples) = self.samples.lock() else {
            return Vec::new();
        };
        samples
            .iter()
            .filter_map(|s| {
                s.backlogs
                    .iter()
                    .find(|(n, c, _)| n == sink && c == class)
                    .map(|(_, _, b)| *b)
            })
            .collect()
    }
}
