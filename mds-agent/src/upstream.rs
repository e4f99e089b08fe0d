//! Where requests that are not answered locally go: the real metadata server, reached through
//! sockets carrying the agent's mark so the kernel programs never redirect them back to the agent
//! (design invariant 4), or the built-in emulator off GCE.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};

use crate::{
    config::{Config, UpstreamKind},
    emulator::Emulator,
    mds::Body,
};

/// Bound on establishing a connection to the metadata server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on the agent's own fetches ([`Upstream::get`]), connection to last body byte.
const GET_TIMEOUT: Duration = Duration::from_secs(10);
/// Pooled connections unused this long are closed.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// Why the upstream could not answer. The mds layer answers 503 (504 for a timeout) with the
/// message, so clients retry.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream URL cannot be used.
    #[error(
        "upstream {url:?} is not usable: {reason}; write \"http://HOST[:PORT]\" or \"emulator\""
    )]
    Url { url: String, reason: &'static str },
    /// `SO_MARK` was refused: without it the kernel programs would redirect the agent to itself.
    #[error(
        "setting SO_MARK {mark:#x} on the socket to the metadata server failed ({cause}); the agent \
         needs CAP_NET_ADMIN (run it as root or grant the capability to its unit)"
    )]
    Mark { mark: u32, cause: nix::Error },
    /// The socket could not be created.
    #[error("creating a socket to the metadata server failed: {cause}")]
    Socket { cause: io::Error },
    /// The upstream's host name does not resolve.
    #[error("resolving the metadata server {host} failed: {cause}; check `upstream` and the VM's resolver")]
    Resolve { host: String, cause: io::Error },
    /// The TCP connection failed.
    #[error("connecting to the metadata server at {addr} failed: {cause}")]
    Connect { addr: SocketAddr, cause: io::Error },
    /// The TCP connection did not complete in time.
    #[error("connecting to the metadata server at {addr} timed out after {}s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout { addr: SocketAddr },
    /// The HTTP exchange failed (connection errors included, with their causes).
    #[error("the request to the metadata server {url} failed: {cause}")]
    Request { url: String, cause: String },
    /// The agent's own fetch took too long.
    #[error("the metadata server did not answer {path} within {}s", GET_TIMEOUT.as_secs())]
    Timeout { path: String },
    /// The answer's body broke off.
    #[error("reading the metadata server's answer to {path} failed: {cause}")]
    Body { path: String, cause: String },
}

impl UpstreamError {
    /// The status the mds layer answers with: clients retry 503 and 504.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Timeout { .. } | Self::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A whole answer to the agent's own fetch.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl UpstreamResponse {
    /// Reads `response` whole; `path` names it in errors.
    pub async fn collect(
        response: Response<Body>,
        path: &str,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| UpstreamError::Body {
                path: path.to_owned(),
                cause: causes(&*e),
            })?
            .to_bytes();
        Ok(UpstreamResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// The metadata server behind the agent.
#[expect(
    clippy::large_enum_variant,
    reason = "one per agent, shared behind an Arc"
)]
pub enum Upstream {
    Real(RealUpstream),
    Emulator(Emulator),
}

impl Upstream {
    pub fn from_config(cfg: &Config) -> Result<Upstream, UpstreamError> {
        Ok(match &cfg.upstream {
            UpstreamKind::Url(url) => Upstream::Real(RealUpstream::new(url, cfg.upstream_mark)?),
            UpstreamKind::Emulator => Upstream::Emulator(Emulator::new(&cfg.emulator)),
        })
    }

    /// Forwards a request as-is (method, path and query, headers minus hop-by-hop ones), both
    /// bodies streamed, with no overall time limit: long polls last as long as the upstream lets
    /// them.
    pub async fn forward(&self, req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        match self {
            Upstream::Real(real) => real.forward(req).await,
            Upstream::Emulator(emulator) => Ok(emulator.forward(req).await),
        }
    }

    /// The agent's own GET of a metadata path and query, with `Metadata-Flavor: Google`, read
    /// whole within a bounded time.
    pub async fn get(&self, path_and_query: &str) -> Result<UpstreamResponse, UpstreamError> {
        match self {
            Upstream::Real(real) => real.get(path_and_query).await,
            Upstream::Emulator(emulator) => emulator.get(path_and_query).await,
        }
    }
}

/// The real metadata server over pooled HTTP/1.1 connections from marked sockets.
pub struct RealUpstream {
    /// `http://host:port`, which request paths are appended to.
    base: String,
    client: Client<MarkedConnector, Body>,
}

