//! The `mde-isolation-operator` binary: `run` the operator, or print the `crd`.

use std::process::ExitCode;

use clap::Parser;
use mde_isolation_operator::config::{Cli, Command};
use mde_isolation_operator::{crd, run, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            telemetry::init(args.log_format);
            // kube and reqwest both use rustls; pick the ring provider once for the process.
            let _ = rustls::crypto::ring::default_provider().install_default();
            match run::run(*args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "operator failed");
                    eprintln!("mde-isolation-operator: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
