//! Product commands from many orders at once, combined into one append per product.
//!
//! Many lanes reserve stock of the same product at the same time (a flash sale). Sent one by
//! one, every reservation would load the product, decide and race the others for the next
//! version: with `n` concurrent writers, each round lets one through and `n - 1` reload. Here
//! the first caller for a product takes its turn and decides everything waiting for that
//! product in one [`Handler::execute_batch`], each reservation against the stock the ones
//! before it left (so stock never goes negative and every decision sees the ones before it);
//! callers that arrive meanwhile queue up and go together in the next round. Conflicts remain
//! only between processes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use orderly_domain::product::{ProductAggregate, ProductCommand};
use orderly_event_store::StreamName;
use tokio::sync::oneshot;

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
    /// Held by the caller deciding a round; one round per product at a time.
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
        let (answer, answered) = oneshot::channel();
        lock(&queue.waiting)?.push(Waiting {
            envelope,
            command,
            answer,
        });
        {
            let _turn = queue.turn.lock().await;
            // Empty when an earlier round took this command along.
            let round = std::mem::take(&mut *lock(&queue.waiting)?);
            for chunk in chunks(round) {
                self.decide(stream, chunk).await;
            }
        }
        self.forget_if_idle(stream, &queue);
        // A round dropped half-way (its caller was cancelled) answers nothing: try again.
        answered
            .await
            .unwrap_or_else(|_| Err(CommandError::Unavailable("product round cancelled".into())))
    }

    async fn decide(&self, stream: &StreamName, round: Vec<Waiting>) {
        let (commands, answers): (Vec<_>, Vec<_>) = round
            .into_iter()
            .map(|waiting| ((waiting.envelope, waiting.command), waiting.answer))
            .unzip();
        match self
            .handler
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
