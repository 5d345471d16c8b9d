//! The `cochlea` binary: CLI → config → telemetry → server.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cochlea::config::{Config, ServeArgs};

#[derive(Parser)]
#[command(
    name = "cochlea",
    version,
    about = "Real-time audio ingestion over WebSocket"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::load(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("cochlea: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    cochlea::telemetry::init_logging(config.log_format);
    let prometheus = match cochlea::telemetry::init_metrics() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("cochlea: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = actix_web::rt::System::new().block_on(cochlea::server::run(config, prometheus));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server stopped");
            eprintln!("cochlea: {e}");
            ExitCode::FAILURE
        }
    }
}
