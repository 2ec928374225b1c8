//! `/metrics`: the same [`Stats`] model the control socket serves, written as Prometheus
//! text (metric families built per scrape from the model, so counters are the kernel's
//! own values, not re-counted here; see [`render`] for why the text is written directly).
//!
//! Names are `rlagent_*` in base units (`_seconds_total`, `_bytes`), label `target` on
//! cgroup series and `uid` on connection series. Per-UID series exist for UIDs the
//! connection maps know (a UID with a cap or a connection since the maps were created),
//! so their number is bounded by the map size (262,144), and further by activity
//! ([`UidActivity`]).

mod cardinality;
mod render;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hyper::{
    body::{Bytes, Frame, SizeHint},
    Request, Response, StatusCode,
};

pub use cardinality::{UidActivity, UID_ACTIVITY_WINDOW};
pub use render::render;

use crate::observe::{
    budget::{Budget, Budgets},
    stats::Stats,
};

/// Connections served at once; more are accepted and closed at once (and counted), so a
/// flood of idle connections holds at most this many descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request, and the longest a connection lives.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Serves `/metrics` over HTTP/1.1, one request per connection; `collect` builds the stats
/// for each scrape, and `after` runs (on the blocking pool) once a scrape's connection is
/// done and its response dropped, at most once a second: the port is open to every local
/// user, and a loop of connections must not queue up work. Runs on its own connection
/// budget, apart from the control socket's.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    collect: Arc<F>,
    budgets: Arc<Budgets>,
    after: fn(),
) where
    F: Fn() -> Result<Stats, String> + Send + Sync + 'static,
{
    let activity = Arc::new(std::sync::Mutex::new(UidActivity::default()));
    let latest = Arc::new(Latest::default());
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let after = Arc::new(AfterScrape::new(after));
    loop {
        let (stream, _peer): (_, SocketAddr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            budgets.exhausted(Budget::MetricsConnections, MAX_CONNECTIONS);
            drop(stream);
            continue;
        };
        let collect = collect.clone();
        let activity = activity.clone();
        let latest = latest.clone();
        let after = after.clone();
        tokio::spawn(async move {
            let scraped = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let scrape = scraped.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let arrived = Instant::now();
                let collect = collect.clone();
                let activity = activity.clone();
                let latest = latest.clone();
                if req.uri().path() == "/metrics" {
                    scrape.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                async move {
                    let scrape = Scrape {
                        arrived,
                        collect,
                        activity,
                        latest,
                    };
                    Ok::<_, Infallible>(respond(req, scrape).await)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            if scraped.load(std::sync::atomic::Ordering::Relaxed) {
                after.scraped().await;
            }
            drop(permit);
        });
    }
}

/// A scrape's text, or why there is none.
type Scraped = Result<Vec<Bytes>, String>;
/// A scrape's text, shared by the requests that waited for it.
type Text = Arc<Scraped>;

/// Scrapes that come together share one collection. One collection runs at a time, and a
/// request takes the text of a collection that started after the request arrived, else
/// starts one: a flood of scrapes from local users costs at most one collection at a time
/// (not one per connection), and no response is older than its request.
#[derive(Default)]
struct Latest {
    /// When the last collection started, and its text while a response still holds it
    /// (kept no longer: with 65,000 UIDs it is 20 MiB).
    last: tokio::sync::Mutex<Option<(Instant, std::sync::Weak<Scraped>)>>,
}

impl Latest {
    /// The text for a request that arrived at `arrived`: shared, or from `collect` (run on
    /// the blocking pool).
    async fn get<C>(&self, arrived: Instant, collect: C) -> Text
    where
        C: FnOnce() -> Scraped + Send + 'static,
    {
        let mut last = self.last.lock().await;
        if let Some((started, text)) = &*last {
            if let Some(text) = text.upgrade().filter(|_| *started >= arrived) {
                return text;
            }
        }
        let started = Instant::now();
        let text = Arc::new(
            tokio::task::spawn_blocking(collect)
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
        );
        *last = Some((started, Arc::downgrade(&text)));
        text
    }
}

/// What answering a scrape needs.
struct Scrape<F> {
    arrived: Instant,
    collect: Arc<F>,
    activity: Arc<std::sync::Mutex<UidActivity>>,
    latest: Arc<Latest>,
}

/// The work after scrapes: run after a scrape when the last run is a second ago or more,
/// else once, a second after the last run, for all the scrapes in between.
struct AfterScrape {
    run: fn(),
    /// When it last ran, and whether a run is already set for later.
    state: std::sync::Mutex<(Option<Instant>, bool)>,
}

/// What to do after a scrape.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Now,
    At(Instant),
    /// A run is set for later already.
    Nothing,
}

impl AfterScrape {
    fn new(run: fn()) -> Self {
        Self {
            run,
            state: std::sync::Mutex::new((None, false)),
        }
    }

    fn next(&self, now: Instant) -> Next {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match *state {
            (_, true) => Next::Nothing,
            (Some(last), false) if now.saturating_duration_since(last) < Duration::from_secs(1) => {
                state.1 = true;
                Next::At(last + Duration::from_secs(1))
            }
            _ => {
                *state = (Some(now), false);
                Next::Now
            }
        }
    }

    /// The run set for later runs at `now`.
    fn ran_later(&self, now: Instant) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = (Some(now), false);
    }

    /// After a scrape's connection: runs now (on the blocking pool), or sets the run for
    /// later.
    async fn scraped(self: &Arc<Self>) {
        match self.next(Instant::now()) {
            Next::Now => {
                let _ = tokio::task::spawn_blocking(self.run).await;
            }
            Next::At(at) => {
                let this = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    this.ran_later(Instant::now());
                    let _ = tokio::task::spawn_blocking(this.run).await;
                });
            }
            Next::Nothing => {}
        }
    }
}

