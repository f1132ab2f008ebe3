//! Startup and shutdown of netbootd: data directories, store, HTTP listener,
//! housekeeping, signals.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use netboot_common::{PORT_DHCP_CLIENT, PORT_DHCP_SERVER, PORT_PXE_PROXY};
use tokio::net::TcpListener;

use crate::api::{self, AppState, Services, VERSION};
use crate::bindings::Bindings;
use crate::boot::tftp::BootScripts;
use crate::config::DhcpMode;
use crate::config::Validated;
use crate::driver;
use crate::ebpf::{Accounting, Options, ServicePort};
use crate::service::accounting::Counters;
use crate::service::dhcp::{self as dhcp_service, DhcpService};
use crate::service::tally::{CountedListener, Tally};
use crate::service::tftp::Tftp;
use crate::service::timeline;
use crate::store::{Sqlite, Store};
use crate::time::Timestamp;
use axum::serve::ListenerExt;

/// How often expired sessions and old boot events are removed.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(3600);

/// Creates the data directories.
pub fn prepare_dirs(cfg: &Validated) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.config.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.config.data_dir.display()))?;
    for (name, dir) in cfg.paths.dirs() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {name} directory {}", dir.display()))?;
    }
    if let Some(parent) = cfg.paths.database.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

/// The URL people should open, given the listening address.
pub fn display_url(addr: SocketAddr) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        ip => ip.to_string(),
    };
    format!("http://{host}:{}", addr.port())
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    cfg: Validated,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.config.http.listen)
        .await
        .with_context(|| format!("binding HTTP listener on {}", cfg.config.http.listen))?;
    serve(cfg, listener, shutdown).await
}

