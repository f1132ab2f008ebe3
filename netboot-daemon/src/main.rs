//! `netbootd`: parses flags and runs the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use netboot_daemon::config::{Config, LogFormat};
use netboot_daemon::{daemon, telemetry};

/// Network boot server: DHCP/proxyDHCP, TFTP, HTTP, iSCSI and exact per-client accounting.
///
/// With no arguments netbootd uses the built-in defaults (data in ./netboot-data, HTTP on
/// 0.0.0.0:8080). Settings come from, in rising precedence: defaults, the configuration
/// file, NETBOOT_* environment variables (and the original system's names), these flags.
#[derive(Debug, Parser)]
#[command(name = "netbootd", version = netboot_daemon::api::VERSION)]
struct Args {
    /// Configuration file (TOML); see docs/netboot.toml.
    #[arg(long, short = 'c', env = "NETBOOT_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (database, tftp/, images/, installers/, logs/).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP listening address, e.g. 0.0.0.0:8080.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// TFTP listening address, e.g. 0.0.0.0:69.
    #[arg(long)]
    tftp_listen: Option<std::net::SocketAddr>,
    /// Log filter, e.g. info or netboot_daemon=debug.
    #[arg(long)]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn load(args: &Args) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    cfg.apply_env(&|k| std::env::var(k).ok())?;
    if let Some(d) = &args.data_dir {
        cfg.data_dir.clone_from(d);
    }
    if let Some(l) = args.listen {
        cfg.http.listen = l;
    }
    if let Some(l) = args.tftp_listen {
        cfg.tftp.listen = l;
    }
    if let Some(l) = &args.log_level {
        cfg.log.level.clone_from(l);
    }
    if let Some(f) = args.log_format {
        cfg.log.format = f;
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let validated = match load(&args).and_then(|c| Ok(c.validate()?)) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("netbootd: configuration error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        match toml::to_string_pretty(&validated.config) {
            Ok(s) => {
                #[allow(clippy::print_stdout, reason = "the requested output")]
                {
                    print!("{s}");
                }
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("netbootd: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    telemetry::init(&validated.config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netbootd: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(validated, daemon::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("netbootd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
