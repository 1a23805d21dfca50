//! How fast the replayer can dispatch, against an instant engine (a stub that answers every
//! completion with a one-token SSE stream at once), and how late it dispatches at 1,000 req/s.
//! `cargo bench -p pdgate-loadtest --bench dispatch`. Client and stub share this machine's cores,
//! so the figures are a floor for the replayer alone.

use axum::routing::post;
use axum::serve::ListenerExt;
use axum::Router;
use pdgate_loadtest::arrivals::Mode;
use pdgate_loadtest::client::{Api, Target};
use pdgate_loadtest::replay::{self, ReplayOptions};
use pdgate_loadtest::synth::Synth;
use pdgate_loadtest::trace::synthetic::Spec;
use pdgate_loadtest::{Aggregates, Slo};
use std::time::Duration;

const SSE: &str = "data: {\"choices\":[{\"index\":0,\"text\":\" x\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":16,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";

async fn stub() -> String {
    let app = Router::new().route(
        "/v1/completions",
        post(|| async { ([("content-type", "text/event-stream")], SSE) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn run(url: &str, requests: usize, mode: Mode, max_in_flight: usize) -> (Aggregates, f64) {
    let spec: Spec =
        format!("requests={requests},rate=1000,input=16,input_sd=0,output=1,output_sd=0")
            .parse()
            .expect("spec");
    let opts = ReplayOptions {
        target: Target {
            base_url: url.into(),
            api: Api::Completions,
            model: "m".into(),
            api_key: None,
            stream: true,
        },
        mode,
        max_requests: None,
        duration: None,
        max_in_flight,
        timeout: Duration::from_secs(30),
        progress: false,
        scrape: false,
        admin_token: None,
    };
    let out = replay::run(spec.generate(), Synth::builtin(), opts)
        .await
        .expect("replay");
    (
        Aggregates::compute(&out.records, &Slo::default()),
        out.wall_s,
    )
}

#[tokio::main]
async fn main() {
    let url = stub().await;
    // Warm the connection pool.
    run(
        &url,
        500,
        Mode::Rate {
            rate: 1e9,
            burstiness: 1.0,
            seed: 1,
        },
        64,
    )
    .await;

    for cap in [64, 256] {
        let n = 20_000;
        let (agg, wall) = run(
            &url,
            n,
            Mode::Rate {
                rate: 1e9,
                burstiness: 1.0,
                seed: 1,
            },
            cap,
        )
        .await;
        println!(
            "max dispatch (all due at once, max_in_flight {cap}): {n} requests in {wall:.2} s = {:.0} req/s completed, {} failed",
            agg.completed as f64 / wall,
            agg.failed
        );
    }
    for rate in [1000.0, 2000.0] {
        let n = (rate * 5.0) as usize;
        let (agg, _) = run(
            &url,
            n,
            Mode::Rate {
                rate,
                burstiness: 1.0,
                seed: 2,
            },
            1024,
        )
        .await;
        println!(
            "Poisson {rate:.0} req/s × {n}: dispatch lateness p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; achieved {:.0} req/s, {} failed, TTFT p50 {:.2} ms",
            agg.dispatch_lateness_ms.median,
            agg.dispatch_lateness_ms.p99,
            agg.dispatch_lateness_ms.max,
            agg.request_throughput,
            agg.failed,
            agg.ttft_ms.median
        );
    }
}
