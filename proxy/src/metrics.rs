//! Gateway metrics through the `metrics` facade, exported in Prometheus format on `/metrics`.
//! Every name starts with `pdgate_` and carries its unit; label values come from small fixed sets.

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use pdgate_scheduler::Scheduler;
use pdgate_scheduler::{Decision, Rejection, Role};
use std::sync::OnceLock;
use std::time::Duration;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once; later calls (tests, several gateways in one
/// process) share it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            let decision = [1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 5e-4, 1e-3, 1e-2];
            let error = [
                -5.0, -1.0, -0.5, -0.1, -0.05, -0.01, 0.0, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ];
            // More specific matchers first: the first match sets a metric's buckets.
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("pdgate_scheduler_decision_duration_seconds".into()),
                    &decision,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("pdgate_ttft_prediction_error_seconds".into()),
                        &error,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("pdgate_kv_events_lag_seconds".into()),
                        &[
                            1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 1.0, 5.0,
                        ],
                    )
                })
                .and_then(|b| {
                    // Refusals are answered from the gateway's own state: sub-millisecond
                    // buckets, so the 5 ms target can be read off the histogram.
                    b.set_buckets_for_metric(
                        Matcher::Full("pdgate_refusal_duration_seconds".into()),
                        &[
                            5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0,
                        ],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; then ours stays empty but harmless.
            let _ = metrics::set_global_recorder(recorder);
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// Histogram samples queue in the recorder until something drains them; a gateway nobody
/// scrapes would grow that queue without bound, so it is drained on a timer too.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("pdgate-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no metrics upkeep thread; histograms drain only on scrape");
    }
}

const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// One client request answered; `model` is the configured name it resolved to, or `""` when it
/// named none the gateway serves (so the label stays bounded).
pub fn request_done(api: &'static str, model: &str, status: u16, elapsed: Duration) {
    counter!("pdgate_requests_total", "api" => api, "model" => model.to_string(), "status" => status_class(status)).increment(1);
    histogram!("pdgate_request_duration_seconds", "api" => api).record(elapsed.as_secs_f64());
    if is_refusal(status) {
        histogram!("pdgate_refusal_duration_seconds").record(elapsed.as_secs_f64());
    }
}

/// Load shedding (429, 503; both carry `Retry-After`): what a client under overload is told to
/// come back later with, and must get fast.
fn is_refusal(status: u16) -> bool {
    matches!(status, 429 | 503)
}

pub fn first_token(elapsed: Duration) {
    histogram!("pdgate_time_to_first_token_seconds").record(elapsed.as_secs_f64());
}

/// A handoff whose `side` engine was told to mark its copy of the prompt evicted first.
pub fn one_copy_handoff(side: Role) {
    counter!("pdgate_kv_one_copy_handoffs_total", "evict_first" => side.as_str()).increment(1);
}

/// Blocks a prefill pulled from another instance's cache instead of computing them.
pub fn kv_pulled(blocks: u64) {
    if blocks > 0 {
        counter!("pdgate_kv_pulled_blocks_total").increment(blocks);
    }
}

pub fn leg(role: Role, outcome: &'static str) {
    counter!("pdgate_legs_total", "role" => role.as_str(), "outcome" => outcome).increment(1);
}

pub fn kv_handoff(blocks: u64, bytes: u64, cached_tokens: u64, transfer: Duration) {
    counter!("pdgate_kv_transfer_blocks_total").increment(blocks);
    counter!("pdgate_kv_transfer_bytes_total").increment(bytes);
    counter!("pdgate_prefix_cached_tokens_total").increment(cached_tokens);
    histogram!("pdgate_kv_transfer_duration_seconds").record(transfer.as_secs_f64());
}

/// One scheduling decision: its latency and outcome.
pub fn decision(
    model: &str,
    policy: &'static str,
    took: Duration,
    result: &Result<Decision, Rejection>,
) {
    histogram!("pdgate_scheduler_decision_duration_seconds").record(took.as_secs_f64());
    let outcome = match result {
        Ok(d) if d.prefill.is_some() => "disaggregated",
        Ok(_) => "local_prefill",
        Err(_) => "rejected",
    };
    counter!("pdgate_scheduler_decisions_total", "model" => model.to_string(), "policy" => policy, "outcome" => outcome)
        .increment(1);
    if let Ok(d) = result {
        counter!("pdgate_prefix_hit_blocks_total").increment(u64::from(d.cached_blocks));
        if d.late {
            counter!("pdgate_late_admissions_total", "model" => model.to_string()).increment(1);
        }
    }
}

/// Observed minus predicted time to first token.
pub fn ttft_prediction_error(observed: Duration, predicted_ms: f64) {
    histogram!("pdgate_ttft_prediction_error_seconds")
        .record(observed.as_secs_f64() - predicted_ms / 1000.0);
}

/// A request's failed attempt before its first byte: retried on another instance of `role`
/// (`outcome` = `retried`), or not for want of budget (`budget_exhausted`).
pub fn retry(role: Role, outcome: &'static str) {
    counter!("pdgate_retries_total", "role" => role.as_str(), "outcome" => outcome).increment(1);
}

/// A decode stream that broke after its head went out: continued on another decode (`ok`), or
/// not (`failed`, `refused_unsafe`, `limit`, `budget_exhausted`, `finished`).
pub fn migration(outcome: &'static str) {
    counter!("pdgate_migrations_total", "outcome" => outcome).increment(1);
}

/// From a stream's break to its continuation's head: the gap the client saw in its stream,
/// beyond the decode's own pace.
pub fn migration_gap(took: Duration) {
    histogram!("pdgate_migration_gap_seconds").record(took.as_secs_f64());
}

/// A circuit breaker changed state (`to`: open, half_open, closed); `open_now`: breakers of
/// that role not closed after the change.
pub fn breaker(role: Role, to: &'static str, open_now: usize) {
    counter!("pdgate_breaker_transitions_total", "role" => role.as_str(), "to" => to).increment(1);
    gauge!("pdgate_breakers_open", "role" => role.as_str()).set(open_now as f64);
}

/// Every prefill failed and the decode instance prefilled the request itself.
pub fn fallback() {
    counter!("pdgate_fallbacks_total", "to" => "decode_prefill").increment(1);
}

/// A reload of the client listener's certificate: `ok` or `error` (the old one kept).
pub fn tls_reload(outcome: &'static str) {
    counter!("pdgate_tls_reloads_total", "outcome" => outcome).increment(1);
}

/// A client connection whose TLS handshake did not complete: `timeout` or `error`.
pub fn tls_handshake_failed(reason: &'static str) {
    counter!("pdgate_tls_handshake_failures_total", "reason" => reason).increment(1);
}

pub fn rejected(reason: &'static str) {
    counter!("pdgate_rejections_total", "reason" => reason).increment(1);
}

/// An API key's request turned away by its limits (`reason`: rate, concurrency).
pub fn rate_limited(reason: &'static str) {
    counter!("pdgate_rate_limited_total", "reason" => reason).increment(1);
}

/// Segment-registry entries held (stale ones not yet purged included).
pub fn registry_entries(held: usize) {
    gauge!("pdgate_registry_segments").set(held as f64);
}

/// One model's healthy workers per role and its prefix index's size.
pub fn record_health(model: &str, s: &Scheduler) {
    let (p, d) = s.healthy_counts();
    let index_bytes = s.index_bytes();
    gauge!("pdgate_scheduler_index_bytes", "model" => model.to_string()).set(index_bytes as f64);
    gauge!("pdgate_workers_healthy", "model" => model.to_string(), "role" => "prefill")
        .set(p as f64);
    gauge!("pdgate_workers_healthy", "model" => model.to_string(), "role" => "decode")
        .set(d as f64);
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A worker joined or left the fleet (`change`: `added` or `removed`).
pub fn membership(model: &str, role: Role, change: &'static str) {
    counter!("pdgate_worker_membership_changes_total", "model" => model.to_string(), "role" => role.as_str(), "change" => change)
        .increment(1);
}

/// One discovery event (`source`: `kubernetes` or `dns`; `kind`: what happened).
pub fn discovery_event(source: &'static str, kind: &'static str) {
    counter!("pdgate_discovery_events_total", "source" => source, "kind" => kind).increment(1);
}

/// Workers a discovery source currently holds in one model's fleet, per role.
pub fn discovery_workers(source: &'static str, model: &str, role: Role, n: usize) {
    gauge!("pdgate_discovery_workers", "source" => source, "model" => model.to_string(), "role" => role.as_str()).set(n as f64);
}
