//! Product commands from many orders at once, combined into one append per product.
//!
//! Many lanes reserve stock of the same product at the same time (a flash sale). Sent one by
//! one, every reservation would load the product, decide and race the others for the next
//! version: with `n` concurrent writers, each round lets one through and `n - 1` reload. Here
//! each caller starts a round (a task of its own) that waits for the product's turn and then
//! decides everything waiting for that product in one [`Handler::execute_batch`], each
//! reservation against the stock the ones before it left (so stock never goes negative and
//! every decision sees the ones before it); callers that arrive meanwhile queue up and go
//! together in the next round, and their own rounds find nothing left. Conflicts remain only
//! between processes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use orderly_domain::product::{ProductAggregate, ProductCommand};
use orderly_event_store::StreamName;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::CommandError;
use crate::handling::{Envelope, Handler};

/// Commands decided together at most: one append stays far below the store's limit of events
/// per append (each product command appends at most one event).
const MAX_COMBINED: usize = 256;

/// Sends product commands, combining concurrent ones for the same product.
pub(super) struct Coalescer {
    handler: Handler,
    queues: Mutex<HashMap<StreamName, Arc<Queue>>>,
}

#[derive(Default)]
struct Queue {
    waiting: Mutex<Vec<Waiting>>,
    /// Held by the task deciding a round; one round per product at a time.
    turn: tokio::sync::Mutex<()>,
}

struct Waiting {
    envelope: Envelope,
    command: ProductCommand,
    answer: oneshot::Sender<Result<(), CommandError>>,
}

impl Coalescer {
    pub(super) fn new(handler: Handler) -> Self {
        Self {
            handler,
            queues: Mutex::default(),
        }
    }

    /// Decides and appends `command` on `stream`, possibly together with other callers'.
    pub(super) async fn send(
        &self,
        stream: &StreamName,
        envelope: Envelope,
        command: ProductCommand,
    ) -> Result<(), CommandError> {
        let queue = self.queue(stream)?;
        let (answer, mut answered) = oneshot::channel();
        lock(&queue.waiting)?.push(Waiting {
            envelope,
            command,
            answer,
        });
        // The round runs as a task of its own: it carries other lanes' commands, and this
        // caller may be dropped half-way (its lane stops its batch when another order of the
        // batch failed), which must not cancel theirs.
        let round = tokio::spawn(
            {
                let (handler, stream, queue) =
                    (self.handler.clone(), stream.clone(), queue.clone());
                async move {
                    let _turn = queue.turn.lock().await;
                    // Empty when an earlier round took this command along.
                    let round = std::mem::take(&mut *lock(&queue.waiting)?);
                    for chunk in chunks(round) {
                        decide(&handler, &stream, chunk).await;
                    }
                    Ok::<(), CommandError>(())
                }
            }
            .in_current_span(),
        );
        let ended = round.await;
        self.forget_if_idle(stream, &queue);
        // This command was decided by this round or an earlier one, which held the turn
        // before it; whatever became of this round after, that answer stands.
        if let Ok(outcome) = answered.try_recv() {
            return outcome;
        }
        match ended {
            // The queue's lock was poisoned before the round took anything: nor will any.
            Ok(Err(error)) => Err(error),
            // The round that took this command failed half-way (a panic): its outcome is
            // unknown, and trying again is safe.
            _ => Err(CommandError::Unavailable(
                "product round ended unanswered".into(),
            )),
        }
    }

    fn queue(&self, stream: &StreamName) -> Result<Arc<Queue>, CommandError> {
        Ok(lock(&self.queues)?
            .entry(stream.clone())
            .or_default()
            .clone())
    }

    /// Drops an idle product's queue, so the map holds only products in use. A caller that
    /// took the queue just before gets a fresh one next time: two queues for one product only
    /// means an optimistic-concurrency retry, never a wrong decision.
    fn forget_if_idle(&self, stream: &StreamName, queue: &Arc<Queue>) {
        if let Ok(mut queues) = self.queues.lock()
            && Arc::strong_count(queue) == 2
            && queue.waiting.lock().is_ok_and(|waiting| waiting.is_empty())
        {
            queues.remove(stream);
        }
    }
}

/// Decides `round` in one batch on `stream` and answers each caller.
async fn decide(handler: &Handler, stream: &StreamName, round: Vec<Waiting>) {
    let (commands, answers): (Vec<_>, Vec<_>) = round
        .into_iter()
        .map(|waiting| ((waiting.envelope, waiting.command), waiting.answer))
        .unzip();
    match handler
        .execute_batch::<ProductAggregate>(stream, &commands)
        .await
    {
        Ok(outcomes) => {
            for (answer, outcome) in answers.into_iter().zip(outcomes) {
                let _ = answer.send(outcome.map_err(CommandError::Rejected));
            }
        }
        Err(error) => {
            for answer in answers {
                let _ = answer.send(Err(copy(&error)));
            }
        }
    }
}

