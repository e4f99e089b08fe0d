//! `mds-agent run`: wire the pieces together and serve until SIGTERM/SIGINT; SIGHUP reloads the
//! policy.

use std::{
    net::SocketAddr,
    os::linux::net::SocketAddrExt as _,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{bail, Context as _};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tracing::{error, info, warn};

use crate::{
    bpf::{self, InterceptSettings, Interceptor},
    broker::{AgentToken, Broker, GcpAuthAgentToken, NoAgentToken, UpstreamAgentToken},
    config::{Config, UpstreamKind},
    identity::Resolver,
    mds::Mds,
    policy::Policy,
    serve::{self, Agent},
    upstream::Upstream,
};

/// How long open connections may finish after a stop signal.
const GRACE: Duration = Duration::from_secs(5);
/// How often the ids of exempt cgroups are re-read (a restarted unit gets a new cgroup id).
const EXEMPTION_REFRESH: Duration = Duration::from_secs(2);

pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let policy = Policy::new(&config.rules)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve_forever(config_path, config, policy))
}

async fn serve_forever(config_path: &Path, config: Config, policy: Policy) -> anyhow::Result<()> {
    bpf::check_privileges()?;
    let mount = bpf::cgroup2_mount().ok_or(bpf::BpfError::NoCgroup2)?;
    let cgroup = config.cgroup.clone().unwrap_or_else(|| mount.clone());
    let listener = bind(SocketAddr::V4(config.listen), config.upstream_mark)?;
    let agent_netns = bpf::netns_cookie(&listener)?;

    let upstream = Arc::new(Upstream::from_config(&config)?);
    let agent_token: Arc<dyn AgentToken> = match &config.upstream {
        UpstreamKind::Url(_) => Arc::new(UpstreamAgentToken::new(upstream.clone())),
        UpstreamKind::Emulator => match GcpAuthAgentToken::new(config.credentials.as_deref()).await
        {
            Ok(token) => Arc::new(token),
            Err(e) if config.credentials.is_none() => {
                warn!("no credentials to mint tokens with ({e}); mapped callers get 503 for tokens until `credentials` is set");
                Arc::new(NoAgentToken(e))
            }
            Err(e) => return Err(e.into()),
        },
    };
    let broker = Arc::new(Broker::new(&config, agent_token)?);
    let mds = Arc::new(Mds::new(upstream, broker, &config));

    let exempt_uids = exempt_uids(&config)?;
    let exempt_cgroups: Vec<PathBuf> = config
        .exempt
        .cgroups
        .iter()
        .map(|rel| mount.join(rel.trim_start_matches('/')))
        .collect();
    let interceptor = Arc::new(Interceptor::start(&InterceptSettings {
        cgroup: &cgroup,
        intercept: config.intercept,
        intercept6: config.intercept6,
        listen: config.listen,
        agent_netns,
        upstream_mark: config.upstream_mark,
        open_ports: &config.open_ports,
        exempt_uids: &exempt_uids,
        exempt_cgroups: &exempt_cgroups,
        map_entries: config.map_entries,
        pin_dir: &config.pin_dir,
    })?);

    let agent = Arc::new(Agent {
        interceptor: interceptor.clone(),
        resolver: Arc::new(Resolver::new(mount)),
        policy: RwLock::new(Arc::new(policy)),
        mds,
    });

    let refresher = interceptor.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXEMPTION_REFRESH);
        loop {
            tick.tick().await;
            let r = refresher.clone();
            let _ = tokio::task::spawn_blocking(move || r.refresh_exemptions()).await;
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let reload_agent = agent.clone();
    let reload_path = config_path.to_owned();
    let running = config.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => reload(&reload_path, &running, &reload_agent),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        info!("stopping; the pinned kernel programs stay attached (fail closed) until `mds-agent detach`");
        let _ = stop_tx.send(true);
    });

    info!(listen = %config.listen, "serving");
    notify_ready();
    serve::serve(listener, agent, stop_rx, GRACE).await;
    Ok(())
}

/// Tells systemd (`Type=notify`), or a test harness, that interception is in place and the agent
/// answers.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        std::os::unix::net::UnixDatagram::unbound()?.send_to_addr(b"READY=1", &addr)
    });
    if let Err(e) = sent {
        warn!("notifying readiness on NOTIFY_SOCKET: {e}");
    }
}

/// Loads the file again; a bad file is reported and changes nothing.
fn reload(path: &Path, running: &Config, agent: &Agent) {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return error!("reload rejected, the running policy stays: {e}"),
    };
    let policy = match Policy::new(&config.rules) {
        Ok(p) => p,
        Err(e) => return error!("reload rejected, the running policy stays: {e}"),
    };
    if !same_settings(&config, running) {
        warn!("reload applies the rules only; restart mds-agent for changes to other settings");
    }
    agent.set_policy(policy);
    info!(rules = config.rules.len(), "policy reloaded");
}

/// Whether two configurations differ in anything but their rules.
fn same_settings(a: &Config, b: &Config) -> bool {
    let strip = |c: &Config| Config {
        rules: Vec::new(),
        ..c.clone()
    };
    strip(a) == strip(b)
}

/// Binds the listening socket, marked first: the kernel programs reserve the agent's address for
/// sockets with the agent's mark (see mds-ebpf's bind4/6).
fn bind(addr: SocketAddr, mark: u32) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4().context("creating the listening socket")?;
    socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)
        .context("setting SO_MARK on the listening socket (needs CAP_NET_ADMIN)")?;
    match socket.bind(addr) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "listen address {addr} is in use (is another mds-agent running? `ss -ltnp 'sport = :{}'` \
             shows the owner); stop it or set `listen` to a free port",
            addr.port()
        ),
        Err(e) => return Err(e).with_context(|| format!("binding {addr}; set `listen` to a local address")),
    }
    socket
        .listen(1024)
        .with_context(|| format!("listening on {addr}"))
}

fn exempt_uids(config: &Config) -> anyhow::Result<Vec<u32>> {
    let mut uids = config.exempt.uids.clone();
    for name in &config.exempt.users {
        let user = nix::unistd::User::from_name(name)
            .with_context(|| format!("looking up exempt user {name}"))?
            .with_context(|| format!("exempt user {name} does not exist; fix [exempt] users"))?;
        uids.push(user.uid.as_raw());
    }
    Ok(uids)
}
