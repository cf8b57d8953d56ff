//! The contract suite against the in-memory adapter.

mod contract;

use std::sync::Arc;

use contract::Fixture;
use orderly_event_store::EventStore;
use orderly_event_store::memory::MemoryEventStore;

struct Memory(MemoryEventStore);

impl Fixture for Memory {
    fn store(&self) -> Arc<dyn EventStore> {
        Arc::new(self.0.clone())
    }
}

contract_tests!(async { Memory(MemoryEventStore::new()) });
