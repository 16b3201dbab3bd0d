//! The `vqclip` binary: parse arguments, start logging, run the command, map the outcome to an
//! exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use vqclip::cli::{self, Cli};
use vqclip::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    vqclip::memory::tune_allocator();
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(cli.log_format) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    cli::run(cli).await
}
