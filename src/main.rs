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
    /// Load a server (loopback only) with N concurrent real-time streams and
    /// report frames sent, acknowledged and lost, and send lateness.
    Loadgen(Box<cochlea::loadgen::LoadgenArgs>),
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
        Command::Loadgen(args) => match cochlea::loadgen::run(&args) {
            // Exit 1 when a stream failed or a frame went unacknowledged,
            // so scripts and tests can tell a clean run at a glance.
            Ok(report) if report.clean() => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("cochlea loadgen: {e}");
                ExitCode::from(2)
            }
        },
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
    raise_open_files_limit(&config);
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

/// Each recorded session holds two descriptors (socket, WAV file), more
/// with more sinks: raise the soft limit as far as allowed.
fn raise_open_files_limit(config: &Config) {
    match cochlea::rlimit::raise_nofile_limit() {
        Ok(limit) => {
            tracing::info!(
                soft_before = limit.soft_before,
                soft = limit.soft,
                hard = limit.hard,
                "open files limit (RLIMIT_NOFILE)"
            );
            let wanted = (config.max_sessions as u64).saturating_mul(2) + 64;
            if limit.soft < wanted {
                tracing::warn!(
                    soft = limit.soft,
                    max_sessions = config.max_sessions,
                    wanted,
                    "open files limit is below 2 per session: sessions may fail to open recordings"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
}
