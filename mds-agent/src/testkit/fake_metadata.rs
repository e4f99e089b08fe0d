//! A fake of Google's own GCE metadata server, the agent's upstream in tests: a small tree like a
//! VM's, served with the real server's headers and rules (flavor header, 301 for directories,
//! `recursive=true`, `wait_for_change`, guest-attribute PUTs). It hands out the VM's own token and
//! identity so a test can tell when the VM identity leaks to a workload, and records every request
//! so a test can assert what reached the real server.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

pub const PROJECT_ID: &str = "fake-project";
pub const NUMERIC_PROJECT_ID: &str = "999000111222";
pub const ZONE: &str = "projects/999000111222/zones/europe-west1-b";
pub const INSTANCE_NAME: &str = "fake-vm";
pub const INSTANCE_ID: &str = "4520031799277581759";
/// The VM's own service account (also served as `default`).
pub const VM_ACCOUNT: &str = "vm-sa@fake-project.iam.gserviceaccount.com";
/// VM access tokens are `vm-token.<serial>`.
pub const VM_TOKEN_PREFIX: &str = "vm-token.";
/// A value holding every byte 0..=255, for byte-for-byte pass-through checks; see [`blob`].
pub const BLOB_PATH: &str = "instance/attributes/blob";

const V1: &str = "computeMetadata/v1/";
const SCOPES: &str = "https://www.googleapis.com/auth/cloud-platform\n";

/// The value at [`BLOB_PATH`].
pub fn blob() -> Bytes {
    (0..=255u8).collect::<Vec<u8>>().into()
}

/// One request as it reached the fake.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: Method,
    /// As sent, not decoded: `/computeMetadata/v1/instance/?recursive=true`.
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub peer: SocketAddr,
    pub body: Bytes,
}

/// The running fake; the server stops when this is dropped.
pub struct FakeMetadata {
    state: Arc<State>,
    local_addr: SocketAddr,
    server: JoinHandle<()>,
}

struct State {
    /// Leaves by full path without the leading slash (`computeMetadata/v1/project/project-id`);
    /// directories are the prefixes.
    tree: Mutex<BTreeMap<String, Leaf>>,
    requests: Mutex<Vec<SeenRequest>>,
    /// Bumped on every change, so hanging `wait_for_change` requests look again.
    changes: watch::Sender<u64>,
    token_serial: AtomicU64,
}

#[derive(Clone)]
enum Leaf {
    Value(Bytes),
    Token,
    Identity,
}

/// A response before the contract headers are added.
struct Answer {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    etag: Option<String>,
    location: Option<String>,
}

impl FakeMetadata {
    /// Serves on `listener` from the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime with IO enabled.
    pub fn start(listener: std::net::TcpListener) -> FakeMetadata {
        let local_addr = listener
            .local_addr()
            .expect("a bound listener has a local address");
        listener
            .set_nonblocking(true)
            .expect("setting O_NONBLOCK on a listener");
        let listener = tokio::net::TcpListener::from_std(listener)
            .expect("FakeMetadata::start must be called inside a tokio runtime with IO enabled");
        let state = Arc::new(State {
            tree: Mutex::new(initial_tree()),
            requests: Mutex::new(Vec::new()),
            changes: watch::Sender::new(0),
            token_serial: AtomicU64::new(0),
        });
        let server = tokio::spawn(serve(listener, state.clone()));
        FakeMetadata {
            state,
            local_addr,
            server,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.state.requests).clone()
    }

    /// Sets a leaf, creating it if new, and wakes `wait_for_change` requests. `path` is relative to
    /// `/computeMetadata/v1/` (`instance/attributes/foo`); the full path is accepted too.
    pub fn set_value(&self, path: &str, value: impl Into<Bytes>) {
        let path = path.trim_start_matches('/');
        let path = path.strip_prefix(V1).unwrap_or(path);
        self.state
            .set(format!("{V1}{path}"), Leaf::Value(value.into()));
    }
}

