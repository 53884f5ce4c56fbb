//! The appender task: takes data changes from the queue in arrival order,
//! maps them to events and appends them to the journal in batches of up
//! to [`BATCH_MAX`] (group commit), with the display names the resync read.
//!
//! It owns the only path from a data change to the journal. It must never
//! drop a data change silently: a failed append is retried (the batch held
//! in memory) until the journal takes it. The task ends when the queue is
//! closed and all of it stored, or with [`OpcuaSourceError::JournalClosed`] when
//! the journal has stopped.

use std::sync::Arc;

use opcua::types::DataValue;
use tracing::{info, warn};

use super::queue::{self, Item};
use super::{BATCH_MAX, Mapper, NodeMeta, OpcuaSourceError};
use crate::event::NewEvent;
use crate::journal::{AppendOutcome, Journal, JournalError};
use crate::status::SourceStatus;

/// Appends data changes to the journal in arrival order.
pub(super) struct Appender {
    pub(super) name: String,
    pub(super) journal: Journal,
    pub(super) mapper: Mapper,
    pub(super) nodes: Vec<NodeMeta>,
    pub(super) names: Vec<String>,
    pub(super) status: Arc<SourceStatus>,
}

impl Appender {
    pub(super) async fn run(mut self, mut rx: queue::Receiver) -> Result<(), OpcuaSourceError> {
        let mut items = Vec::with_capacity(256);
        let mut batch: Vec<(usize, DataValue, bool)> = Vec::with_capacity(BATCH_MAX);
        while rx.recv_many(&mut items, 256).await > 0 {
            for item in items.drain(..) {
                match item {
                    Item::Names(names) => {
                        // Names apply to what comes after them: store what
                        // came before first.
                        self.commit(&mut batch).await?;
                        for (i, name) in names {
                            if let Some(slot) = self.names.get_mut(i) {
                                *slot = name;
                            }
                        }
                    }
                    Item::Change {
                        index,
                        value,
                        resync,
                    } => batch.push((index, value, resync)),
                }
                if batch.len() >= BATCH_MAX {
                    self.commit(&mut batch).await?;
                }
            }
            self.commit(&mut batch).await?;
        }
        Ok(())
    }

    /// Maps and appends the batch (retrying until the journal takes it),
    /// counts, and empties it.
    async fn commit(
        &mut self,
        batch: &mut Vec<(usize, DataValue, bool)>,
    ) -> Result<(), OpcuaSourceError> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len();
        let mut attempt = 0u32;
        loop {
            let events: Vec<NewEvent> = batch
                .iter()
                .filter_map(|(index, value, resync)| {
                    let node = self.nodes.get(*index)?;
                    Some(self.mapper.map(node, &self.names[*index], value, *resync))
                })
                .collect();
            let mapped = events.len() as u64;
            match self.journal.append(events).await {
                Ok(outcomes) => {
                    let duplicates = outcomes
                        .iter()
                        .filter(|o| matches!(o, AppendOutcome::Duplicate { .. }))
                        .count() as u64;
                    self.status.record_events(mapped - duplicates, duplicates);
                    if attempt > 0 {
                        info!(source = %self.name, attempts = attempt + 1, "journal append succeeded again");
                    }
                    batch.clear();
                    return Ok(());
                }
                Err(JournalError::Closed) => {
                    return Err(OpcuaSourceError::JournalClosed {
                        name: self.name.clone(),
                    });
                }
                Err(e) => {
                    attempt += 1;
                    let message = e.to_string();
                    if attempt == 1 || attempt.is_multiple_of(50) {
                        warn!(source = %self.name, error = %message, events = n, attempt, "journal append failed; data changes are held in memory and the append is retried");
                    }
                    self.status.record_error(message);
                    tokio::time::sleep(crate::sources::append_retry_delay(&e, attempt)).await;
                }
            }
        }
    }
}

pub(super) fn appender_result(
    name: &str,
    r: Result<Result<(), OpcuaSourceError>, tokio::task::JoinError>,
) -> Result<(), OpcuaSourceError> {
    match r {
        Ok(r) => r,
        Err(e) => Err(OpcuaSourceError::Client {
            name: name.to_owned(),
            detail: format!("the appender task failed: {e}"),
        }),
    }
}