/// Runs the daemon on an already bound HTTP listener until `shutdown` resolves.
pub async fn serve(
    cfg: Validated,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    prepare_dirs(&cfg)?;
    let db = cfg.paths.database.clone();
    let store: Arc<dyn Store> = Arc::new(
        tokio::task::spawn_blocking(move || Sqlite::open(&db))
            .await?
            .with_context(|| format!("opening database {}", cfg.paths.database.display()))?,
    );
    tracing::info!(path = %cfg.paths.database.display(), "store ready");
    {
        // Image files without a record (copied in by hand, or left by a lost database)
        // become images before the iSCSI target lists them.
        let (s, dir) = (Arc::clone(&store), cfg.paths.images.clone());
        let adopted = tokio::task::spawn_blocking(move || {
            crate::service::images::remove_stale_parts(&dir);
            crate::service::images::adopt(&dir, s.as_ref(), &crate::store::Audit::system())
        })
        .await??;
        if !adopted.is_empty() {
            tracing::info!(count = adopted.len(), "adopted image files");
        }
    }

    let addr = listener
        .local_addr()
        .context("reading the HTTP listener address")?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let bindings = Arc::new(Bindings::default());
    // Before the services, so that the kernel knows every binding and transfer port.
    // Without the eBPF program, netbootd's own servers count.
    let counters = match start_accounting(&cfg) {
        Ok(acc) => {
            bindings.set_sink(Arc::clone(&acc) as Arc<dyn crate::bindings::BindingSink>);
            Counters::Kernel(acc)
        }
        Err(why) => {
            // Not configured is a choice; configured but not loaded is something to fix.
            if cfg.config.ebpf.interfaces.is_empty() {
                tracing::info!(
                    "per-client figures are counted in userspace (source=\"userspace\")"
                );
            } else {
                tracing::warn!(
                    "{why}: per-client figures are counted in userspace (source=\"userspace\")"
                );
            }
            Counters::Userspace {
                tally: Arc::new(Tally::new(Arc::clone(&bindings))),
                why,
            }
        }
    };
    let tally = counters.tally().cloned();
    let tftp = start_tftp(&cfg, &store, &bindings, addr.port(), stop_rx.clone())?;
    if let Some((service, _)) = &tftp {
        match &counters {
            Counters::Kernel(acc) => {
                service.set_transfer_ports(
                    Arc::clone(acc) as Arc<dyn crate::service::tftp::TransferPorts>
                )
            }
            Counters::Userspace { tally, .. } => service.set_tally(Arc::clone(tally)),
        }
    }
    let dhcp = start_dhcp(
        &cfg,
        &store,
        (&bindings, tally.as_ref()),
        addr.port(),
        stop_rx.clone(),
    );
    let iscsi = start_iscsi(&cfg, &store, (&bindings, tally.as_ref()), stop_rx.clone()).await?;

    let traffic = Arc::new(crate::service::accounting::Traffic::new(
        counters,
        cfg.config.ebpf.install_stall_secs,
    ));
    let state = AppState::with_services(
        Arc::clone(&store),
        cfg.clone(),
        Services {
            tftp: tftp.as_ref().map(|(service, _)| Arc::clone(service)),
            dhcp: dhcp.as_ref().map(|(service, _)| Arc::clone(service)),
            bindings,
            traffic: Some(Arc::clone(&traffic)),
            iscsi: iscsi.as_ref().map(|(targets, _)| Arc::clone(targets)),
        },
    );
    let needs_setup = {
        let s = Arc::clone(&store);
        tokio::task::spawn_blocking(move || s.needs_setup()).await??
    };
    let housekeeping = tokio::spawn(housekeeping(Arc::clone(&store)));
    let accounting = tokio::spawn(crate::service::accounting::run(
        Arc::clone(&traffic),
        (
            tftp.as_ref().map(|(service, _)| Arc::clone(service)),
            iscsi
                .as_ref()
                .map(|(targets, _)| Arc::clone(targets.sessions())),
        ),
        Arc::clone(&store),
    ));

    let url = display_url(addr);
    let data_dir = cfg
        .config
        .data_dir
        .canonicalize()
        .unwrap_or_else(|_| cfg.config.data_dir.clone());
    tracing::info!(version = VERSION, %addr, data_dir = %data_dir.display(), "netbootd listening");
    tracing::info!(
        "API: {url}/api/v1 (OpenAPI document: {url}/api/v1/openapi.json, health: {url}/api/v1/health)"
    );
    tracing::info!("web UI: {url}/");
    if needs_setup {
        tracing::info!(
            "first run: create the administrator at {url}/ or with POST {url}/api/v1/auth/setup {{\"username\": ..., \"password\": ...}}"
        );
    }

    let live = state.clone();
    let app = api::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let mut http_stop = stop_rx.clone();
    tokio::spawn(async move {
        shutdown.await;
        // Open web UI pages would otherwise hold graceful shutdown for ever.
        live.end_live_streams();
        let _ = stop_tx.send(true);
    });
    let listener = CountedListener::new(listener, tally.clone()).tap_io(|_| {});
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = http_stop.changed().await;
        })
        .await
        .context("serving HTTP")?;
    if let Some((_, running)) = tftp {
        running.stop().await;
    }
    if let Some((_, task)) = dhcp {
        let _ = task.await;
    }
    if let Some((_, task)) = iscsi {
        let _ = task.await;
    }
    housekeeping.abort();
    accounting.abort();
    let _ = accounting.await;
    // The last minute's traffic into the totals. Dropping the last reference to the
    // Accounting detaches the programs.
    let store = Arc::clone(&store);
    let folded = tokio::task::spawn_blocking(move || traffic.fold(store.as_ref())).await;
    if let Ok(Err(error)) = folded {
        tracing::warn!(%error, "saving the traffic totals failed");
    }
    tracing::info!("netbootd stopped");
    Ok(())
}