impl Drop for FakeMetadata {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl State {
    fn set(&self, path: String, leaf: Leaf) {
        lock(&self.tree).insert(path, leaf);
        self.changes.send_modify(|n| *n += 1);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take the fake down with it.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn initial_tree() -> BTreeMap<String, Leaf> {
    let mut values = vec![
        ("project/project-id", PROJECT_ID),
        ("project/numeric-project-id", NUMERIC_PROJECT_ID),
        (
            "project/attributes/ssh-keys",
            "alice:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeProjectKey alice@fake",
        ),
        (
            "project/attributes/google-compute-default-region",
            "europe-west1",
        ),
        (
            "project/attributes/google-compute-default-zone",
            "europe-west1-b",
        ),
        ("instance/id", INSTANCE_ID),
        ("instance/name", INSTANCE_NAME),
        (
            "instance/hostname",
            "fake-vm.europe-west1-b.c.fake-project.internal",
        ),
        ("instance/zone", ZONE),
        (
            "instance/machine-type",
            "projects/999000111222/machineTypes/e2-medium",
        ),
        ("instance/cpu-platform", "Intel Broadwell"),
        (
            "instance/attributes/ssh-keys",
            "alice:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeInstanceKey alice@fake",
        ),
        (
            "instance/attributes/startup-script",
            "#!/bin/bash\necho started > /var/log/startup.log\n",
        ),
        (
            "instance/attributes/kube-env",
            "KUBERNETES_MASTER_NAME: 10.0.0.2\nKUBELET_CERT: ZmFrZS1rdWJlbGV0LWNlcnQ=\n",
        ),
        ("instance/attributes/enable-oslogin", "FALSE"),
        (
            "instance/guest-attributes/hostkeys/ssh-ed25519",
            "AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKey",
        ),
        ("universe/universe-domain", "googleapis.com"),
    ]
    .into_iter()
    .map(|(path, v)| {
        (
            format!("{V1}{path}"),
            Leaf::Value(Bytes::copy_from_slice(v.as_bytes())),
        )
    })
    .collect::<BTreeMap<_, _>>();
    for account in ["default", VM_ACCOUNT] {
        let dir = format!("{V1}instance/service-accounts/{account}/");
        values.insert(
            format!("{dir}aliases"),
            Leaf::Value(Bytes::from_static(b"default")),
        );
        values.insert(
            format!("{dir}email"),
            Leaf::Value(Bytes::from_static(VM_ACCOUNT.as_bytes())),
        );
        values.insert(
            format!("{dir}scopes"),
            Leaf::Value(Bytes::from_static(SCOPES.as_bytes())),
        );
        values.insert(format!("{dir}token"), Leaf::Token);
        values.insert(format!("{dir}identity"), Leaf::Identity);
    }
    values.insert(format!("{V1}{BLOB_PATH}"), Leaf::Value(blob()));
    values
}

async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) {
    // Owned here, so aborting the server also aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of fds and the like: back off instead of spinning.
                eprintln!("fake metadata: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let state = state.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req, peer).await) }
            });
            // A client hanging up mid-request is its business, not the fake's.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(state: &State, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return finish(error(
            StatusCode::BAD_REQUEST,
            "the request body could not be read",
        ));
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    lock(&state.requests).push(SeenRequest {
        method: parts.method.clone(),
        path_and_query,
        headers: parts.headers.clone(),
        peer,
        body: body.clone(),
    });
    finish(answer(state, &parts.method, &parts.uri, &parts.headers, body).await)
}

async fn answer(
    state: &State,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Answer {
    let raw_path = uri.path();
    let Ok(path) = percent_decode_str(raw_path).decode_utf8() else {
        return not_found(raw_path);
    };
    let path = path.trim_start_matches('/').to_owned();
    if headers.contains_key("x-forwarded-for") {
        return error(
            StatusCode::FORBIDDEN,
            "Request denied: the X-Forwarded-For header is not allowed.",
        );
    }
    let flavored = headers
        .get("metadata-flavor")
        .is_some_and(|v| v == "Google");
    if !path.is_empty() && !flavored {
        return forbidden(raw_path);
    }
    let query = Query::parse(uri.query().unwrap_or_default());
    match *method {
        Method::GET => {}
        Method::PUT if is_guest_attribute(&path) => {
            state.set(path, Leaf::Value(body));
            return Answer::new(StatusCode::OK, "application/text", Bytes::new());
        }
        _ => return error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed."),
    }
    if query.get("wait_for_change") != Some("true") {
        return render(state, &path, raw_path, uri.query(), &query);
    }

    // Subscribed before the first look, so a change in between is not missed.
    let mut changes = state.changes.subscribe();
    let first = render(state, &path, raw_path, uri.query(), &query);
    let baseline = query
        .get("last_etag")
        .map(str::to_owned)
        .or_else(|| first.etag.clone());
    if first.status != StatusCode::OK || first.etag.is_none() || first.etag != baseline {
        return first;
    }
    let timeout = query
        .get("timeout_sec")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        let changed = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, changes.changed())
                .await
                .ok(),
            None => Some(changes.changed().await),
        };
        let now = render(state, &path, raw_path, uri.query(), &query);
        // Timed out, the fake is going away, or the value really changed.
        if !matches!(changed, Some(Ok(()))) || now.etag != baseline {
            return now;
        }
    }
}

