//! Group commit for the shared store: requests that arrive while the database is busy
//! with earlier ones go to it together, in one statement and one transaction.
//!
//! A few workers take requests from one queue. A worker takes the first request that
//! comes and every other one already waiting (up to [`MAX_GROUP`]), runs them as one
//! group, and hands each requester its own answer. Under a light load every request
//! goes alone and at once, as it would without the queue; under a heavy one, a
//! transaction's fixed costs (the round trip, the commit, the wait for the WAL flush)
//! are shared by the group. A group that fails is run again request by request, so
//! one bad request fails alone and every requester gets its own error.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::StoreError;

/// Requests in one group at most.
pub(super) const MAX_GROUP: usize = 64;
/// Requests waiting for a worker at most; a requester beyond waits to queue.
const QUEUE: usize = 1024;

/// What a group runs: one result per request, in their order, or one error for all.
pub(super) trait Run: Send + Sync + 'static {
    type Request: Send + Sync + 'static;
    type Answer: Send + 'static;

    fn run(
        &self,
        requests: &[Self::Request],
    ) -> impl Future<Output = Result<Vec<Self::Answer>, StoreError>> + Send;
}

type Job<T, R> = (T, oneshot::Sender<Result<R, StoreError>>);

/// The requesters' side of a group-commit queue.
pub(super) struct Group<G: Run> {
    tx: mpsc::Sender<Job<G::Request, G::Answer>>,
}

impl<G: Run> Group<G> {
    /// Starts `workers` workers on `tasks`, each running groups with `runner` until
    /// `stop`.
    pub(super) fn start(
        runner: G,
        workers: usize,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let runner = Arc::new(runner);
        for _ in 0..workers.max(1) {
            let (rx, stop, runner) = (rx.clone(), stop.clone(), runner.clone());
            tasks.spawn(async move {
                loop {
                    let jobs = tokio::select! {
                        () = stop.cancelled() => return,
                        jobs = take(&rx) => jobs,
                    };
                    let Some(jobs) = jobs else { return };
                    answer(jobs, &*runner).await;
                }
            });
        }
        Self { tx }
    }

    /// Runs `request` in the next group; its own result.
    pub(super) async fn submit(&self, request: G::Request) -> Result<G::Answer, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((request, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.unwrap_or(Err(StoreError::Closed))
    }
}

/// The next group: the first request to come and those already waiting behind it.
async fn take<T, R>(rx: &Mutex<mpsc::Receiver<Job<T, R>>>) -> Option<Vec<Job<T, R>>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut jobs = vec![first];
    while jobs.len() < MAX_GROUP
        && let Ok(job) = rx.try_recv()
    {
        jobs.push(job);
    }
    Some(jobs)
}

/// Runs a group and answers each requester; a failed group of several is run again one
/// request at a time.
async fn answer<G: Run>(jobs: Vec<Job<G::Request, G::Answer>>, runner: &G) {
    let (requests, replies): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
    match runner.run(&requests).await {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(e) if requests.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
        Err(_) => {
            for (request, reply) in requests.chunks(1).zip(replies) {
                let result = runner.run(request).await.and_then(|mut r| {
                    r.pop()
                        .ok_or_else(|| StoreError::Write("no answer from the database".into()))
                });
                let _ = reply.send(result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    use super::*;

    /// Doubles each number after a pause; fails every group holding a negative one.
    /// Keeps the size of every group it ran.
    #[derive(Default)]
    struct Double {
        sizes: Arc<StdMutex<Vec<usize>>>,
    }

    impl Run for Double {
        type Request = i64;
        type Answer = i64;

        async fn run(&self, requests: &[i64]) -> Result<Vec<i64>, StoreError> {
            self.sizes.lock().unwrap().push(requests.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
            if requests.iter().any(|n| *n < 0) {
                return Err(StoreError::Write(format!("{requests:?} holds a negative")));
            }
            Ok(requests.iter().map(|n| n * 2).collect())
        }
    }

    fn start(workers: usize) -> (Arc<Group<Double>>, Arc<StdMutex<Vec<usize>>>) {
        let runner = Double::default();
        let sizes = runner.sizes.clone();
        let group = Group::start(
            runner,
            workers,
            &TaskTracker::new(),
            &CancellationToken::new(),
        );
        (Arc::new(group), sizes)
    }

    async fn submit_all(group: &Arc<Group<Double>>, numbers: &[i64]) -> Vec<Result<i64, String>> {
        let asks: Vec<_> = numbers
            .iter()
            .map(|&n| {
                let group = group.clone();
                tokio::spawn(async move { group.submit(n).await.map_err(|e| e.to_string()) })
            })
            .collect();
        let mut out = Vec::new();
        for ask in asks {
            out.push(ask.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn requests_that_wait_for_a_busy_worker_run_as_one_group() {
        let (group, sizes) = start(1);
        let numbers: Vec<i64> = (1..=40).collect();
        let answers = submit_all(&group, &numbers).await;
        let doubled: Vec<Result<i64, String>> = numbers.iter().map(|n| Ok(n * 2)).collect();
        assert_eq!(answers, doubled, "each requester gets its own answer");
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 40);
        assert!(
            sizes.len() < 40 && sizes.iter().any(|&n| n > 1),
            "nothing was grouped: {sizes:?}"
        );
    }

    #[tokio::test]
    async fn a_request_alone_goes_at_once() {
        let (group, sizes) = start(2);
        assert_eq!(group.submit(5).await.unwrap(), 10);
        assert_eq!(*sizes.lock().unwrap(), vec![1]);
    }

    #[tokio::test]
    async fn a_failed_group_is_run_again_request_by_request() {
        let (group, sizes) = start(1);
        let answers = submit_all(&group, &[1, 2, -3, 4, 5, 6]).await;
        assert_eq!(
            answers[2],
            Err("store write failed: [-3] holds a negative".into())
        );
        for (i, n) in [(0, 1), (1, 2), (3, 4), (4, 5), (5, 6)] {
            assert_eq!(answers[i], Ok(n * 2), "{answers:?}");
        }
        let sizes = sizes.lock().unwrap().clone();
        assert!(sizes.iter().any(|&n| n > 1), "never grouped: {sizes:?}");
    }
}
