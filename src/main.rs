use clap::Parser;

fn main() -> std::process::ExitCode {
    retrain::kernels::retain_freed_memory();
    let cli = retrain::cli::Cli::parse();
    match retrain::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // 130 after Ctrl-C, as shells report SIGINT.
            let interrupted = e.is::<retrain::train::Interrupted>();
            std::process::ExitCode::from(if interrupted { 130 } else { 1 })
        }
    }
}