fn render(
    state: &State,
    path: &str,
    raw_path: &str,
    raw_query: Option<&str>,
    query: &Query,
) -> Answer {
    let tree = lock(&state.tree);
    if path.is_empty() || path.ends_with('/') {
        let mut children = tree
            .range(path.to_owned()..)
            .take_while(|(k, _)| k.starts_with(path))
            .peekable();
        if children.peek().is_none() {
            return not_found(raw_path);
        }
        if query.get("recursive") == Some("true") {
            let json = recursive_json(path, children);
            let body = Bytes::from(serde_json::to_vec(&json).unwrap_or_default());
            return Answer::new(StatusCode::OK, "application/json", body).with_etag();
        }
        let mut listing = String::new();
        let mut last = "";
        for (key, _) in children {
            let rest = &key[path.len()..];
            let child = match rest.find('/') {
                Some(i) => &rest[..=i],
                None => rest,
            };
            if child != last {
                listing.push_str(child);
                listing.push('\n');
                last = child;
            }
        }
        return Answer::new(StatusCode::OK, "application/text", listing.into()).with_etag();
    }
    match tree.get(path) {
        Some(Leaf::Value(value)) => {
            Answer::new(StatusCode::OK, "application/text", value.clone()).with_etag()
        }
        Some(Leaf::Token) => {
            let serial = state.token_serial.fetch_add(1, Ordering::Relaxed) + 1;
            let token = serde_json::json!({
                "access_token": format!("{VM_TOKEN_PREFIX}{serial}"),
                "expires_in": 3599,
                "token_type": "Bearer",
            });
            Answer::new(StatusCode::OK, "application/json", token.to_string().into())
        }
        Some(Leaf::Identity) => match query.get("audience").filter(|a| !a.is_empty()) {
            Some(audience) => {
                let full = query.get("format") == Some("full");
                Answer::new(
                    StatusCode::OK,
                    "application/text",
                    vm_identity(audience, full).into(),
                )
            }
            None => error(
                StatusCode::BAD_REQUEST,
                "non-empty audience parameter required",
            ),
        },
        None => {
            let dir = format!("{path}/");
            if tree
                .range(dir.clone()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(&dir))
            {
                let location = match raw_query {
                    Some(q) => format!("{raw_path}/?{q}"),
                    None => format!("{raw_path}/"),
                };
                let mut moved =
                    Answer::new(StatusCode::MOVED_PERMANENTLY, "text/html", Bytes::new());
                moved.location = Some(location);
                moved
            } else {
                not_found(raw_path)
            }
        }
    }
}

fn is_guest_attribute(path: &str) -> bool {
    let Some(rest) = path
        .strip_prefix(V1)
        .and_then(|p| p.strip_prefix("instance/guest-attributes/"))
    else {
        return false;
    };
    let mut parts = rest.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(ns), Some(key), None) if !ns.is_empty() && !key.is_empty())
}

/// The JSON the real server gives for `recursive=true`: predefined hyphenated keys in camelCase,
/// user-chosen keys (attributes, account emails) as they are; token and identity left out.
fn recursive_json<'a>(
    dir: &str,
    leaves: impl Iterator<Item = (&'a String, &'a Leaf)>,
) -> serde_json::Value {
    let mut root = serde_json::Map::new();
    let dir_name = dir
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    for (key, leaf) in leaves {
        let Leaf::Value(value) = leaf else { continue };
        let parts: Vec<&str> = key[dir.len()..].split('/').collect();
        if parts.contains(&"guest-attributes") {
            continue;
        }
        // Each part's JSON name depends on the directory it is in.
        let parents = std::iter::once(dir_name).chain(parts.iter().copied());
        let path: Vec<String> = parents
            .zip(&parts)
            .map(|(parent, part)| json_key(parent, part))
            .collect();
        let (parent, name) = match parts.as_slice() {
            [.., parent, name] => (*parent, *name),
            [name] => (dir_name, *name),
            [] => continue,
        };
        insert(&mut root, &path, json_value(parent, name, value));
    }
    root.into()
}

