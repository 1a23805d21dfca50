//! Per-API-key limits on the data plane: a token bucket for the request rate and a count of the
//! requests in flight. A request over either is refused at once (429 with `Retry-After`), never
//! queued: a queue would hold the client's connection and the gateway's memory for a key that
//! already asks for more than it may have.
//!
//! The budgets are fixed at start, one per configured key (index = the key's position), so no
//! client input ever adds an entry.

use crate::config::RateLimitConfig;
use crate::error::ApiError;
use axum::body::{Body, Bytes, HttpBody};
use axum::response::Response;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Every key's budgets.
pub struct Limits {
    rate: Option<Rate>,
    buckets: Vec<Mutex<Bucket>>,
    in_flight: Vec<Arc<Semaphore>>,
}

#[derive(Clone, Copy)]
struct Rate {
    per_sec: f64,
    burst: f64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes one token, or says how long until one is there.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate.per_sec;
        self.tokens = (self.tokens + refill).min(rate.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / rate.per_sec))
    }
}

impl Limits {
    /// `keys` budgets (at least one: without keys every caller shares one).
    pub fn new(cfg: &RateLimitConfig, keys: usize) -> Result<Self, String> {
        let per_sec = cfg.requests_per_second;
        if !per_sec.is_finite() || per_sec < 0.0 {
            return Err(format!(
                "server.rate_limit.requests_per_second must be a number >= 0 (got {per_sec})"
            ));
        }
        if per_sec == 0.0 && cfg.burst > 0 {
            return Err("server.rate_limit.burst needs requests_per_second (the refill)".into());
        }
        let rate = (per_sec > 0.0).then(|| Rate {
            per_sec,
            burst: match cfg.burst {
                0 => per_sec.ceil().max(1.0),
                n => f64::from(n),
            },
        });
        let keys = keys.max(1);
        let now = Instant::now();
        let buckets = match rate {
            Some(r) => (0..keys)
                .map(|_| {
                    Mutex::new(Bucket {
                        tokens: r.burst,
                        at: now,
                    })
                })
                .collect(),
            None => Vec::new(),
        };
        let in_flight = match cfg.max_concurrent {
            0 => Vec::new(),
            n => (0..keys)
                .map(|_| Arc::new(Semaphore::new(n as usize)))
                .collect(),
        };
        Ok(Self {
            rate,
            buckets,
            in_flight,
        })
    }

    /// Admits one request of key `key` now, or refuses it with 429. The permit, when a
    /// concurrency limit is set, is the request's slot until it is dropped.
    pub fn admit(&self, key: usize) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        // The slot first: a request refused for concurrency must not spend a token.
        let permit = match self.in_flight.get(key) {
            Some(sem) => match Arc::clone(sem).try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    crate::metrics::rate_limited("concurrency");
                    return Err(ApiError::rejected(
                        "concurrency_limit_exceeded",
                        "too many requests of this API key in flight; retry when one finished",
                        1,
                    ));
                }
            },
            None => None,
        };
        if let (Some(rate), Some(bucket)) = (self.rate, self.buckets.get(key)) {
            if let Err(wait) = bucket.lock().take(rate, Instant::now()) {
                crate::metrics::rate_limited("rate");
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                return Err(ApiError::rejected(
                    "rate_limit_exceeded",
                    format!("rate limit of this API key reached; retry in {secs} s"),
                    secs,
                ));
            }
        }
        Ok(permit)
    }
}

/// Keeps `permit` until the response's body has been sent (or dropped): a streamed answer holds
/// its key's slot for as long as it streams.
pub fn hold_until_body_ends(resp: Response, permit: Option<OwnedSemaphorePermit>) -> Response {
    match permit {
        None => resp,
        Some(permit) => resp.map(|body| {
            Body::new(Holding {
                body,
                _permit: permit,
            })
        }),
    }
}

struct Holding {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl HttpBody for Holding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rps: f64, burst: u32, max_concurrent: u32, keys: usize) -> Limits {
        Limits::new(
            &RateLimitConfig {
                requests_per_second: rps,
                burst,
                max_concurrent,
            },
            keys,
        )
        .expect("valid")
    }

    #[test]
    fn a_bucket_gives_its_burst_then_one_token_per_interval() {
        let rate = Rate {
            per_sec: 2.0,
            burst: 3.0,
        };
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 3.0,
            at: t0,
        };
        for _ in 0..3 {
            assert!(b.take(rate, t0).is_ok());
        }
        assert_eq!(b.take(rate, t0), Err(Duration::from_millis(500)));
        assert!(b.take(rate, t0 + Duration::from_millis(500)).is_ok());
        // A long quiet spell refills to the burst, no further.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(b.take(rate, later).is_ok());
        }
        assert!(b.take(rate, later).is_err());
    }

    #[test]
    fn keys_have_their_own_budgets() {
        let l = limits(0.001, 2, 0, 2);
        assert!(l.admit(0).is_ok() && l.admit(0).is_ok());
        let e = l.admit(0).expect_err("third of key 0");
        assert_eq!(e.status, http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.code, Some("rate_limit_exceeded"));
        assert!(e.retry_after_secs.is_some_and(|s| s >= 900), "{e:?}");
        assert!(l.admit(1).is_ok(), "key 1 is untouched");
    }

    #[test]
    fn concurrency_is_counted_until_the_permit_drops_and_spends_no_token() {
        let l = limits(0.001, 2, 1, 1);
        let first = l.admit(0).expect("first").expect("a permit");
        let e = l.admit(0).expect_err("second while the first runs");
        assert_eq!(e.code, Some("concurrency_limit_exceeded"));
        drop(first);
        assert!(l.admit(0).is_ok(), "the refused one spent no token");
    }

    #[test]
    fn no_limits_by_default_and_nonsense_refused() {
        let l = limits(0.0, 0, 0, 3);
        for _ in 0..10_000 {
            assert!(matches!(l.admit(2), Ok(None)));
        }
        let bad = |rps, burst| {
            Limits::new(
                &RateLimitConfig {
                    requests_per_second: rps,
                    burst,
                    max_concurrent: 0,
                },
                1,
            )
            .is_err()
        };
        assert!(bad(-1.0, 0) && bad(f64::NAN, 0) && bad(0.0, 5));
        assert_eq!(limits(2.5, 0, 0, 1).rate.map(|r| r.burst), Some(3.0));
    }
}
