use clap::Parser;

// glibc malloc was a fifth of the gateway's CPU under load (`perf`, router_compare.sh): every
// request allocates and frees its body, JSON tree and headers across tokio's worker threads,
// which glibc serves from contended arenas. mimalloc's thread-local heaps make that cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = pdgate::cli::Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pdgate: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(pdgate::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pdgate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