/// A response body sent as the pieces it was written in, with its length known up front
/// (so it goes out with a Content-Length). http-body-util's `StreamBody` over an iterator
/// would do the same through a futures-util stream; these few lines spare that crate.
struct Chunks {
    chunks: std::collections::VecDeque<Bytes>,
    remaining: u64,
}

impl Chunks {
    fn new(chunks: Vec<Bytes>) -> Self {
        Self {
            remaining: chunks.iter().map(|c| c.len() as u64).sum(),
            chunks: chunks.into(),
        }
    }
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let next = self.chunks.pop_front();
        if let Some(chunk) = &next {
            self.remaining -= chunk.len() as u64;
        }
        std::task::Poll::Ready(next.map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

async fn respond<F>(req: Request<hyper::body::Incoming>, scrape: Scrape<F>) -> Response<Chunks>
where
    F: Fn() -> Result<Stats, String> + Send + Sync + 'static,
{
    let reply = |status: StatusCode, content_type: &str, body: Vec<Bytes>| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Chunks::new(body))
            .expect("static response parts")
    };
    let text = |s: String| vec![Bytes::from(s)];
    match req.uri().path() {
        "/metrics" => {
            let Scrape {
                arrived,
                collect,
                activity,
                latest,
            } = scrape;
            // Collected and written on the blocking pool: with 10,000 UIDs that is some
            // 15 ms.
            let scraped = latest
                .get(arrived, move || {
                    let mut stats = collect().map_err(|e| format!("collecting stats: {e}"))?;
                    activity
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(&mut stats, std::time::Instant::now());
                    Ok(render(&stats))
                })
                .await;
            match &*scraped {
                Ok(chunks) => reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    chunks.clone(),
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    text(format!("{e}\n")),
                ),
            }
        }
        "/" => reply(
            StatusCode::OK,
            "text/plain",
            text("rlagent: metrics at /metrics\n".to_string()),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            text("not found; metrics are at /metrics\n".to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_after_scrapes_runs_at_most_once_a_second_and_once_after_the_last() {
        let after = AfterScrape::new(|| {});
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(after.next(at(0)), Next::Now, "never ran: now");
        assert_eq!(
            after.next(at(100)),
            Next::At(at(1000)),
            "set for a second later"
        );
        assert_eq!(after.next(at(200)), Next::Nothing, "already set");
        assert_eq!(
            after.next(at(1100)),
            Next::Nothing,
            "until the later run has run"
        );
        after.ran_later(at(1200));
        assert_eq!(after.next(at(1300)), Next::At(at(2200)));
        after.ran_later(at(2200));
        assert_eq!(
            after.next(at(3300)),
            Next::Now,
            "a second after the last run"
        );
    }

    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn count_run() {
        RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits (at most 5 s) until the work has run `n` times.
    async fn runs_reach(n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while RUNS.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "ran {RUNS:?} times, not {n}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn scrapes_within_a_second_of_a_run_get_one_run_a_second_later() {
        let after = Arc::new(AfterScrape::new(count_run));
        let runs = || RUNS.load(std::sync::atomic::Ordering::SeqCst);
        after.scraped().await;
        assert_eq!(runs(), 1, "the first scrape's work runs at once");
        after.scraped().await;
        after.scraped().await;
        assert_eq!(runs(), 1, "within the second: set for later");
        runs_reach(2).await;
        // The later run cleared the way: another scrape within a second of it gets one too.
        after.scraped().await;
        runs_reach(3).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(runs(), 3, "one run for each, no more");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scrapes_that_arrive_during_a_collection_share_the_next_one() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let latest = Arc::new(Latest::default());
        let started = Arc::new(AtomicUsize::new(0));
        let collect = |started: &Arc<AtomicUsize>| {
            let started = started.clone();
            move || {
                let n = started.fetch_add(1, Ordering::SeqCst) + 1;
                std::thread::sleep(Duration::from_millis(100));
                Ok(vec![Bytes::from(format!("collection {n}\n"))])
            }
        };
        let first = {
            let (latest, collect) = (latest.clone(), collect(&started));
            tokio::spawn(async move { latest.get(Instant::now(), collect).await })
        };
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Seven requests arrive while the first collection runs: it started before them,
        // so they wait and share one more.
        let waiting: Vec<_> = (0..7)
            .map(|_| {
                let (latest, collect) = (latest.clone(), collect(&started));
                let arrived = Instant::now();
                tokio::spawn(async move { latest.get(arrived, collect).await })
            })
            .collect();
        let first = first.await.unwrap();
        let mut texts = Vec::new();
        for w in waiting {
            texts.push(w.await.unwrap());
        }
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "two collections for eight"
        );
        assert_eq!(first.as_ref().as_ref().unwrap()[0], "collection 1\n");
        for t in &texts {
            assert!(Arc::ptr_eq(t, &texts[0]), "the seven share one text");
        }
        assert_eq!(texts[0].as_ref().as_ref().unwrap()[0], "collection 2\n");
        // A request after that collection ended gets a new one, while the old text is
        // still held.
        let later = latest.get(Instant::now(), collect(&started)).await;
        assert_eq!(later.as_ref().as_ref().unwrap()[0], "collection 3\n");
    }

    #[test]
    fn a_chunked_body_says_its_length_and_ends_after_its_chunks() {
        use hyper::body::Body;
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut body = Chunks::new(vec![Bytes::from("ab"), Bytes::from("cde")]);
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        let mut got = Vec::new();
        while let std::task::Poll::Ready(Some(frame)) =
            std::pin::Pin::new(&mut body).poll_frame(&mut cx)
        {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
            assert_eq!(body.size_hint().exact(), Some(5 - got.len() as u64));
        }
        assert_eq!(got, b"abcde");
        assert!(body.is_end_stream());
        let empty = Chunks::new(vec![]);
        assert_eq!(empty.size_hint().exact(), Some(0));
        assert!(empty.is_end_stream());
    }
}