/// Starts TFTP when enabled, with the generated iPXE script and the timeline recorder.
/// Failing to bind the port is fatal: the configuration asked for it.
fn start_tftp(
    cfg: &Validated,
    store: &Arc<dyn Store>,
    bindings: &Arc<Bindings>,
    http_port: u16,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<(Arc<Tftp>, driver::Running)>> {
    let t = &cfg.config.tftp;
    if !t.enabled {
        tracing::info!("TFTP off (tftp.enabled = false)");
        return Ok(None);
    }
    let socket = std::net::UdpSocket::bind(t.listen).with_context(|| {
        format!(
            "binding TFTP on {} (set tftp.listen, or tftp.enabled = false if another TFTP server runs here)",
            t.listen
        )
    })?;
    let tftp_addr = socket
        .local_addr()
        .context("reading the TFTP listener address")?;
    let scripts = BootScripts {
        name: t.ipxe_script.clone(),
        server_ip: cfg.config.boot_server_ip,
        http_port,
    };
    let service = Arc::new(
        Tftp::new(t, cfg.paths.tftp.clone())
            .with_virtual_files(Arc::new(scripts))
            .with_bindings(Arc::clone(bindings)),
    );
    if let Some(records) = service.observe() {
        tokio::spawn(timeline::record_tftp_transfers(
            Arc::clone(store),
            Arc::clone(bindings),
            records,
        ));
    }
    let running = driver::start_tftp(Arc::clone(&service), socket, t.driver, t.busy_poll(), stop)
        .context("starting the TFTP driver")?;
    tracing::info!(addr = %tftp_addr, root = %cfg.paths.tftp.display(), driver = ?running.kind(), "TFTP listening");
    Ok(Some((service, running)))
}

/// Starts proxyDHCP or the DHCP server on the boot interfaces. Failing to bind is not
/// fatal: netbootd also works behind a DHCP server that hands out its boot file itself.
fn start_dhcp(
    cfg: &Validated,
    store: &Arc<dyn Store>,
    (bindings, tally): (&Arc<Bindings>, Option<&Arc<Tally>>),
    http_port: u16,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Option<(Arc<DhcpService>, tokio::task::JoinHandle<()>)> {
    let d = &cfg.config.dhcp;
    if d.mode == DhcpMode::Off {
        tracing::info!("DHCP off (dhcp.mode = \"off\")");
        return None;
    }
    let listeners = match dhcp_service::bind(&d.interfaces, PORT_DHCP_SERVER, PORT_PXE_PROXY) {
        Ok(l) if !l.interfaces.is_empty() => l,
        Ok(_) => {
            tracing::warn!(interfaces = ?d.interfaces, "DHCP has no interface to serve");
            return None;
        }
        Err(error) => {
            tracing::warn!(%error, "DHCP cannot listen (ports 67 and 4011)");
            return None;
        }
    };
    let server_mode = d.mode == DhcpMode::Server;
    let what = if server_mode {
        "DHCP server"
    } else {
        "proxyDHCP"
    };
    for i in &listeners.interfaces {
        tracing::info!(iface = %i.name, ip = ?i.addrs, "{what} listening (ports 67 and 4011)");
    }
    // Both were checked by Config::validate.
    let required = d.ipxe_required().unwrap_or_default();
    let mut service = DhcpService::new(
        Arc::clone(store),
        http_port,
        d.boot_files(),
        PORT_DHCP_CLIENT,
    )
    .with_ipxe_required(required)
    .with_bindings(Arc::clone(bindings))
    .with_tally(tally.cloned());
    if server_mode {
        let pools = match d.server() {
            Ok(p) => p,
            Err(error) => {
                tracing::error!(%error, "DHCP server configuration");
                return None;
            }
        };
        service = match service.with_server(pools) {
            Ok(s) => s,
            Err(error) => {
                tracing::error!(%error, "reading the DHCP leases; DHCP server not started");
                return None;
            }
        };
    }
    let service = Arc::new(service);
    let task = tokio::spawn(Arc::clone(&service).serve(listeners, stop));
    Some((service, task))
}

/// Starts the iSCSI target when enabled. Failing to bind the port is fatal: the
/// configuration asked for it.
async fn start_iscsi(
    cfg: &Validated,
    store: &Arc<dyn Store>,
    (bindings, tally): (&Arc<Bindings>, Option<&Arc<Tally>>),
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<
    Option<(
        Arc<crate::service::iscsi::StoreTargets>,
        tokio::task::JoinHandle<()>,
    )>,
> {
    let i = &cfg.config.iscsi;
    if !i.enabled {
        tracing::info!("iSCSI off (iscsi.enabled = false)");
        return Ok(None);
    }
    let listener = TcpListener::bind(i.listen).await.with_context(|| {
        format!(
            "binding iSCSI on {} (set iscsi.listen, or iscsi.enabled = false if another target runs here)",
            i.listen
        )
    })?;
    if !i.tcp_congestion.is_empty() {
        socket2::SockRef::from(&listener)
            .set_tcp_congestion(i.tcp_congestion.as_bytes())
            .with_context(|| {
                let list = |f: &str| {
                    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}"))
                        .map(|s| s.trim().to_owned())
                        .unwrap_or_else(|_| "?".into())
                };
                format!(
                    "iscsi.tcp_congestion = {:?}: the kernel has {}; without CAP_NET_ADMIN only {} may be used",
                    i.tcp_congestion,
                    list("tcp_available_congestion_control"),
                    list("tcp_allowed_congestion_control"),
                )
            })?;
    }
    if i.dead_peer_secs > 0 {
        dead_peer_detection(&listener, i.dead_peer_secs)
            .context("setting iscsi.dead_peer_secs on the iSCSI listener")?;
    }
    let addr = listener
        .local_addr()
        .context("reading the iSCSI listener address")?;
    let targets = Arc::new(
        crate::service::iscsi::StoreTargets::new(Arc::clone(store), cfg.paths.images.clone(), i)
            .with_bindings(Arc::clone(bindings))
            .with_installers(cfg.paths.installers.clone()),
    );
    let sessions = Arc::clone(targets.sessions());
    let dyn_targets = Arc::clone(&targets) as Arc<dyn crate::iscsi::conn::Targets>;
    let runner = crate::service::iscsi::IscsiRunner::start(
        i.driver,
        driver::uring::iscsi::Options {
            busy_poll: i.busy_poll(),
            splice_reads: i.splice_reads,
            mapped_reads: i.mapped_reads,
        },
        &dyn_targets,
        &sessions,
    );
    tracing::info!(%addr, prefix = %i.iqn_prefix, driver = ?runner.kind(), "iSCSI listening");
    let task = tokio::spawn(crate::service::iscsi::serve(
        listener,
        dyn_targets,
        sessions,
        tally.cloned(),
        (runner, i.login_timeout()),
        stop,
    ));
    Ok(Some((targets, task)))
}

/// Makes the connections accepted on `listener` end `secs` seconds after their peer
/// stopped answering: keepalive probes after half of it idle, three probes in the other
/// half, and `TCP_USER_TIMEOUT` for data left unacknowledged. Accepted sockets inherit
/// all of it from the listener.
fn dead_peer_detection(listener: &TcpListener, secs: u32) -> std::io::Result<()> {
    let idle = (secs / 2).max(1);
    let interval = ((secs - idle) / 3).max(1);
    let sock = socket2::SockRef::from(listener);
    sock.set_keepalive(true)?;
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(idle.into()))
            .with_interval(Duration::from_secs(interval.into()))
            .with_retries(3),
    )?;
    sock.set_tcp_user_timeout(Some(Duration::from_secs(secs.into())))
}

