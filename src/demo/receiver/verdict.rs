//! The verdict over a recording: what arrived, how often, in which order,
//! and which holes gap events announced (the rules are in the receiver's
//! module docs). Pure computation over [`ReceivedEvent`]s; it must never
//! touch the receiver's state or its locks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use serde_json::Value;

use super::ReceivedEvent;
use crate::event::GAP_EVENT_TYPE;

/// Order and completeness of one stream (one `subject`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamVerdict {
    /// Distinct ids.
    pub unique: u64,
    /// Re-sent ids.
    pub duplicates: u64,
    /// New ids whose `streamsequence` was not the previous maximum + 1 (and
    /// not a jump fully announced by gap events).
    pub out_of_order: u64,
    /// `streamsequence` of the first new event that arrived.
    pub first: Option<u64>,
    /// Highest `streamsequence` received.
    pub last: Option<u64>,
    /// Sequences in `1..=last` neither received nor announced by a gap event.
    pub missing: u64,
    /// Sequences in `1..=last` not received but announced by a gap event.
    pub gap_covered: u64,
}

/// What the recording says about delivery. Streams are keyed by `subject`;
/// order is checked per `(source, subject)`, and should two sources share a
/// subject their counts are added up under that subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Events in accepted batches, duplicates and gap events included.
    pub events_received: u64,
    /// Distinct `(source, id)`.
    pub unique_ids: u64,
    /// `events_received - unique_ids`.
    pub duplicates: u64,
    /// Sum over streams of [`StreamVerdict::out_of_order`].
    pub out_of_order: u64,
    /// Distinct `plantrelay.gap` events.
    pub gaps: u64,
    /// Sum over streams of [`StreamVerdict::missing`].
    pub missing: u64,
    /// Sum over streams of [`StreamVerdict::gap_covered`].
    pub gap_covered: u64,
    /// Distinct non-gap events without `subject` or `streamsequence`: not
    /// order-checked.
    pub unsequenced: u64,
    pub per_stream: BTreeMap<String, StreamVerdict>,
}

impl Verdict {
    /// Computes the verdict of events in arrival order (see the receiver's
    /// [module docs](super) for the rules). `duplicate` flags are recomputed
    /// from `(source, id)`.
    pub fn compute(events: &[ReceivedEvent]) -> Verdict {
        let gaps = GapRanges::collect(events);
        let mut v = Verdict::default();
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        // Per (source, subject): highest streamsequence so far, and every
        // one received.
        let mut streams: HashMap<(&str, &str), (u64, BTreeSet<u64>)> = HashMap::new();

        for e in events {
            v.events_received += 1;
            let new = seen.insert((e.source.as_str(), e.id.as_str()));
            if !new {
                v.duplicates += 1;
                if let Some(subject) = &e.subject
                    && e.event_type != GAP_EVENT_TYPE
                {
                    v.per_stream.entry(subject.clone()).or_default().duplicates += 1;
                }
                continue;
            }
            v.unique_ids += 1;
            if e.event_type == GAP_EVENT_TYPE {
                v.gaps += 1;
                continue;
            }
            let (Some(subject), Some(s)) = (&e.subject, e.streamsequence) else {
                v.unsequenced += 1;
                continue;
            };
            let sv = v.per_stream.entry(subject.clone()).or_default();
            sv.unique += 1;
            if sv.first.is_none() {
                sv.first = Some(s);
            }
            sv.last = Some(sv.last.map_or(s, |l| l.max(s)));
            let (max, received) = streams
                .entry((e.source.as_str(), subject.as_str()))
                .or_insert((0, BTreeSet::new()));
            received.insert(s);
            let expected = max.saturating_add(1);
            let in_order =
                s == expected || (s > expected && gaps.covers(&e.source, subject, expected, s - 1));
            if !in_order {
                sv.out_of_order += 1;
            }
            *max = (*max).max(s);
        }

        for ((source, subject), (_, received)) in &streams {
            let (missing, covered) = gaps.holes(source, subject, received);
            if let Some(sv) = v.per_stream.get_mut(*subject) {
                sv.missing += missing;
                sv.gap_covered += covered;
            }
        }
        for sv in v.per_stream.values() {
            v.out_of_order += sv.out_of_order;
            v.missing += sv.missing;
            v.gap_covered += sv.gap_covered;
        }
        v
    }

    /// Nothing lost, nothing out of order (duplicates are allowed: delivery
    /// is at-least-once).
    pub fn is_complete_and_ordered(&self) -> bool {
        self.out_of_order == 0 && self.missing == 0
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delivered {} unique events in {} streams ({} received, {} duplicates); \
             {} out of order; {} missing; {} announced lost by {} gap events",
            self.unique_ids,
            self.per_stream.len(),
            self.events_received,
            self.duplicates,
            self.out_of_order,
            self.missing,
            self.gap_covered,
            self.gaps,
        )
    }
}

/// Stream-sequence ranges announced by gap events.
struct GapRanges {
    /// subject -> (source filter, from, to)
    by_subject: HashMap<String, Vec<(Option<String>, u64, u64)>>,
}

