use clap::Parser;

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
