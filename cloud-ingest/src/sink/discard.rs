//! A sink that stores nothing: it acknowledges every commit at once and keeps
//! only each agent's high-water mark, in memory. For measuring the transport
//! (TLS, gRPC, sessions, the committer) without storage; never for data
//! anyone wants to keep.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{AgentRecords, Sink, SinkError};

#[derive(Debug, Default)]
pub struct DiscardSink {
    high_water: Mutex<HashMap<String, u64>>,
}

impl Sink for DiscardSink {
    fn stored_through(&self, agent: &str) -> Result<u64, SinkError> {
        let map = self.high_water.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map.get(agent).copied().unwrap_or(0))
    }

    fn commit(&self, batches: &[AgentRecords]) -> Result<(), SinkError> {
        let mut map = self.high_water.lock().unwrap_or_else(|p| p.into_inner());
        for batch in batches {
            if let Some(last) = batch.records.last() {
                let high = map.entry(batch.agent.clone()).or_default();
                *high = (*high).max(last.seq);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::EncodedRecord;

    #[test]
    fn keeps_high_water_marks_and_nothing_else() {
        let sink = DiscardSink::default();
        let rec = |seq| EncodedRecord {
            seq,
            encoded: Default::default(),
        };
        sink.commit(&[AgentRecords {
            agent: "a".into(),
            records: vec![rec(1), rec(2)],
            kept: None,
        }])
        .unwrap();
        assert_eq!(sink.stored_through("a").unwrap(), 2);
        assert_eq!(sink.stored_through("b").unwrap(), 0);
    }
}