impl RealUpstream {
    /// `url`: `http://HOST[:PORT]`; `mark`: the `SO_MARK` of every connection.
    pub fn new(url: &Uri, mark: u32) -> Result<RealUpstream, UpstreamError> {
        let unusable = |reason| UpstreamError::Url {
            url: url.to_string(),
            reason,
        };
        if url.scheme_str() != Some("http") {
            return Err(unusable(
                "only plain http:// is spoken to the metadata server",
            ));
        }
        let authority = url
            .authority()
            .ok_or_else(|| unusable("it names no host"))?;
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(MarkedConnector { mark });
        Ok(RealUpstream {
            base: format!("http://{authority}"),
            client,
        })
    }

    fn target(&self, path_and_query: &str) -> Result<Uri, UpstreamError> {
        let url = format!("{}{path_and_query}", self.base);
        url.parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::Request {
                url,
                cause: e.to_string(),
            })
    }

    async fn forward(&self, req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let (mut parts, body) = req.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        // The client's Host header stays as it was sent; the client library only adds one if
        // it is missing.
        parts.uri = self.target(&path_and_query)?;
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        let response = self
            .client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|e| UpstreamError::Request {
                url: format!("{}{path_and_query}", self.base),
                cause: causes(&e),
            })?;
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed(),
        ))
    }

    async fn get(&self, path_and_query: &str) -> Result<UpstreamResponse, UpstreamError> {
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.uri_mut() = self.target(path_and_query)?;
        req.headers_mut()
            .insert("metadata-flavor", HeaderValue::from_static("Google"));
        let exchange = async {
            let response = self
                .client
                .request(req)
                .await
                .map_err(|e| UpstreamError::Request {
                    url: format!("{}{path_and_query}", self.base),
                    cause: causes(&e),
                })?;
            let response = response.map(|body| body.map_err(crate::mds::BoxError::from).boxed());
            UpstreamResponse::collect(response, path_and_query).await
        };
        tokio::time::timeout(GET_TIMEOUT, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout {
                path: path_and_query.to_owned(),
            })?
    }
}

/// Connects to the upstream from a socket marked before `connect()`, so the kernel programs let
/// it through (hyper-util's `HttpConnector` cannot set `SO_MARK`).
#[derive(Clone)]
struct MarkedConnector {
    mark: u32,
}

impl tower_service::Service<Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mark = self.mark;
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|cause| UpstreamError::Resolve {
                    host: host.clone(),
                    cause,
                })?
                .collect();
            let mut last = UpstreamError::Resolve {
                host,
                cause: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
            };
            for addr in addrs {
                match connect_marked(addr, mark).await {
                    Ok(stream) => return Ok(TokioIo::new(stream)),
                    // The mark fails the same way for every address.
                    Err(e @ UpstreamError::Mark { .. }) => return Err(e),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }
}

async fn connect_marked(addr: SocketAddr, mark: u32) -> Result<TcpStream, UpstreamError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|cause| UpstreamError::Socket { cause })?;
    setsockopt(&socket, sockopt::Mark, &mark)
        .map_err(|cause| UpstreamError::Mark { mark, cause })?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout { addr })?
        .map_err(|cause| UpstreamError::Connect { addr, cause })?;
    // Small request/response exchanges: do not wait to coalesce.
    stream
        .set_nodelay(true)
        .map_err(|cause| UpstreamError::Connect { addr, cause })?;
    Ok(stream)
}

