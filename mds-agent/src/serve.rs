//! The accept loop: attribute each accepted connection to the caller the kernel recorded, then
//! serve its requests through the metadata contract under the current policy.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, info, warn};

use crate::{
    bpf::Interceptor,
    identity::{Identity, Resolver},
    mds::{error_response, CallContext, Mds},
    policy::{Outcome, Policy},
};

/// How long a request's headers may take to arrive, also on an idle kept-alive connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a connection needs; shared by all of them.
pub struct Agent {
    pub interceptor: Arc<Interceptor>,
    pub resolver: Arc<Resolver>,
    pub policy: RwLock<Arc<Policy>>,
    pub mds: Arc<Mds>,
}

impl Agent {
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps the policy; connections pick it up on their next request.
    pub fn set_policy(&self, policy: Policy) {
        let policy = Arc::new(policy);
        match self.policy.write() {
            Ok(mut p) => *p = policy,
            Err(poisoned) => *poisoned.into_inner() = policy,
        }
    }
}

/// Accepts until `shutdown` turns true, then gives open connections `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let agent = agent.clone();
                    let _ = stream.set_nodelay(true);
                    connections.spawn(connection(stream, peer, agent));
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

async fn connection(stream: tokio::net::TcpStream, peer: SocketAddr, agent: Arc<Agent>) {
    let io = TokioIo::new(stream);
    let Some(identity) = identify(&agent, peer).await else {
        warn!(%peer, "refused a connection with no kernel record: it did not come through the interceptor");
        let refuse = service_fn(|_req: Request<Incoming>| async {
            Ok::<_, std::convert::Infallible>(error_response(
                StatusCode::FORBIDDEN,
                "mds-agent: this connection did not come through the metadata interceptor; \
                 connect to http://169.254.169.254/ instead",
            ))
        });
        let _ = http1::Builder::new()
            .keep_alive(false)
            .serve_connection(io, refuse)
            .await;
        return;
    };
    let identity = Arc::new(identity);
    let last_outcome = Arc::new(std::sync::Mutex::new(None::<String>));
    let service = service_fn(move |req: Request<Incoming>| {
        let agent = agent.clone();
        let identity = identity.clone();
        let last_outcome = last_outcome.clone();
        async move {
            let decision = agent.policy().decide(&identity);
            let outcome = describe(&decision.outcome);
            if let Ok(mut last) = last_outcome.lock() {
                if last.as_deref() != Some(outcome.as_str()) {
                    let rule = decision
                        .rule
                        .as_ref()
                        .map(|r| r.label())
                        .unwrap_or_else(|| "no rule".into());
                    info!(caller = %identity, %rule, decision = %outcome, "decision");
                    *last = Some(outcome);
                }
            }
            let ctx = CallContext {
                identity: identity.clone(),
                decision,
            };
            Ok::<_, std::convert::Infallible>(agent.mds.handle(req, &ctx).await)
        }
    });
    // A client that never finishes its headers must not hold a connection (and its record) forever.
    let served = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(io, service)
        .await;
    if let Err(e) = served {
        debug!(%peer, "connection ended: {e}");
    }
}

/// The caller behind a connection from `peer`, or `None` when the kernel recorded none (it did
/// not come through the interceptor). Warm caches answer inline; the rest (NSS, a walk of the
/// cgroup hierarchy) goes to the blocking pool, whose hand-off would double a warm request's time.
async fn identify(agent: &Agent, peer: SocketAddr) -> Option<Identity> {
    let c = agent.interceptor.caller(peer)?;
    if let Some(identity) =
        agent
            .resolver
            .resolve_cached(c.uid, c.gid, c.pid, &c.comm, c.cgroup_id, c.netns_cookie)
    {
        return Some(identity);
    }
    let resolver = agent.resolver.clone();
    tokio::task::spawn_blocking(move || {
        resolver.resolve(c.uid, c.gid, c.pid, &c.comm, c.cgroup_id, c.netns_cookie)
    })
    .await
    .ok()
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::ServiceAccount(grant) => format!("service account {}", grant.email),
        Outcome::Passthrough => "passthrough".into(),
        Outcome::Deny => "deny".into(),
    }
}
