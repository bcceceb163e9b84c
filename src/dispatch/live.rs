//! The live config: the snapshot every event loads at arrival, and the word of each new
//! one for the tasks that must react (delivery lanes waiting on a disabled handler, the
//! reloader). One handle, given to the server, the delivery workers and the reloader, so
//! that none of them needs the others.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};
use tokio::sync::watch;

use super::Snapshot;

#[derive(Debug)]
pub struct Live {
    current: ArcSwap<Snapshot>,
    /// The generation of `current`, for subscribers.
    generation: watch::Sender<u64>,
    /// The name of every handler of every config made live here since start: a
    /// delivery whose handler is gone was removed by a reload if it is in here, and was
    /// absent from the start otherwise.
    had: Mutex<HashSet<String>>,
}

impl Live {
    pub fn new(snapshot: Snapshot) -> Arc<Self> {
        let (generation, _) = watch::channel(snapshot.generation);
        crate::metrics::generation(snapshot.generation);
        crate::metrics::handlers(&snapshot.config);
        let had = Mutex::new(names(&snapshot));
        Arc::new(Self {
            current: ArcSwap::from_pointee(snapshot),
            generation,
            had,
        })
    }

    /// The live snapshot, for a look.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The live snapshot, to keep: an event holds it to the end.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Makes `snapshot` the live config: events that arrive from now on use it, events in
    /// flight finish with the one they started with. Subscribers are told.
    pub fn publish(&self, snapshot: Snapshot) {
        let generation = snapshot.generation;
        crate::metrics::handlers(&snapshot.config);
        self.had
            .lock()
            .expect("not poisoned")
            .extend(names(&snapshot));
        self.current.store(Arc::new(snapshot));
        self.generation.send_replace(generation);
        crate::metrics::generation(generation);
    }

    /// Whether a config made live here since start had a handler `name`.
    pub fn had(&self, name: &str) -> bool {
        self.had.lock().expect("not poisoned").contains(name)
    }

    /// A receiver that sees the generation of every snapshot published from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

fn names(snapshot: &Snapshot) -> HashSet<String> {
    snapshot
        .config
        .handlers
        .iter()
        .map(|h| h.name.clone())
        .collect()
}
