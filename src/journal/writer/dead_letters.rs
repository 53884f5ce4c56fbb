//! Dead letters: copies of events a sink rejected for good (a copy, so
//! retention cannot take them), put back for delivery to that sink alone
//! or dropped. These run in the batch's open transaction and never commit,
//! roll back or answer a caller themselves: the batch does, after COMMIT.

use std::time::SystemTime;

use rusqlite::{OptionalExtension, params};
use tracing::info;

use super::{Fatal, WriterState, meta_set};
use crate::event::{Class, NewEvent};
use crate::journal::JournalError;
use crate::units::unix_micros;

impl WriterState {
    pub(super) fn dead_letter(
        &mut self,
        sink: &str,
        ev: &crate::event::StoredEvent,
        reason: &str,
    ) -> Result<i64, JournalError> {
        self.conn
            .prepare_cached(
                "INSERT INTO dead_letters (sink, seq, reason, time_us, source, event_id, stream,
                    stream_seq, class, type, source_time, recv_time, data, attrs)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    sink,
                    ev.seq as i64,
                    reason,
                    unix_micros(SystemTime::now()),
                    ev.source,
                    ev.id,
                    ev.stream,
                    ev.stream_seq as i64,
                    ev.class.as_i64(),
                    ev.event_type,
                    ev.source_time,
                    ev.recv_time_us,
                    ev.data,
                    ev.attrs,
                ])
            })
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    pub(super) fn retry_dead_letter(
        &mut self,
        id: i64,
        recv_us: i64,
    ) -> Result<Result<u64, JournalError>, Fatal> {
        let row = self
            .conn
            .query_row(
                "SELECT sink, source, event_id, stream, stream_seq, class, type, source_time, data, attrs
                 FROM dead_letters WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        NewEvent {
                            source: r.get(1)?,
                            id: r.get(2)?,
                            stream: r.get(3)?,
                            class: Class::from_i64(r.get(5)?),
                            event_type: r.get(6)?,
                            source_time: r.get(7)?,
                            data: r.get(8)?,
                            attrs: r.get(9)?,
                        },
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| Fatal(self.err(e)))?;
        let Some((sink, ev, stream_seq)) = row else {
            return Ok(Err(JournalError::NotFound {
                path: self.path.clone(),
                what: format!("no dead letter with id {id}"),
            }));
        };
        let seq = self.take_seq();
        self.class_heads[ev.class.as_i64() as usize] = seq;
        // The event keeps its stream sequence: it is the same event, late.
        self.insert_row(seq, &ev, stream_seq.max(0) as u64, recv_us, Some(&sink))
            .and_then(|_| {
                self.conn
                    .execute("DELETE FROM dead_letters WHERE id = ?1", [id])
                    .map(|_| ())
            })
            .map_err(|e| Fatal(self.err(e)))?;
        meta_set(&self.conn, "last_seq", seq as i64).map_err(|e| Fatal(self.err(e)))?;
        info!(
            dead_letter = id,
            sink, seq, "dead letter put back for delivery"
        );
        Ok(Ok(seq))
    }

    pub(super) fn drop_dead_letter(&mut self, id: i64) -> Result<Result<(), JournalError>, Fatal> {
        let n = self
            .conn
            .execute("DELETE FROM dead_letters WHERE id = ?1", [id])
            .map_err(|e| Fatal(self.err(e)))?;
        if n == 0 {
            return Ok(Err(JournalError::NotFound {
                path: self.path.clone(),
                what: format!("no dead letter with id {id}"),
            }));
        }
        info!(dead_letter = id, "dead letter dropped");
        Ok(Ok(()))
    }
}
