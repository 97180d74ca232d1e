use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = retrain::cli::Cli::parse();
    match retrain::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