impl GapRanges {
    fn collect(events: &[ReceivedEvent]) -> GapRanges {
        let mut by_subject: HashMap<String, Vec<(Option<String>, u64, u64)>> = HashMap::new();
        for e in events.iter().filter(|e| e.event_type == GAP_EVENT_TYPE) {
            let items: Vec<&Value> = match &e.data {
                Value::Array(a) => a.iter().collect(),
                Value::Object(o) => match o.get("streams") {
                    Some(Value::Array(a)) => a.iter().collect(),
                    _ => vec![&e.data],
                },
                _ => Vec::new(),
            };
            for item in items {
                // plantrelay's own shape: the gap event's subject and source
                // name the stream, its data `first_streamsequence` ..=
                // `last_streamsequence`.
                let subject = item
                    .get("subject")
                    .or_else(|| item.get("stream"))
                    .and_then(Value::as_str)
                    .or(e.subject.as_deref());
                let from = item
                    .get("from_streamsequence")
                    .or_else(|| item.get("first_streamsequence"))
                    .and_then(Value::as_u64);
                let to = item
                    .get("to_streamsequence")
                    .or_else(|| item.get("last_streamsequence"))
                    .and_then(Value::as_u64);
                if let (Some(subject), Some(from), Some(to)) = (subject, from, to)
                    && from <= to
                {
                    let own_shape = item.get("first_streamsequence").is_some();
                    let source = item
                        .get("source")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .or_else(|| own_shape.then(|| e.source.clone()));
                    by_subject
                        .entry(subject.to_owned())
                        .or_default()
                        .push((source, from, to));
                }
            }
        }
        GapRanges { by_subject }
    }

