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
/// for a scrape (scrapes that arrive during a collection share the next one, see
/// [`Latest`]), and `after` runs (on the blocking pool) once a scrape's connection is done
/// and its response dropped, at most once a second: the port is open to every local user,
/// and a loop of connections must not queue up work. Runs on its own connection budget,
/// apart from the control socket's.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    collect: Arc<F>,
    budgets: Arc<Budgets>,
    after: fn(),
) where
    F: Fn() -> Result<Stats, String> + Send + Sync + 'static,
{
    let activity = Arc::new(std::sync::Mutex::new(UidActivity::default()));
    let latest = Arc::new(Latest::new(move || {
        let mut stats = collect().map_err(|e| format!("collecting stats: {e}"))?;
        activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(&mut stats, std::time::Instant::now());
        Ok(render(&stats))
    }));
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
        let latest = latest.clone();
        let after = after.clone();
        tokio::spawn(async move {
            let scraped = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let scrape = scraped.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let latest = latest.clone();
                if req.uri().path() == "/metrics" {
                    scrape.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                async move { Ok::<_, Infallible>(respond(req, &latest).await) }
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
/// Where the requests that share a collection wait for its text.
type Waiting = tokio::sync::watch::Receiver<Option<Text>>;

/// Scrapes that arrive during a collection share the next one. One collection runs at a
/// time, in a task of its own (a request that goes away does not stop it or start
/// another); a request that arrives while one runs waits for the next, which starts when
/// it ends and is shared by every request that arrived meanwhile (it is skipped if they
/// have all gone). So a flood of scrapes from local users costs one collection at a time,
/// and no response is older than its request. A text is held while requests wait for it
/// and while their responses are sent (with 65,000 UIDs it is 20 MiB; at most
/// [`MAX_CONNECTIONS`] responses are sent at once, each within [`CONNECTION_LIFETIME`]).
struct Latest {
    collect: Arc<dyn Fn() -> Scraped + Send + Sync>,
    state: std::sync::Mutex<Collections>,
}

#[derive(Default)]
struct Collections {
    /// A collection is running.
    running: bool,
    /// The collection to run when it ends, with its waiting requests.
    next: Option<tokio::sync::watch::Sender<Option<Text>>>,
}

impl Latest {
    fn new(collect: impl Fn() -> Scraped + Send + Sync + 'static) -> Self {
        Self {
            collect: Arc::new(collect),
            state: std::sync::Mutex::new(Collections::default()),
        }
    }

    /// Where a request arriving now waits for its text: the collection it starts, or the
    /// next one.
    fn text(self: &Arc<Self>) -> Waiting {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.running {
            return state
                .next
                .get_or_insert_with(|| tokio::sync::watch::channel(None).0)
                .subscribe();
        }
        state.running = true;
        let (text, waiting) = tokio::sync::watch::channel(None);
        tokio::spawn(self.clone().run(text));
        waiting
    }

    /// Runs collections (on the blocking pool) while requests wait for a next one.
    async fn run(self: Arc<Self>, mut text: tokio::sync::watch::Sender<Option<Text>>) {
        let mut stopped = Stopped {
            latest: &self,
            normally: false,
        };
        loop {
            let collect = self.collect.clone();
            let scraped = tokio::task::spawn_blocking(move || collect())
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!("collecting /metrics failed: {e}");
                    Err("collecting the stats failed (see the agent's log)".to_string())
                });
            text.send_replace(Some(Arc::new(scraped)));
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match state.next.take() {
                Some(next) if !next.is_closed() => text = next,
                _ => {
                    state.running = false;
                    stopped.normally = true;
                    return;
                }
            }
        }
    }
}

/// Clears the collection state when [`Latest::run`] ends other than by returning (a panic,
/// such as `spawn_blocking`'s when no thread can be made, or the runtime dropping it), so
/// later requests start a collection of their own instead of waiting on one that never
/// runs. The requests waiting then get an error.
struct Stopped<'a> {
    latest: &'a Latest,
    normally: bool,
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if !self.normally {
            let mut state = self.latest.state.lock().unwrap_or_else(|p| p.into_inner());
            state.running = false;
            state.next = None;
        }
    }
}