/// Removes the headers that describe one connection rather than the message (RFC 9110 7.6.1),
/// including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// An error and its causes, innermost last; hyper-util's own outer message ("client error
/// (Connect)") is left out when there is a cause to show.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut next = e.source();
    while let Some(cause) = next {
        parts.push(cause.to_string());
        next = cause.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// Loopback fakes of the metadata server, shared by the tests of this module and of `mds`.
#[cfg(test)]
pub(crate) mod test_support {
    use std::{
        convert::Infallible,
        future::Future,
        net::SocketAddr,
        pin::Pin,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        task::{Context, Poll},
    };

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body::Frame;
    use hyper::{body::Incoming, server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;
    use tokio::{net::TcpListener, sync::mpsc};

    use super::{RealUpstream, Upstream};
    use crate::mds::{Body, BoxError};

    /// The mark the tests' upstream sockets carry.
    pub(crate) const TEST_MARK: u32 = 0x7e57;

    /// A fake metadata server on 127.0.0.1 and how many requests it has seen.
    pub(crate) struct Fake {
        pub addr: SocketAddr,
        pub hits: Arc<AtomicUsize>,
    }

    impl Fake {
        pub(crate) fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        pub(crate) fn upstream(&self) -> Upstream {
            let url = format!("http://{}", self.addr)
                .parse()
                .unwrap_or_else(|e| panic!("test url: {e}"));
            Upstream::Real(RealUpstream::new(&url, TEST_MARK).unwrap_or_else(|e| panic!("{e}")))
        }
    }

    pub(crate) async fn fake<F, Fut>(handler: F) -> Fake
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let hits = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let handler = handler.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let answer = handler(req);
                        async move { Ok::<_, Infallible>(answer.await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Fake { addr, hits }
    }

    /// A body fed chunk by chunk from a channel, to see streaming happen.
    pub(crate) struct ChannelBody(pub mpsc::Receiver<Bytes>);

    impl http_body::Body for ChannelBody {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }

    pub(crate) fn channel_body() -> (mpsc::Sender<Bytes>, ChannelBody) {
        let (tx, rx) = mpsc::channel(4);
        (tx, ChannelBody(rx))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use nix::sys::socket::getsockopt;
    use tokio::sync::{mpsc, Notify};
    use tower_service::Service;

    use super::{test_support::*, *};
    use crate::mds::full;

    fn may_set_mark() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << 12 | 1 << 13) != 0)
    }

    async fn body_text(body: Body) -> String {
        let bytes = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("body: {e}"))
            .to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Per-Hop"),
            ("x-per-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("metadata-flavor", "Google"),
            ("host", "metadata.google.internal."),
            ("content-length", "3"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "host", "metadata-flavor"]);
    }

    #[test]
    fn only_plain_http_urls_with_a_host_are_accepted() {
        for url in ["https://169.254.169.254", "/computeMetadata/v1/"] {
            let uri: Uri = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(
                matches!(
                    RealUpstream::new(&uri, TEST_MARK),
                    Err(UpstreamError::Url { .. })
                ),
                "{url}"
            );
        }
        assert!(RealUpstream::new(&Uri::from_static("http://169.254.169.254"), TEST_MARK).is_ok());
    }

    #[test]
    fn from_config_picks_the_emulator_or_the_url() {
        let cfg = Config {
            upstream: UpstreamKind::Emulator,
            ..Config::default()
        };
        assert!(matches!(
            Upstream::from_config(&cfg),
            Ok(Upstream::Emulator(_))
        ));
        assert!(matches!(
            Upstream::from_config(&Config::default()),
            Ok(Upstream::Real(_))
        ));
    }

    #[tokio::test]
    async fn the_connector_marks_its_sockets_before_connecting() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let uri: Uri = format!(
            "http://{}",
            listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
        )
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
        match (MarkedConnector { mark: TEST_MARK }).call(uri).await {
            Ok(io) => {
                let mark = getsockopt(io.inner(), sockopt::Mark)
                    .unwrap_or_else(|e| panic!("SO_MARK: {e}"));
                assert_eq!(mark, TEST_MARK);
            }
            Err(e) => {
                assert!(!may_set_mark(), "connecting with CAP_NET_ADMIN failed: {e}");
                assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
            }
        }
    }

    /// Drops CAP_NET_ADMIN and CAP_NET_RAW (either allows SO_MARK since Linux 5.17) from the
    /// calling thread's effective set; capabilities are per thread, so the process keeps them.
    fn drop_net_admin_in_this_thread() -> bool {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: a version 3 header makes capget/capset access exactly two `Data` entries.
        if unsafe {
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut Header,
                data.as_mut_ptr(),
            )
        } != 0
        {
            return false;
        }
        data[0].effective &= !(1 << 12 | 1 << 13);
        // SAFETY: as above.
        unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) == 0 }
    }

    #[test]
    fn without_cap_net_admin_the_error_names_it() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let result = std::thread::spawn(move || {
            assert!(drop_net_admin_in_this_thread(), "capset failed");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            runtime.block_on(connect_marked(addr, TEST_MARK)).map(drop)
        })
        .join()
        .unwrap_or_else(|_| panic!("the test thread panicked"));
        match result {
            Err(e @ UpstreamError::Mark { .. }) => {
                assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
                assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
            }
            other => panic!("expected a mark error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn forward_streams_both_ways_keeps_host_and_strips_hop_by_hop() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let seen = Arc::new(Mutex::new(None::<HeaderMap>));
        let (got_first, mut first_seen) = mpsc::channel::<()>(1);
        let release = Arc::new(Notify::new());
        let fake = {
            let seen = seen.clone();
            let release = release.clone();
            fake(move |req: Request<Incoming>| {
                let seen = seen.clone();
                let got_first = got_first.clone();
                let release = release.clone();
                async move {
                    let (parts, mut body) = req.into_parts();
                    *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(parts.headers);
                    // The first chunk arrives while the client still holds the rest.
                    let mut up = Vec::new();
                    while let Some(Ok(frame)) = body.frame().await {
                        if let Ok(data) = frame.into_data() {
                            up.extend_from_slice(&data);
                            let _ = got_first.try_send(());
                        }
                    }
                    let (tx, down) = channel_body();
                    tokio::spawn(async move {
                        let _ = tx.send(Bytes::from(up)).await;
                        release.notified().await;
                        let _ = tx.send(Bytes::from_static(b"|late")).await;
                    });
                    Response::new(down.boxed())
                }
            })
            .await
        };
        let upstream = fake.upstream();
        let (up_tx, up_body) = channel_body();
        let mut req = Request::new(up_body.boxed());
        *req.method_mut() = http::Method::PUT;
        *req.uri_mut() = Uri::from_static("/computeMetadata/v1/instance/guest-attributes/ns/key");
        for (name, value) in [
            ("host", "metadata.google.internal."),
            ("metadata-flavor", "Google"),
            ("connection", "x-per-hop"),
            ("x-per-hop", "1"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "websocket"),
        ] {
            req.headers_mut().insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let test = async {
            let forwarding =
                tokio::spawn(async move { upstream.forward(req).await.map_err(|e| e.to_string()) });
            up_tx
                .send(Bytes::from_static(b"one"))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            first_seen
                .recv()
                .await
                .unwrap_or_else(|| panic!("the upstream never saw the first chunk"));
            up_tx
                .send(Bytes::from_static(b"two"))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            drop(up_tx);
            let response = forwarding
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("{e}"));
            let mut body = response.into_body();
            let first = body
                .frame()
                .await
                .and_then(|f| f.ok())
                .and_then(|f| f.into_data().ok());
            assert_eq!(
                first.as_deref(),
                Some(&b"onetwo"[..]),
                "the first chunk came down before the body ended"
            );
            release.notify_one();
            assert_eq!(body_text(body).await, "|late");
        };
        tokio::time::timeout(Duration::from_secs(10), test)
            .await
            .unwrap_or_else(|_| panic!("streaming stalled"));
        let headers = seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| panic!("no request"));
        assert_eq!(
            headers.get("host").map(HeaderValue::as_bytes),
            Some(&b"metadata.google.internal."[..])
        );
        assert_eq!(
            headers.get("metadata-flavor").map(HeaderValue::as_bytes),
            Some(&b"Google"[..])
        );
        for gone in ["x-per-hop", "proxy-authorization", "upgrade"] {
            assert!(!headers.contains_key(gone), "{gone} was forwarded");
        }
    }

    #[tokio::test]
    async fn get_sends_the_flavor_header_and_reads_the_whole_body() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let fake = fake(|req: Request<Incoming>| async move {
            let flavor = req.headers().get("metadata-flavor").cloned();
            let body = format!("{}|{:?}", req.uri(), flavor);
            Response::new(full(body))
        })
        .await;
        let r = fake
            .upstream()
            .get("/computeMetadata/v1/project/project-id?alt=text")
            .await;
        let r = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            &r.body[..],
            &b"/computeMetadata/v1/project/project-id?alt=text|Some(\"Google\")"[..]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn get_gives_up_after_its_timeout() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let fake = fake(|_req: Request<Incoming>| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(full(""))
        })
        .await;
        match fake
            .upstream()
            .get("/computeMetadata/v1/instance/name")
            .await
        {
            Err(e @ UpstreamError::Timeout { .. }) => {
                assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT)
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_503_error_naming_the_address() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = closed.local_addr().unwrap_or_else(|e| panic!("{e}"));
        drop(closed);
        let url: Uri = format!("http://{addr}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let upstream =
            Upstream::Real(RealUpstream::new(&url, TEST_MARK).unwrap_or_else(|e| panic!("{e}")));
        let mut req = Request::new(full(""));
        *req.uri_mut() = Uri::from_static("/computeMetadata/v1/");
        let e = upstream
            .forward(req)
            .await
            .err()
            .unwrap_or_else(|| panic!("forward to a closed port succeeded"));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let text = e.to_string();
        assert!(
            text.contains(&addr.to_string()) && text.contains("refused"),
            "{text}"
        );
    }
}
