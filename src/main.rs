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
    Serve(Box<ServeArgs>),
    /// Stream audio files to a server, as live clients would, and report
    /// the recordings and transcripts.
    Stream(Box<cochlea::client::StreamArgs>),
    /// Exit 0 if a running server answers its health check (for containers).
    Healthcheck {
        /// Health URL of the server (plain HTTP).
        #[arg(
            long,
            env = "COCHLEA_HEALTHCHECK_URL",
            default_value = "http://127.0.0.1:8080/healthz"
        )]
        url: String,
        /// Give up after this long.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Stream(args) => cochlea::client::run(*args),
        Command::Healthcheck { url, timeout_ms } => {
            match cochlea::healthcheck::check(&url, std::time::Duration::from_millis(timeout_ms)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cochlea healthcheck: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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
