//! The checksum of an event row (`events.crc`, schema 4): CRC-32 over every
//! column but itself, written with the row and checked by every read that
//! hands events on. SQLite checks the WAL's frames but not the main file's
//! pages: a flipped bit in a row's payload would otherwise be delivered as
//! if it were the event. A row that fails its check is never delivered; it
//! is skipped, logged and counted (see `reader.rs`).
//!
//! Rows written before schema 4 have no checksum and are taken as they are.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::error;

use super::reader::event_from_row;
use crate::event::StoredEvent;

/// Event rows found damaged (undecodable, or failing their checksum) and
/// skipped by this process's reads since it started.
pub static DAMAGED_ROWS: AtomicU64 = AtomicU64::new(0);

/// The event of a row read with `reader::EVENT_COLUMNS`, or `None` when the row
/// is damaged: a column that does not decode, or columns that no longer
/// match the row's checksum. A damaged row is logged (once per reader and
/// seq) and counted, and never handed on.
pub(crate) fn checked_event(
    r: &rusqlite::Row<'_>,
    texts: super::compact::Texts<'_>,
    logged: &RefCell<HashSet<i64>>,
) -> Option<StoredEvent> {
    // The event, then the columns it does not carry: class as stored,
    // size, only_sink, crc.
    type Decoded = (StoredEvent, i64, i64, Option<String>, Option<i64>);
    let decoded = (|| -> rusqlite::Result<Decoded> {
        Ok((
            event_from_row(r, texts)?,
            r.get(5)?,
            r.get(11)?,
            r.get(12)?,
            r.get(13)?,
        ))
    })();
    let damage = match &decoded {
        Err(e) => Some(e.to_string()),
        Ok((_, _, _, _, None)) => None,
        Ok((ev, class, size, only_sink, Some(crc))) => {
            let found = RowColumns {
                seq: ev.seq as i64,
                source: &ev.source,
                id: &ev.id,
                stream: &ev.stream,
                stream_seq: ev.stream_seq as i64,
                class: *class,
                event_type: &ev.event_type,
                source_time: ev.source_time.as_deref(),
                recv_us: ev.recv_time_us,
                data: &ev.data,
                attrs: ev.attrs.as_deref(),
                size: *size,
                only_sink: only_sink.as_deref(),
            }
            .check();
            (found != *crc).then(|| "the row no longer matches its checksum".to_string())
        }
    };
    let Some(why) = damage else {
        return decoded.ok().map(|d| d.0);
    };
    let seq = r.get::<_, i64>(0).unwrap_or(-1);
    if logged.borrow_mut().insert(seq) {
        DAMAGED_ROWS.fetch_add(1, Ordering::Relaxed);
        error!(
            seq,
            reason = %why,
            "journal: event row {seq} is damaged and is skipped, not delivered (failing storage or a power cut); \
             the receiver sees a gap in its stream sequence"
        );
    }
    None
}

/// The columns of one row, as stored.
pub(crate) struct RowColumns<'a> {
    pub seq: i64,
    pub source: &'a str,
    pub id: &'a str,
    pub stream: &'a str,
    pub stream_seq: i64,
    pub class: i64,
    pub event_type: &'a str,
    pub source_time: Option<&'a str>,
    pub recv_us: i64,
    pub data: &'a [u8],
    pub attrs: Option<&'a str>,
    pub size: i64,
    pub only_sink: Option<&'a str>,
}

impl RowColumns<'_> {
    /// The value stored in `events.crc`.
    pub(crate) fn check(&self) -> i64 {
        let mut h = crc32fast::Hasher::new();
        let mut int = |v: i64| h.update(&v.to_le_bytes());
        int(self.seq);
        int(self.stream_seq);
        int(self.class);
        int(self.recv_us);
        int(self.size);
        // Lengths first: no two rows' columns run together into the same
        // bytes.
        let texts: [Option<&[u8]>; 8] = [
            Some(self.source.as_bytes()),
            Some(self.id.as_bytes()),
            Some(self.stream.as_bytes()),
            Some(self.event_type.as_bytes()),
            self.source_time.map(str::as_bytes),
            Some(self.data),
            self.attrs.map(str::as_bytes),
            self.only_sink.map(str::as_bytes),
        ];
        for t in texts {
            match t {
                Some(b) => {
                    h.update(&[1]);
                    h.update(&(b.len() as u64).to_le_bytes());
                    h.update(b);
                }
                None => h.update(&[0]),
            }
        }
        i64::from(h.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(data: &'a [u8], attrs: Option<&'a str>) -> RowColumns<'a> {
        RowColumns {
            seq: 7,
            source: "mes",
            id: "a-1",
            stream: "line1",
            stream_seq: 3,
            class: 0,
            event_type: "t",
            source_time: None,
            recv_us: 1_700_000_000_000_000,
            data,
            attrs,
            size: 10,
            only_sink: None,
        }
    }

    #[test]
    fn any_changed_column_changes_the_check() {
        let base = row(b"{\"q\":1}", None).check();
        assert_eq!(base, row(b"{\"q\":1}", None).check());
        assert_ne!(base, row(b"{\"q\":3}", None).check());
        assert_ne!(base, row(b"{\"q\":1}", Some("")).check());
        let mut r = row(b"{\"q\":1}", None);
        r.seq = 8;
        assert_ne!(base, r.check());
        let mut r = row(b"{\"q\":1}", None);
        r.only_sink = Some("central");
        assert_ne!(base, r.check());
    }
}