fn insert(
    map: &mut serde_json::Map<String, serde_json::Value>,
    path: &[String],
    value: serde_json::Value,
) {
    match path {
        [] => {}
        [name] => {
            map.insert(name.clone(), value);
        }
        [first, rest @ ..] => {
            let child = map
                .entry(first.clone())
                .or_insert_with(|| serde_json::Map::new().into());
            if let serde_json::Value::Object(child) = child {
                insert(child, rest, value);
            }
        }
    }
}

fn user_keyed(parent: &str) -> bool {
    matches!(parent, "attributes" | "service-accounts")
}

fn json_key(parent: &str, name: &str) -> String {
    if user_keyed(parent) {
        return name.to_owned();
    }
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        match (c, upper) {
            ('-', _) => upper = true,
            (c, true) => {
                out.extend(c.to_uppercase());
                upper = false;
            }
            (c, false) => out.push(c),
        }
    }
    out
}

fn json_value(parent: &str, name: &str, value: &Bytes) -> serde_json::Value {
    let text = String::from_utf8_lossy(value);
    match name {
        _ if user_keyed(parent) => text.into(),
        "id" | "numeric-project-id" => text
            .parse::<u64>()
            .map_or_else(|_| text.as_ref().into(), Into::into),
        "aliases" | "scopes" => text.lines().map(serde_json::Value::from).collect(),
        _ => text.into(),
    }
}

/// A JWT-shaped (unsigned) ID token of the VM's own account.
fn vm_identity(audience: &str, full: bool) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = serde_json::json!({
        "aud": audience,
        "azp": "100000000000000000001",
        "email": VM_ACCOUNT,
        "email_verified": true,
        "exp": now + 3600,
        "iat": now,
        "iss": "https://accounts.google.com",
        "sub": "100000000000000000001",
    });
    if full {
        claims["google"] = serde_json::json!({"compute_engine": {
            "instance_creation_timestamp": 1_700_000_000,
            "instance_id": INSTANCE_ID,
            "instance_name": INSTANCE_NAME,
            "project_id": PROJECT_ID,
            "project_number": 999_000_111_222_u64,
            "zone": "europe-west1-b",
        }});
    }
    let header = br#"{"alg":"RS256","kid":"fake-metadata","typ":"JWT"}"#;
    format!(
        "{}.{}.{}",
        base64url(header),
        base64url(claims.to_string().as_bytes()),
        base64url(b"not-a-signature")
    )
}

fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = byte(0) << 16 | byte(1) << 8 | byte(2);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// FNV-1a: a stable 16-hex-digit ETag, like the real server's.
fn etag(body: &[u8]) -> String {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

impl Answer {
    fn new(status: StatusCode, content_type: &'static str, body: Bytes) -> Answer {
        Answer {
            status,
            content_type,
            body,
            etag: None,
            location: None,
        }
    }

    fn with_etag(mut self) -> Answer {
        self.etag = Some(etag(&self.body));
        self
    }
}

fn error(status: StatusCode, message: &str) -> Answer {
    let reason = status.canonical_reason().unwrap_or_default();
    let code = status.as_u16();
    let body = format!(
        "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error {code} ({reason})!!1</title>\n  \
         <p><b>{code}.</b> <ins>That\u{2019}s an error.</ins>\n  <p>{message}  <ins>That\u{2019}s all we know.</ins>\n"
    );
    Answer::new(status, "text/html; charset=UTF-8", body.into())
}

fn forbidden(raw_path: &str) -> Answer {
    error(
        StatusCode::FORBIDDEN,
        &format!(
            "Your client does not have permission to get URL <code>{raw_path}</code> from this server. \
             Missing Metadata-Flavor:Google header."
        ),
    )
}

fn not_found(raw_path: &str) -> Answer {
    error(
        StatusCode::NOT_FOUND,
        &format!("The requested URL <code>{raw_path}</code> was not found on this server."),
    )
}

/// Adds the headers every response of the real server carries.
fn finish(answer: Answer) -> Response<Full<Bytes>> {
    let Answer {
        status,
        content_type,
        body,
        etag,
        location,
    } = answer;
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("metadata-flavor", HeaderValue::from_static("Google"));
    headers.insert(
        header::SERVER,
        HeaderValue::from_static("Metadata Server for VM"),
    );
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert("x-xss-protection", HeaderValue::from_static("0"));
    headers.insert("x-frame-options", HeaderValue::from_static("SAMEORIGIN"));
    if let Some(etag) = etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
        headers.insert(header::ETAG, etag);
    }
    if let Some(location) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        headers.insert(header::LOCATION, location);
    }
    response
}

