//! The open-loop replayer: dispatches each request at its due time whatever the server is
//! doing, streams the reply, and records vLLM-bench timings per request, with a live progress bar.
//!
//! Three bounded stages: a preparer thread synthesises prompts and request bodies ahead of time
//! into a bounded channel (so dispatch never waits on text generation unless it outruns it, and
//! memory holds a window, not the trace); the dispatcher sleeps until each due time and spawns the
//! request; a collector gathers records. In-flight requests are capped by `max_in_flight`: at the
//! cap the dispatcher waits for a slot and the wait shows up as dispatch lateness — it never
//! queues without bound and never silently shifts the schedule.

use crate::arrivals::Mode;
use crate::client::{self, Target};
use crate::error::Result;
use crate::metrics::RequestRecord;
use crate::scrape::{self, ServerStats};
use crate::synth::Synth;
use crate::trace::types::Trace;
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

/// Prepared request bodies kept ahead of the dispatcher.
const PREPARE_AHEAD: usize = 256;

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub target: Target,
    pub mode: Mode,
    pub max_requests: Option<usize>,
    /// Stop dispatching after this long (in-flight requests still finish).
    pub duration: Option<Duration>,
    pub max_in_flight: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    pub progress: bool,
    /// Read server counters before and after (pdgate `/metrics` and `/admin/workers`).
    pub scrape: bool,
    pub admin_token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ReplayOutcome {
    /// One record per dispatched request, in trace order.
    pub records: Vec<RequestRecord>,
    /// Requests of the trace never dispatched (`--duration` ran out).
    pub not_sent: usize,
    pub server: Option<ServerStats>,
    pub wall_s: f64,
}

struct Prepared {
    index: usize,
    body: Bytes,
    input_tokens: u32,
}

pub async fn run(trace: Trace, synth: Synth, opts: ReplayOptions) -> Result<ReplayOutcome> {
    let n = opts
        .max_requests
        .map_or(trace.requests.len(), |m| m.min(trace.requests.len()));
    let schedule = opts.mode.schedule(&trace);
    let cap = match opts.mode {
        Mode::Closed { concurrency } => concurrency.min(opts.max_in_flight.max(1)),
        _ => opts.max_in_flight.max(1),
    };
    let http = client::http_client(opts.timeout, cap)?;
    let before = if opts.scrape {
        scrape::snapshot(&http, &opts.target.base_url, opts.admin_token.as_deref()).await
    } else {
        None
    };

    let (prep_tx, mut prep_rx) = mpsc::channel::<Prepared>(PREPARE_AHEAD);
    let target = opts.target.clone();
    let preparer = std::thread::spawn(move || {
        for req in trace.requests.iter().take(n) {
            let body = target.body(&synth.prompt(req), req.output_tokens);
            let item = Prepared {
                index: req.index,
                body,
                input_tokens: req.input_tokens,
            };
            if prep_tx.blocking_send(item).is_err() {
                return; // the dispatcher stopped early
            }
        }
    });

    let bar = progress_bar(n as u64, opts.progress);
    let in_flight = Arc::new(Semaphore::new(cap));
    let (done_tx, mut done_rx) = mpsc::channel::<RequestRecord>(cap + 1);
    let errors = Arc::new(AtomicU64::new(0));
    let collector = {
        let bar = bar.clone();
        let errors = Arc::clone(&errors);
        tokio::spawn(async move {
            let mut records = Vec::with_capacity(n);
            while let Some(r) = done_rx.recv().await {
                if !r.ok() {
                    errors.fetch_add(1, Relaxed);
                }
                bar.inc(1);
                bar.set_message(format!("errors {}", errors.load(Relaxed)));
                records.push(r);
            }
            records
        })
    };

    let t0 = Instant::now();
    let since = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    let mut dispatched = 0usize;
    let target = Arc::new(opts.target.clone());
    while let Some(item) = prep_rx.recv().await {
        let due_ms = schedule.as_ref().and_then(|s| s.get(item.index).copied());
        if let Some(due) = due_ms {
            let due_at = t0 + Duration::from_secs_f64(due / 1e3);
            if opts.duration.is_some_and(|d| due_at > t0 + d) {
                break;
            }
            tokio::time::sleep_until(due_at.into()).await;
        } else if opts.duration.is_some_and(|d| t0.elapsed() > d) {
            break;
        }
        // At the cap this waits; the wait is lateness, reported, not hidden.
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        let sent = Instant::now();
        let mut rec = RequestRecord {
            index: item.index,
            scheduled_ms: due_ms.unwrap_or_else(|| since(sent)),
            sent_ms: since(sent),
            input_tokens: item.input_tokens,
            ..RequestRecord::default()
        };
        let (http, target, done_tx) = (http.clone(), Arc::clone(&target), done_tx.clone());
        tokio::spawn(async move {
            client::send(&http, &target, item.body, sent, &mut rec).await;
            drop(permit);
            let _ = done_tx.send(rec).await;
        });
        dispatched += 1;
    }
    drop(prep_rx);
    drop(done_tx);
    let _ = tokio::task::spawn_blocking(move || preparer.join()).await;
    let mut records = collector.await.unwrap_or_default();
    records.sort_by_key(|r| r.index);
    let wall_s = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let server = match (before, opts.scrape) {
        (Some(b), true) => {
            scrape::snapshot(&http, &opts.target.base_url, opts.admin_token.as_deref())
                .await
                .map(|a| scrape::delta(&b, &a))
        }
        _ => None,
    };
    Ok(ReplayOutcome {
        not_sent: n - dispatched,
        records,
        server,
        wall_s,
    })
}

fn progress_bar(n: u64, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr_with_hz(4));
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] {pos}/{len} done ({per_sec}) {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}
