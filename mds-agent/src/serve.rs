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
    policy::{Policy, Rule},
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
    // The rule last logged for this connection: a decision is logged when it first differs, by
    // rule identity (a reload makes new rules), without formatting anything per request.
    let last_rule = Arc::new(std::sync::Mutex::new(None::<Option<Arc<Rule>>>));
    let service = service_fn(move |req: Request<Incoming>| {
        let agent = agent.clone();
        let identity = identity.clone();
        let last_rule = last_rule.clone();
        async move {
            let decision = agent.policy().decide(&identity);
            if let Ok(mut last) = last_rule.lock() {
                if !last
                    .as_ref()
                    .is_some_and(|prev| same_rule(prev, &decision.rule))
                {
                    let rule = decision
                        .rule
                        .as_ref()
                        .map_or_else(|| "no rule".into(), |r| r.label());
                    info!(caller = %identity, %rule, decision = %decision.outcome, "decision");
                    *last = Some(decision.rule.clone());
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

fn same_rule(a: &Option<Arc<Rule>>, b: &Option<Arc<Rule>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}