/// Decoded query parameters (`+` is a space, as in forms).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Query {
        let decode = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        Query(
            raw.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Reply {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }

    fn start() -> FakeMetadata {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        FakeMetadata::start(listener)
    }

    async fn request(
        fake: &FakeMetadata,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", fake.local_addr()));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .expect("a valid request");
        let response = client.request(req).await.expect("the fake answers");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a whole body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    async fn get(fake: &FakeMetadata, path: &str) -> Reply {
        request(
            fake,
            Method::GET,
            path,
            &[("Metadata-Flavor", "Google")],
            "",
        )
        .await
    }

    fn assert_contract_headers(reply: &Reply) {
        assert_eq!(reply.headers["metadata-flavor"], "Google");
        assert_eq!(reply.headers["server"], "Metadata Server for VM");
    }

    #[tokio::test]
    async fn root_answers_without_the_flavor_header() {
        let fake = start();
        let reply = request(&fake, Method::GET, "/", &[], "").await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (StatusCode::OK, "computeMetadata/\n")
        );
        assert_contract_headers(&reply);
    }

    #[tokio::test]
    async fn v1_needs_the_flavor_header_and_refuses_forwarded_requests() {
        let fake = start();
        let path = "/computeMetadata/v1/project/project-id";
        let bare = request(&fake, Method::GET, path, &[], "").await;
        assert_eq!(bare.status, StatusCode::FORBIDDEN);
        assert_contract_headers(&bare);
        assert!(bare
            .text()
            .contains("Missing Metadata-Flavor:Google header"));
        let forwarded = request(
            &fake,
            Method::GET,
            path,
            &[
                ("Metadata-Flavor", "Google"),
                ("X-Forwarded-For", "10.0.0.1"),
            ],
            "",
        )
        .await;
        assert_eq!(forwarded.status, StatusCode::FORBIDDEN);
        let ok = get(&fake, path).await;
        assert_eq!(
            (ok.status, ok.text().as_str()),
            (StatusCode::OK, PROJECT_ID)
        );
        assert_eq!(ok.headers["content-type"], "application/text");
        assert_eq!(ok.headers["etag"].len(), 16);
    }

    #[tokio::test]
    async fn listings_redirects_and_missing_paths() {
        let fake = start();
        let accounts = get(&fake, "/computeMetadata/v1/instance/service-accounts/").await;
        assert_eq!(accounts.text(), format!("default/\n{VM_ACCOUNT}/\n"));
        let account = get(
            &fake,
            "/computeMetadata/v1/instance/service-accounts/default/",
        )
        .await;
        assert_eq!(account.text(), "aliases\nemail\nidentity\nscopes\ntoken\n");
        let moved = get(
            &fake,
            "/computeMetadata/v1/instance?alt=json&recursive=true",
        )
        .await;
        assert_eq!(moved.status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            moved.headers["location"],
            "/computeMetadata/v1/instance/?alt=json&recursive=true"
        );
        assert_contract_headers(&moved);
        for missing in [
            "/computeMetadata/v1/instance/nope",
            "/computeMetadata/v1/instance/id/",
            "/0.1/meta-data/",
        ] {
            let reply = get(&fake, missing).await;
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{missing}");
            assert_contract_headers(&reply);
        }
    }

    #[tokio::test]
    async fn recursive_json_uses_camel_case_for_predefined_keys_only() {
        let fake = start();
        let reply = get(&fake, "/computeMetadata/v1/project/?recursive=true").await;
        assert_eq!(reply.headers["content-type"], "application/json");
        let json: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
        assert_eq!(json["numericProjectId"], 999_000_111_222_u64);
        assert_eq!(json["projectId"], PROJECT_ID);
        assert_eq!(
            json["attributes"]["google-compute-default-zone"],
            "europe-west1-b"
        );

        let reply = get(
            &fake,
            "/computeMetadata/v1/instance/service-accounts/?recursive=true",
        )
        .await;
        let json: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
        let expected = serde_json::json!({"aliases": ["default"], "email": VM_ACCOUNT,
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"]});
        assert_eq!(json["default"], expected);
        assert_eq!(json[VM_ACCOUNT], expected);
    }

    #[tokio::test]
    async fn vm_token_and_identity() {
        let fake = start();
        let path = "/computeMetadata/v1/instance/service-accounts/default/token?scopes=x";
        let first: serde_json::Value =
            serde_json::from_slice(&get(&fake, path).await.body).expect("JSON");
        let second: serde_json::Value =
            serde_json::from_slice(&get(&fake, path).await.body).expect("JSON");
        assert_eq!(first["access_token"], "vm-token.1");
        assert_eq!(second["access_token"], "vm-token.2");
        assert_eq!(
            (first["expires_in"].as_u64(), first["token_type"].as_str()),
            (Some(3599), Some("Bearer"))
        );

        let base = format!("/computeMetadata/v1/instance/service-accounts/{VM_ACCOUNT}/identity");
        assert_eq!(get(&fake, &base).await.status, StatusCode::BAD_REQUEST);
        let jwt = get(
            &fake,
            &format!("{base}?audience=https%3A%2F%2Fexample.com&format=full"),
        )
        .await
        .text();
        let payload = jwt.split('.').nth(1).expect("three JWT parts");
        let claims = payload_json(payload);
        assert_eq!(claims["email"], VM_ACCOUNT);
        assert_eq!(claims["aud"], "https://example.com");
        assert_eq!(claims["google"]["compute_engine"]["project_id"], PROJECT_ID);
    }

    fn payload_json(payload: &str) -> serde_json::Value {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let sextets: Vec<u32> = payload
            .bytes()
            .map(|c| {
                u32::try_from(ALPHABET.iter().position(|a| *a == c).expect("base64url"))
                    .expect("small")
            })
            .collect();
        let mut bytes = Vec::new();
        for chunk in sextets.chunks(4) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0, |n, (i, s)| n | s << (18 - 6 * i));
            bytes.extend(n.to_be_bytes()[1..chunk.len()].iter());
        }
        serde_json::from_slice(&bytes).expect("a JSON payload")
    }

    #[test]
    fn base64url_matches_known_vectors() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[tokio::test]
    async fn wait_for_change_returns_on_change_or_timeout() {
        let fake = Arc::new(start());
        let path = "/computeMetadata/v1/instance/attributes/enable-oslogin?wait_for_change=true&timeout_sec=10";
        let waiter = {
            let fake = fake.clone();
            tokio::spawn(async move { get(&fake, path).await.text() })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "answered before any change");
        let started = std::time::Instant::now();
        fake.set_value("instance/attributes/enable-oslogin", "TRUE");
        assert_eq!(waiter.await.expect("the waiter"), "TRUE");
        assert!(started.elapsed() < Duration::from_secs(5));

        let started = std::time::Instant::now();
        let path = "/computeMetadata/v1/instance/attributes/enable-oslogin?wait_for_change=true&timeout_sec=1";
        assert_eq!(get(&fake, path).await.text(), "TRUE");
        assert!(started.elapsed() >= Duration::from_millis(900));

        let stale_etag =
            "/computeMetadata/v1/instance/id?wait_for_change=true&last_etag=0000000000000000";
        assert_eq!(get(&fake, stale_etag).await.text(), INSTANCE_ID);
    }

    #[tokio::test]
    async fn guest_attributes_can_be_written_and_read() {
        let fake = start();
        let path = "/computeMetadata/v1/instance/guest-attributes/testing/key";
        let flavor = [("Metadata-Flavor", "Google")];
        assert_eq!(
            request(&fake, Method::PUT, path, &flavor, "value 1")
                .await
                .status,
            StatusCode::OK
        );
        assert_eq!(get(&fake, path).await.text(), "value 1");
        let elsewhere = request(
            &fake,
            Method::PUT,
            "/computeMetadata/v1/instance/name",
            &flavor,
            "x",
        )
        .await;
        assert_eq!(elsewhere.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            get(&fake, "/computeMetadata/v1/instance/name").await.text(),
            INSTANCE_NAME
        );
    }

    #[tokio::test]
    async fn blob_is_served_byte_for_byte_and_requests_are_recorded() {
        let fake = start();
        let reply = get(&fake, &format!("/computeMetadata/v1/{BLOB_PATH}")).await;
        assert_eq!(reply.body, blob());
        assert_eq!(reply.body.len(), 256);
        let seen = fake.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, Method::GET);
        assert_eq!(
            seen[0].path_and_query,
            format!("/computeMetadata/v1/{BLOB_PATH}")
        );
        assert_eq!(seen[0].headers["metadata-flavor"], "Google");
        assert!(seen[0].peer.ip().is_loopback());
    }
}