    /// Merged ranges that apply to `(source, subject)`.
    fn ranges(&self, source: &str, subject: &str) -> Vec<(u64, u64)> {
        let mut r: Vec<(u64, u64)> = self
            .by_subject
            .get(subject)
            .into_iter()
            .flatten()
            .filter(|(filter, _, _)| match filter {
                None => true,
                Some(f) => {
                    source == f
                        || source
                            .strip_suffix(f.as_str())
                            .is_some_and(|rest| rest.ends_with('/'))
                }
            })
            .map(|&(_, a, b)| (a, b))
            .collect();
        r.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(r.len());
        for (a, b) in r {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        merged
    }

    /// How many of `from..=to` the gap events announce.
    fn covered_count(ranges: &[(u64, u64)], from: u64, to: u64) -> u64 {
        ranges
            .iter()
            .map(|&(a, b)| {
                let lo = a.max(from);
                let hi = b.min(to);
                if lo <= hi { hi - lo + 1 } else { 0 }
            })
            .sum()
    }

    fn covers(&self, source: &str, subject: &str, from: u64, to: u64) -> bool {
        let ranges = self.ranges(source, subject);
        Self::covered_count(&ranges, from, to) == to - from + 1
    }

    /// `(missing, gap_covered)` over the holes in `1..=max(received)`.
    fn holes(&self, source: &str, subject: &str, received: &BTreeSet<u64>) -> (u64, u64) {
        let ranges = self.ranges(source, subject);
        let (mut missing, mut covered) = (0, 0);
        let mut next = 1u64;
        for &s in received {
            if s > next {
                let hole = s - next;
                let c = Self::covered_count(&ranges, next, s - 1);
                covered += c;
                missing += hole - c;
            }
            next = next.max(s.saturating_add(1));
        }
        (missing, covered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(source: &str, id: &str, subject: &str, s: u64) -> ReceivedEvent {
        ReceivedEvent {
            source: source.into(),
            id: id.into(),
            subject: Some(subject.into()),
            event_type: "t".into(),
            time: None,
            sequence: None,
            streamsequence: Some(s),
            data: Value::Null,
            duplicate: false,
            batch: 0,
        }
    }

    fn gap(id: &str, data: Value) -> ReceivedEvent {
        ReceivedEvent {
            source: "plantrelay://gw/_journal".into(),
            id: id.into(),
            subject: Some("_gaps".into()),
            event_type: GAP_EVENT_TYPE.into(),
            time: None,
            sequence: None,
            streamsequence: None,
            data,
            duplicate: false,
            batch: 0,
        }
    }

    #[test]
    fn in_order_stream_is_clean() {
        let events: Vec<_> = (1..=5).map(|i| ev("s", &format!("e{i}"), "a", i)).collect();
        let v = Verdict::compute(&events);
        assert_eq!(v.events_received, 5);
        assert_eq!(v.unique_ids, 5);
        assert_eq!(v.duplicates, 0);
        assert_eq!(v.out_of_order, 0);
        assert_eq!(v.missing, 0);
        assert!(v.is_complete_and_ordered());
        let a = &v.per_stream["a"];
        assert_eq!((a.first, a.last, a.unique), (Some(1), Some(5), 5));
    }

    #[test]
    fn resent_ids_are_duplicates_not_out_of_order() {
        // 1 2 3, then a retry re-sends 2 3, then 4.
        let events = vec![
            ev("s", "e1", "a", 1),
            ev("s", "e2", "a", 2),
            ev("s", "e3", "a", 3),
            ev("s", "e2", "a", 2),
            ev("s", "e3", "a", 3),
            ev("s", "e4", "a", 4),
        ];
        let v = Verdict::compute(&events);
        assert_eq!(v.events_received, 6);
        assert_eq!(v.unique_ids, 4);
        assert_eq!(v.duplicates, 2);
        assert_eq!(v.per_stream["a"].duplicates, 2);
        assert_eq!(v.out_of_order, 0);
        assert!(v.is_complete_and_ordered());
    }

    #[test]
    fn late_and_skipped_sequences_are_out_of_order() {
        // 1 3 2 5 4: 3 jumps, 2 is late, 5 jumps, 4 is late.
        let events = vec![
            ev("s", "e1", "a", 1),
            ev("s", "e3", "a", 3),
            ev("s", "e2", "a", 2),
            ev("s", "e5", "a", 5),
            ev("s", "e4", "a", 4),
        ];
        let v = Verdict::compute(&events);
        assert_eq!(v.out_of_order, 4);
        assert_eq!(v.missing, 0, "everything arrived in the end");
        assert!(!v.is_complete_and_ordered());
    }

    #[test]
    fn missing_sequences_are_counted_and_streams_are_independent() {
        let events = vec![
            ev("s", "a1", "a", 1),
            ev("s", "b1", "b", 1),
            ev("s", "a2", "a", 2),
            ev("s", "a5", "a", 5),
            ev("s", "b2", "b", 2),
            // Same subject from another source: its own sequence space.
            ev("t", "x1", "a", 1),
        ];
        let v = Verdict::compute(&events);
        assert_eq!(v.per_stream["a"].out_of_order, 1);
        assert_eq!(v.per_stream["a"].missing, 2);
        assert_eq!(v.per_stream["b"].out_of_order, 0);
        assert_eq!(v.per_stream["b"].missing, 0);
        assert_eq!((v.out_of_order, v.missing), (1, 2));
    }

    #[test]
    fn a_stream_that_does_not_start_at_one_is_missing_its_head() {
        let v = Verdict::compute(&[ev("s", "e3", "a", 3), ev("s", "e4", "a", 4)]);
        assert_eq!(v.out_of_order, 1);
        assert_eq!(v.missing, 2);
    }

    #[test]
    fn a_gap_event_excuses_the_jump_it_announces_even_when_it_arrives_later() {
        let events = vec![
            ev("plantrelay://gw/line3", "e1", "a", 1),
            ev("plantrelay://gw/line3", "e5", "a", 5),
            ev("plantrelay://gw/line3", "e6", "a", 6),
            gap(
                "g1",
                json!({"source": "line3", "subject": "a",
                       "from_streamsequence": 2, "to_streamsequence": 4}),
            ),
            gap("g1", json!(null)), // re-sent gap event: a duplicate
        ];
        let v = Verdict::compute(&events);
        assert_eq!(v.gaps, 1);
        assert_eq!(v.duplicates, 1);
        assert_eq!(v.out_of_order, 0);
        assert_eq!(v.missing, 0);
        assert_eq!(v.gap_covered, 3);
        assert!(v.is_complete_and_ordered());
        assert!(!v.per_stream.contains_key("_gaps"));
    }

    #[test]
    fn a_gap_event_excuses_only_what_it_announces() {
        let events = vec![
            ev("s", "e1", "a", 1),
            ev("s", "e6", "a", 6), // 2..=5 skipped, only 2..=3 announced
            ev("s", "b3", "b", 3), // other stream: not covered
            gap(
                "g1",
                json!({"streams": [
                    {"stream": "a", "from_streamsequence": 2, "to_streamsequence": 3},
                    {"subject": "b", "source": "other", "from_streamsequence": 1, "to_streamsequence": 2}
                ]}),
            ),
        ];
        let v = Verdict::compute(&events);
        assert_eq!(v.per_stream["a"].out_of_order, 1);
        assert_eq!(v.per_stream["a"].missing, 2);
        assert_eq!(v.per_stream["a"].gap_covered, 2);
        assert_eq!(v.per_stream["b"].out_of_order, 1);
        assert_eq!(v.per_stream["b"].missing, 2);
        assert_eq!(v.gaps, 1);
    }

    #[test]
    fn events_without_stream_sequence_are_not_order_checked() {
        let mut e = ev("s", "e1", "a", 1);
        e.streamsequence = None;
        let v = Verdict::compute(&[e, ev("s", "e2", "a", 1)]);
        assert_eq!(v.unsequenced, 1);
        assert_eq!(v.out_of_order, 0);
    }

    #[test]
    fn huge_sequence_numbers_do_not_hang_or_overflow() {
        let v = Verdict::compute(&[ev("s", "e1", "a", u64::MAX)]);
        assert_eq!(v.missing, u64::MAX - 1);
        assert_eq!(v.out_of_order, 1);
    }
}
