//! `retrain`: the command line over the `retrain` library.

mod bench;
mod cli;
mod demo;
mod options;
mod progress;

fn main() -> std::process::ExitCode {
    retrain::kernels::retain_freed_memory();
    let invocation = cli::parse();
    match cli::run(invocation) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(usage) = e.downcast_ref::<clap::Error>() {
                usage.exit();
            }
            eprintln!("error: {e:#}");
            // 130 after Ctrl-C, as shells report SIGINT.
            let interrupted = matches!(
                e.downcast_ref::<retrain::Error>(),
                Some(retrain::Error::Interrupted(_))
            );
            std::process::ExitCode::from(if interrupted { 130 } else { 1 })
        }
    }
}