/// Loads the eBPF program and attaches it to the configured interfaces. Failure is not
/// fatal: the daemon runs on without kernel counters and says so.
fn start_accounting(cfg: &Validated) -> Result<Arc<Accounting>, String> {
    let ebpf = &cfg.config.ebpf;
    if ebpf.interfaces.is_empty() {
        tracing::info!("eBPF accounting off: no ebpf.interfaces configured");
        return Err("eBPF accounting is off: no ebpf.interfaces configured".into());
    }
    let options = Options {
        max_macs: ebpf.max_entries,
        max_flows: ebpf.max_flows,
        max_bindings: ebpf.max_bindings,
        ports: ServicePort::standard(
            &[cfg.config.tftp.listen.port()],
            &[cfg.config.http.listen.port()],
            &[cfg.config.iscsi.listen.port()],
        ),
        routers: ebpf.routers.clone(),
        pin_dir: (!ebpf.pin_dir.as_os_str().is_empty()).then(|| ebpf.pin_dir.clone()),
        run_time_stats: ebpf.run_time_stats,
    };
    let acc = match Accounting::load(&options) {
        Ok(a) => a,
        Err(error) => {
            let why = format!(
                "eBPF accounting unavailable ({}): per-client kernel byte counters are off",
                error_chain(&error)
            );
            tracing::warn!("{why}");
            return Err(why);
        }
    };
    let mut attached = 0;
    for iface in &ebpf.interfaces {
        match acc.attach(iface) {
            Ok(mode) => {
                attached += 1;
                tracing::info!(iface = %iface, %mode, "eBPF accounting attached");
            }
            Err(error) => {
                tracing::warn!(iface = %iface, %error, "eBPF accounting could not attach")
            }
        }
    }
    if let Some(dir) = acc.pin_dir() {
        tracing::info!(dir = %dir.display(), "eBPF counters are pinned and survive a restart");
    }
    if attached == 0 {
        return Err(
            "eBPF accounting could not attach to any of ebpf.interfaces (see the log)".into(),
        );
    }
    Ok(Arc::new(acc))
}

/// An error and its sources, joined with ": ".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut s = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

async fn housekeeping(store: Arc<dyn Store>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    loop {
        tick.tick().await;
        let s = Arc::clone(&store);
        let res = tokio::task::spawn_blocking(move || {
            let now = Timestamp::now();
            let sessions = s.prune_sessions(now)?;
            let days = s.get_settings()?.event_max_age_days;
            let events = s.prune_events(now.add_secs(-i64::from(days) * 86_400))?;
            Ok::<_, crate::store::StoreError>((sessions, events))
        })
        .await;
        match res {
            Ok(Ok((sessions, events))) => {
                tracing::debug!(sessions, events, "housekeeping removed expired records")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "housekeeping failed"),
            Err(e) => tracing::warn!(error = %e, "housekeeping task failed"),
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
    }
}