fn chunks(mut round: Vec<Waiting>) -> Vec<Vec<Waiting>> {
    let mut chunks = Vec::new();
    if round.is_empty() {
        return chunks;
    }
    while round.len() > MAX_COMBINED {
        let rest = round.split_off(MAX_COMBINED);
        chunks.push(round);
        round = rest;
    }
    chunks.push(round);
    chunks
}

fn lock<T>(mutex: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, CommandError> {
    mutex
        .lock()
        .map_err(|_| CommandError::Internal("product command queue poisoned".into()))
}

/// One failure told to every command of a round, keeping whether it is worth a retry.
fn copy(error: &CommandError) -> CommandError {
    match error {
        CommandError::Contended(attempts) => CommandError::Contended(*attempts),
        error if error.is_transient() => CommandError::Unavailable(error.to_string()),
        error => CommandError::Internal(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use chrono::Utc;
    use orderly_domain::values::{Currency, Money, OrderId, ProductName, Quantity, Sku};
    use orderly_event_store::memory::MemoryEventStore;
    use orderly_event_store::{
        AppendResult, EventStore, ExpectedVersion, NewEvent, StoreError, StoreLayer,
    };
    use tokio::sync::Semaphore;
    use uuid::Uuid;

    use super::*;

    /// A store whose appends wait for a permit each; counts the appends that began.
    struct Gated {
        inner: MemoryEventStore,
        permits: Semaphore,
        began: AtomicUsize,
    }

    #[async_trait]
    impl StoreLayer for Gated {
        fn inner(&self) -> &dyn EventStore {
            &self.inner
        }

        async fn append(
            &self,
            stream: &StreamName,
            expected: ExpectedVersion,
            events: Vec<NewEvent>,
        ) -> Result<AppendResult, StoreError> {
            self.began.fetch_add(1, Ordering::SeqCst);
            if let Ok(permit) = self.permits.acquire().await {
                permit.forget();
            }
            self.inner.append(stream, expected, events).await
        }
    }

    fn reserve(n: u128) -> (Envelope, ProductCommand) {
        let command = ProductCommand::ReserveStock {
            order_id: OrderId(Uuid::from_u128(n)),
            quantity: Quantity::new(1).unwrap(),
            reserved_at: Utc::now(),
            placed_at: None,
        };
        (Envelope::request(Uuid::new_v4(), "test"), command)
    }

    async fn began(store: &Gated, appends: usize) {
        while store.began.load(Ordering::SeqCst) < appends {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A lane drops its batch (and so its product command) when another order of the batch
    /// failed; the round that command was deciding carries other lanes' commands too, and
    /// they must still be decided and answered.
    #[tokio::test]
    async fn a_dropped_caller_does_not_cancel_the_round_it_was_deciding() {
        let store = Arc::new(Gated {
            inner: MemoryEventStore::new(),
            permits: Semaphore::new(1),
            began: AtomicUsize::new(0),
        });
        let coalescer = Arc::new(Coalescer::new(Handler::new(store.clone())));
        let stream = StreamName::parse("product-TEA").unwrap();
        let register = ProductCommand::Register {
            sku: Sku::parse("TEA".to_owned()).unwrap(),
            name: ProductName::parse("Tea".to_owned()).unwrap(),
            description: None,
            price: Money::new(650, Currency::parse_listed("EUR").unwrap()).unwrap(),
            initial_stock: 10,
            registered_at: Utc::now(),
        };
        let envelope = Envelope::request(Uuid::new_v4(), "test");
        coalescer.send(&stream, envelope, register).await.unwrap();

        // X's round holds the product's turn in its append; A and B queue behind it.
        let send = |(envelope, command): (Envelope, ProductCommand)| {
            let (coalescer, stream) = (coalescer.clone(), stream.clone());
            tokio::spawn(async move { coalescer.send(&stream, envelope, command).await })
        };
        let x = send(reserve(1));
        began(&store, 2).await;
        let a = send(reserve(2));
        let b = send(reserve(3));
        while lock(&coalescer.queue(&stream).unwrap().waiting)
            .unwrap()
            .len()
            < 2
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // X's append goes through; the next round takes A and B along and waits in its append.
        store.permits.add_permits(1);
        x.await.unwrap().unwrap();
        began(&store, 3).await;
        a.abort();
        let _ = a.await;
        store.permits.add_permits(10);
        let b = tokio::time::timeout(Duration::from_secs(5), b).await;
        assert!(matches!(b, Ok(Ok(Ok(())))), "{b:?}");
        let events = store
            .inner
            .read_stream(&stream, orderly_event_store::Direction::Forwards, None, 10)
            .await
            .unwrap();
        assert_eq!(events.len(), 4, "registered, then X, A and B reserved");
    }
}