/// The text a request waits for in `waiting`.
async fn text_of(mut waiting: Waiting) -> Text {
    match waiting.wait_for(Option::is_some).await {
        Ok(text) => text.clone().expect("waited for a text"),
        Err(_) => Arc::new(Err("the collection ended without a result".to_string())),
    }
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

async fn respond(req: Request<hyper::body::Incoming>, latest: &Arc<Latest>) -> Response<Chunks> {
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
            // Collected and written on the blocking pool: with 10,000 UIDs that is some
            // 15 ms.
            let scraped = text_of(latest.text()).await;
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

    /// A collection the test lets end: a `Latest` whose collections wait for a release and
    /// say their number.
    struct Gated {
        latest: Arc<Latest>,
        release: std::sync::mpsc::Sender<()>,
        /// Collections started.
        started: Arc<std::sync::atomic::AtomicUsize>,
        /// The most that ran at once.
        most: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Gated {
        fn new() -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            let (release, gate) = std::sync::mpsc::channel::<()>();
            let gate = std::sync::Mutex::new(gate);
            let started = Arc::new(AtomicUsize::new(0));
            let most = Arc::new(AtomicUsize::new(0));
            let running = AtomicUsize::new(0);
            let latest = {
                let (started, most) = (started.clone(), most.clone());
                Arc::new(Latest::new(move || {
                    let n = started.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(running.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    gate.lock().unwrap().recv().expect("released");
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(vec![Bytes::from(format!("collection {n}"))])
                }))
            };
            Self {
                latest,
                release,
                started,
                most,
            }
        }

        /// Waits (at most 5 s) until `check` holds of the state.
        async fn until(&self, what: &str, check: impl Fn(&Self, &Collections) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                {
                    let state = self.latest.state.lock().unwrap();
                    if check(self, &state) {
                        return;
                    }
                }
                assert!(Instant::now() < deadline, "waited 5 s for {what}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        fn started(&self) -> usize {
            self.started.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn most(&self) -> usize {
            self.most.load(std::sync::atomic::Ordering::SeqCst)
        }

        /// A request, in a task of its own.
        fn spawn(&self) -> tokio::task::JoinHandle<String> {
            tokio::spawn(request(self.latest.clone()))
        }

        /// The first request, once its collection has started.
        async fn first(&self) -> tokio::task::JoinHandle<String> {
            let first = self.spawn();
            self.until("the first collection", |g, _| g.started() == 1)
                .await;
            first
        }

        /// Requests waiting for the next collection.
        fn waiting(state: &Collections) -> usize {
            state.next.as_ref().map_or(0, |n| n.receiver_count())
        }
    }

    /// A request's text, as the request sees it; the text itself is let go at once, as a
    /// response lets go of it once sent.
    async fn request(latest: Arc<Latest>) -> String {
        let text = text_of(latest.text()).await;
        let chunks = text.as_ref().as_ref().expect("a text");
        String::from_utf8(chunks.concat()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scrapes_that_arrive_during_a_collection_share_the_next_one() {
        let g = Gated::new();
        let first = g.first().await;
        // Seven requests arrive while the first collection runs: they share the next.
        let waiting: Vec<_> = (0..7).map(|_| g.spawn()).collect();
        g.until("seven waiting", |_, s| Gated::waiting(s) == 7)
            .await;
        g.release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), "collection 1");
        g.release.send(()).unwrap();
        for w in waiting {
            assert_eq!(w.await.unwrap(), "collection 2");
        }
        assert_eq!(g.started(), 2, "two collections for eight");
        // A request after that gets a collection of its own; its text is let go once no
        // request holds it.
        g.until("the collections ended", |_, s| !s.running).await;
        g.release.send(()).unwrap();
        let text = text_of(g.latest.text()).await;
        assert_eq!(text.as_ref().as_ref().unwrap()[0], "collection 3");
        let weak = Arc::downgrade(&text);
        drop(text);
        // The run task lets go of its end of the channel as it returns.
        g.until("the text let go", |_, _| weak.upgrade().is_none())
            .await;
        assert_eq!(g.most(), 1, "one at a time");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_goes_away_neither_stops_its_collection_nor_starts_another() {
        let g = Gated::new();
        let gone = g.first().await;
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        // Arrives while the abandoned collection still runs: waits for the next one.
        let later = g.spawn();
        g.until("one waiting", |_, s| Gated::waiting(s) == 1).await;
        g.release.send(()).unwrap();
        g.release.send(()).unwrap();
        assert_eq!(later.await.unwrap(), "collection 2");
        assert_eq!(g.started(), 2);
        assert_eq!(g.most(), 1, "one at a time");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_next_collection_that_nobody_waits_for_is_skipped() {
        let g = Gated::new();
        let first = g.first().await;
        let gone = g.spawn();
        g.until("one waiting", |_, s| Gated::waiting(s) == 1).await;
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        g.release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), "collection 1");
        g.until("the collections ended", |_, s| !s.running).await;
        assert_eq!(g.started(), 1, "no collection for nobody");
    }

    #[test]
    fn a_run_task_dropped_mid_collection_leaves_the_way_open_for_the_next_request() {
        let g = Gated::new();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let waiting = rt.block_on(async {
            let waiting = g.latest.text();
            g.until("the first collection", |g, _| g.started() == 1)
                .await;
            waiting
        });
        // The runtime goes (as at shutdown) with the run task in its collection.
        rt.shutdown_background();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let text = text_of(waiting).await;
            assert!(text.is_err(), "its waiter gets an error");
            g.until("the state cleared", |_, s| !s.running && s.next.is_none())
                .await;
            let later = g.spawn();
            g.until("a second collection", |g, _| g.started() == 2)
                .await;
            g.release.send(()).unwrap();
            g.release.send(()).unwrap();
            assert_eq!(later.await.unwrap(), "collection 2");
        });
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
