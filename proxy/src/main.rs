use clap::Parser;

// glibc malloc was a fifth of the gateway's CPU under load (`perf`, router_compare.sh): every
// request allocates and frees its body, JSON tree and headers across tokio's worker threads,
// which glibc serves from contended arenas. mimalloc's thread-local heaps make that cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = pdgate::cli::Cli::parse();
    match pdgate::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pdgate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
