//! The metadata server's HTTP contract, per caller (reference/gce-metadata-contract.md).
//!
//! Requests are validated as the real server does, then the policy's decision applies: a denied
//! caller gets nothing under `/computeMetadata/v1/`, a passthrough caller gets the upstream
//! untouched, and a caller mapped to a service account gets that account's email, scopes and
//! tokens. The VM's own account never reaches a mapped caller: the whole
//! `instance/service-accounts/` subtree and every recursive view that contains it are answered
//! here, and concealed paths are hidden from leaves, listings and recursive JSON alike.

use std::{future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, LengthLimitError, Limited};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Map, Value};
use tracing::{debug, warn};

use crate::{
    broker::{AccessToken, BrokerError, IdToken},
    config::Config,
    identity::Identity,
    policy::{Decision, Grant, Outcome},
    upstream::{Upstream, UpstreamError, UpstreamResponse},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Who is calling and what the policy decided for them.
pub struct CallContext {
    pub identity: Arc<Identity>,
    pub decision: Decision,
}

/// A future returned by [`TokenSource`].
pub type TokenFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'a>>;

/// Mints tokens as a service account; the broker in production, a stub in tests.
pub trait TokenSource: Send + Sync {
    fn access_token<'a>(
        &'a self,
        email: &'a str,
        scopes: &'a [String],
    ) -> TokenFuture<'a, AccessToken>;
    fn id_token<'a>(&'a self, email: &'a str, audience: &'a str) -> TokenFuture<'a, IdToken>;
}

/// The largest request body accepted (guest attributes are small).
const MAX_BODY: usize = 1 << 20;
const APPLICATION_TEXT: &str = "application/text";
const APPLICATION_JSON: &str = "application/json";
const TEXT_HTML: &str = "text/html; charset=UTF-8";
/// The children of a service-account directory, as the real server lists them.
const ACCOUNT_ENTRIES: [&str; 5] = ["aliases", "email", "identity", "scopes", "token"];

/// The contract layer between a caller and the upstream.
pub struct Mds {
    upstream: Arc<Upstream>,
    tokens: Arc<dyn TokenSource>,
    /// Scopes of a token asked for without `?scopes=` when the grant does not restrict them.
    default_scopes: Vec<String>,
}

impl Mds {
    pub fn new(upstream: Arc<Upstream>, tokens: Arc<dyn TokenSource>, config: &Config) -> Self {
        Self {
            upstream,
            tokens,
            default_scopes: config.token.default_scopes.clone(),
        }
    }

    /// Answers one request as the metadata server would answer this caller.
    pub async fn handle<B>(&self, req: Request<B>, ctx: &CallContext) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let response = self.route(req, ctx).await;
        // The path only: queries carry audiences and scopes, never worth a log line.
        debug!(caller = %ctx.identity, %method, %path, status = response.status().as_u16(), "metadata request");
        response
    }

    async fn route<B>(&self, req: Request<B>, ctx: &CallContext) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        // The real server's defence against request forgery through a proxy on the VM.
        if req.headers().contains_key("x-forwarded-for") {
            return error_response(
                StatusCode::FORBIDDEN,
                "mds-agent: requests carrying X-Forwarded-For are refused, as the metadata server refuses them",
            );
        }
        let path = match decode_path(req.uri().path()) {
            Ok(p) => p,
            Err(why) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("mds-agent: bad request path: {why}"),
                )
            }
        };
        let kind = classify(&path);
        if kind == PathKind::Legacy {
            // Their own token endpoints need no header: never pass them through.
            return not_found();
        }
        if matches!(kind, PathKind::V1(_)) && !has_flavor(req.headers()) {
            return html_error(
                StatusCode::FORBIDDEN,
                &format!(
                    "Your client does not have permission to get URL {} from this server. \
                     Missing Metadata-Flavor:Google header.",
                    req.uri().path()
                ),
            );
        }
        let grant = match &ctx.decision.outcome {
            Outcome::Passthrough => return self.forward(req).await,
            Outcome::Deny | Outcome::ServiceAccount(_) if kind == PathKind::Root => {
                return text_response(StatusCode::OK, Bytes::from_static(b"computeMetadata/\n"))
            }
            Outcome::Deny => return error_response(StatusCode::FORBIDDEN, &deny_message(ctx)),
            Outcome::ServiceAccount(grant) => grant,
        };
        // A mapped caller reaches the upstream only through v1 paths this layer has vetted: what
        // the upstream makes of other paths (a recursive `/`, say) is not known.
        match kind {
            PathKind::V1(rel) => {
                let call = Call::new(req.method(), req.uri(), rel, path.slash);
                match self.mapped(grant, &call).await {
                    Some(response) => response,
                    None => self.forward(req).await,
                }
            }
            PathKind::Versions if !path.slash => redirect(req.uri().path(), req.uri().query()),
            PathKind::Versions => listing_response(["v1/"]),
            PathKind::Root | PathKind::Legacy | PathKind::Other => not_found(),
        }
    }

    /// Forwards to the upstream with the body limited and streamed; stamps the contract headers.
    async fn forward<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return too_large();
        }
        let body: Body = if parts.method == Method::PUT {
            // Streamed, cut off past the limit.
            Limited::new(body, MAX_BODY).boxed()
        } else {
            match Limited::new(body, MAX_BODY).collect().await {
                Ok(collected) => full(collected.to_bytes()),
                Err(e) if e.is::<LengthLimitError>() => return too_large(),
                Err(e) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        &format!("mds-agent: reading the request body failed: {e}"),
                    )
                }
            }
        };
        match self
            .upstream
            .forward(Request::from_parts(parts, body))
            .await
        {
            Ok(mut response) => {
                stamp(response.headers_mut());
                response
            }
            Err(e) => upstream_failure(&e),
        }
    }

    fn view<'a>(&'a self, grant: &'a Grant) -> AccountView<'a> {
        AccountView {
            email: &grant.email,
            scopes: grant.scopes.as_deref().unwrap_or(&self.default_scopes),
        }
    }

    /// A mapped caller's request: `None` when it is safe to forward unchanged.
    async fn mapped(&self, grant: &Grant, call: &Call) -> Option<Response<Body>> {
        // Metadata keys are `[A-Za-z0-9_-]`, emails add `@` and `.`: anything else names nothing
        // here and might name something else upstream (`service-accounts;x`).
        let plain = |s: &String| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        };
        let conceal = conceal_paths(grant);
        if !call.rel.iter().all(plain) || conceal.iter().any(|c| call.rel.starts_with(c)) {
            return Some(not_found());
        }
        if call
            .rel
            .starts_with(&["instance".to_owned(), "service-accounts".to_owned()])
        {
            return Some(self.service_accounts(grant, call, &conceal).await);
        }
        let hidden_below: Vec<&[String]> = conceal
            .iter()
            .filter(|c| c.len() > call.rel.len() && c.starts_with(&call.rel))
            .map(|c| &c[call.rel.len()..])
            .collect();
        // The v1 root and instance/ hold the service accounts; ancestors of concealed paths hold
        // those: their recursive views are rebuilt here, never passed through.
        let holds_accounts = call.rel.is_empty() || call.rel == ["instance"];
        if !holds_accounts && hidden_below.is_empty() {
            return None;
        }
        if !call.slash {
            return Some(redirect(&call.path, call.raw_query.as_deref()));
        }
        if call.query.flag("recursive") {
            return Some(self.filtered_tree(grant, call, &hidden_below).await);
        }
        let hidden_children: Vec<&str> = hidden_below
            .iter()
            .filter(|rest| rest.len() == 1)
            .map(|rest| rest[0].as_str())
            .collect();
        if hidden_children.is_empty() {
            return None;
        }
        Some(self.filtered_listing(call, &hidden_children).await)
    }

    /// `instance/service-accounts/...` for a mapped caller: only `default` and the grant's email.
    async fn service_accounts(
        &self,
        grant: &Grant,
        call: &Call,
        conceal: &[Vec<String>],
    ) -> Response<Body> {
        if !call.reads() {
            return method_not_allowed();
        }
        let rest = &call.rel[2..];
        let view = self.view(grant);
        let hidden = |name: &str| {
            let mut path = call.rel.clone();
            path.push(name.to_ascii_lowercase());
            conceal.contains(&path)
        };
        let is_dir = rest.len() < 2;
        if rest.len() > 2 || rest.first().is_some_and(|a| !view.is_account(a)) {
            return not_found();
        }
        if is_dir && !call.slash {
            return redirect(&call.path, call.raw_query.as_deref());
        }
        if is_dir && call.query.flag("recursive") {
            let mut tree = if rest.is_empty() {
                view.accounts_json()
            } else {
                view.account_json()
            };
            for c in conceal
                .iter()
                .filter(|c| c.len() > call.rel.len() && c.starts_with(&call.rel))
            {
                remove_json_path(&mut tree, &call.rel, &c[call.rel.len()..]);
            }
            return tree_response(&tree, call.query.get("alt"), None);
        }
        if is_dir && call.query.get("alt").is_some() {
            return alt_on_listing();
        }
        if rest.is_empty() {
            let names = ["default/".to_owned(), format!("{}/", grant.email)];
            return listing_response(
                names
                    .iter()
                    .map(String::as_str)
                    .filter(|n| !hidden(n.trim_end_matches('/'))),
            );
        }
        if is_dir {
            return listing_response(ACCOUNT_ENTRIES.into_iter().filter(|n| !hidden(n)));
        }
        if call.slash {
            return not_found();
        }
        match rest[1].as_str() {
            "aliases" => value_response(&json!(["default"]), call.query.get("alt")),
            "email" => value_response(&json!(grant.email), call.query.get("alt")),
            "scopes" => value_response(&json!(view.scopes), call.query.get("alt")),
            "token" => self.access_token(grant, &call.query).await,
            "identity" => self.id_token(grant, &call.query).await,
            _ => not_found(),
        }
    }

    async fn access_token(&self, grant: &Grant, query: &Query) -> Response<Body> {
        let asked = query.get("scopes").map(parse_scopes).unwrap_or_default();
        let scopes = if asked.is_empty() {
            grant
                .scopes
                .clone()
                .unwrap_or_else(|| self.default_scopes.clone())
        } else {
            asked
        };
        if let Some(allowed) = &grant.scopes {
            if let Some(refused) = scopes.iter().find(|s| !allowed.contains(s)) {
                return error_response(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "mds-agent: {} allows scopes {}; {refused} is not one of them",
                        grant.rule_label,
                        allowed.join(", ")
                    ),
                );
            }
        }
        match self.tokens.access_token(&grant.email, &scopes).await {
            Ok(token) => {
                let body = json!({
                    "access_token": token.token,
                    "expires_in": remaining_secs(token.expires_at),
                    "token_type": "Bearer",
                });
                respond(StatusCode::OK, APPLICATION_JSON, body.to_string())
            }
            Err(e) => token_failure(&grant.email, &e),
        }
    }

    async fn id_token(&self, grant: &Grant, query: &Query) -> Response<Body> {
        let Some(audience) = query.get("audience").filter(|a| !a.is_empty()) else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "non-empty audience parameter required",
            );
        };
        if let Some(allowed) = &grant.audiences {
            if !allowed.is_match(audience) {
                return error_response(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "mds-agent: {} does not allow ID tokens for audience {audience}",
                        grant.rule_label
                    ),
                );
            }
        }
        // format=full asks for signed google.compute_engine claims that IAM cannot mint for another
        // account: the standard-format token is the answer either way.
        match self.tokens.id_token(&grant.email, audience).await {
            Ok(token) => text_response(StatusCode::OK, Bytes::from(token.jwt)),
            Err(e) => token_failure(&grant.email, &e),
        }
    }

    /// A recursive view of a directory that holds the service accounts or concealed paths: the
    /// upstream's JSON with the caller's accounts in place of the VM's, concealed paths removed.
    async fn filtered_tree(
        &self,
        grant: &Grant,
        call: &Call,
        hidden_below: &[&[String]],
    ) -> Response<Body> {
        if !call.reads() {
            return method_not_allowed();
        }
        let fetched = match self.fetch(call, "recursive=true&alt=json").await {
            Ok(r) => r,
            Err(e) => return upstream_failure(&e),
        };
        if fetched.status != StatusCode::OK {
            return relay(fetched);
        }
        let mut tree: Value = match serde_json::from_slice(&fetched.body) {
            Ok(v) => v,
            Err(e) => {
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "mds-agent: the metadata server's recursive answer for {} is not JSON: {e}",
                        call.path
                    ),
                )
            }
        };
        let view = self.view(grant);
        let instance = if call.rel.is_empty() {
            tree.get_mut("instance")
        } else if call.rel == ["instance"] {
            Some(&mut tree)
        } else {
            None
        };
        if let Some(Value::Object(instance)) = instance {
            instance.insert("serviceAccounts".to_owned(), view.accounts_json());
        }
        for rest in hidden_below {
            remove_json_path(&mut tree, &call.rel, rest);
        }
        tree_response(
            &tree,
            call.query.get("alt"),
            fetched.headers.get(header::ETAG),
        )
    }

    /// The upstream's listing of a directory without the concealed children.
    async fn filtered_listing(&self, call: &Call, hidden: &[&str]) -> Response<Body> {
        if !call.reads() {
            return method_not_allowed();
        }
        if call.query.get("alt").is_some() {
            return alt_on_listing();
        }
        let fetched = match self.fetch(call, "").await {
            Ok(r) => r,
            Err(e) => return upstream_failure(&e),
        };
        if fetched.status != StatusCode::OK {
            return relay(fetched);
        }
        let listing = String::from_utf8_lossy(&fetched.body);
        let kept = filter_listing(&listing, hidden);
        let mut response = relay(UpstreamResponse {
            body: Bytes::from(kept),
            ..fetched
        });
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(APPLICATION_TEXT),
        );
        response
    }

    /// The agent's own GET of the caller's path with `extra` query parameters; a long poll
    /// (`wait_for_change`) waits as long as the upstream does.
    async fn fetch(&self, call: &Call, extra: &str) -> Result<UpstreamResponse, UpstreamError> {
        let mut query: Vec<String> = extra
            .split('&')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        for name in ["wait_for_change", "last_etag", "timeout_sec"] {
            if let Some(value) = call.query.get(name) {
                query.push(format!(
                    "{name}={}",
                    utf8_percent_encode(value, NON_ALPHANUMERIC)
                ));
            }
        }
        let path_and_query = if query.is_empty() {
            call.path.clone()
        } else {
            format!("{}?{}", call.path, query.join("&"))
        };
        if !call.query.flag("wait_for_change") {
            return self.upstream.get(&path_and_query).await;
        }
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.uri_mut() =
            path_and_query
                .parse()
                .map_err(|e: http::uri::InvalidUri| UpstreamError::Request {
                    url: path_and_query.clone(),
                    cause: e.to_string(),
                })?;
        req.headers_mut()
            .insert("metadata-flavor", HeaderValue::from_static("Google"));
        UpstreamResponse::collect(self.upstream.forward(req).await?, &path_and_query).await
    }
}

/// A mapped caller's request under `/computeMetadata/v1/`, parsed once.
struct Call {
    method: Method,
    /// The raw path, as the caller sent it (already validated).
    path: String,
    raw_query: Option<String>,
    query: Query,
    /// The decoded path segments below `/computeMetadata/v1/`, lowercased: the upstream's path
    /// matching is not known to be case-sensitive, and the protections must not be bypassed by
    /// case.
    rel: Vec<String>,
    slash: bool,
}

impl Call {
    fn new(method: &Method, uri: &Uri, rel: Vec<String>, slash: bool) -> Self {
        Self {
            method: method.clone(),
            path: uri.path().to_owned(),
            raw_query: uri.query().map(str::to_owned),
            query: Query::parse(uri.query()),
            rel: rel.iter().map(|s| s.to_ascii_lowercase()).collect(),
            slash,
        }
    }

    fn reads(&self) -> bool {
        self.method == Method::GET || self.method == Method::HEAD
    }
}

/// The service accounts a mapped caller sees: `default` and its grant's email, both the grant.
struct AccountView<'a> {
    email: &'a str,
    scopes: &'a [String],
}

impl AccountView<'_> {
    fn is_account(&self, name: &str) -> bool {
        name == "default" || name.eq_ignore_ascii_case(self.email)
    }

    fn account_json(&self) -> Value {
        json!({ "aliases": ["default"], "email": self.email, "scopes": self.scopes })
    }

    fn accounts_json(&self) -> Value {
        let mut accounts = Map::new();
        accounts.insert("default".to_owned(), self.account_json());
        accounts.insert(self.email.to_owned(), self.account_json());
        Value::Object(accounts)
    }
}

/// A request path split into decoded segments.
#[derive(Debug, PartialEq)]
pub(crate) struct MetaPath {
    pub segments: Vec<String>,
    /// Whether the path ends in `/` (a listing).
    pub slash: bool,
}

/// Decodes a request path, refusing anything that could name one path to this layer and another
/// to the upstream: bad or encoded-slash percent escapes, dot segments, empty segments, control
/// characters.
pub(crate) fn decode_path(raw: &str) -> Result<MetaPath, String> {
    let rest = raw
        .strip_prefix('/')
        .ok_or_else(|| format!("{raw:?} does not start with '/'"))?;
    if rest.is_empty() {
        return Ok(MetaPath {
            segments: Vec::new(),
            slash: true,
        });
    }
    let mut parts: Vec<&str> = rest.split('/').collect();
    let slash = parts.last() == Some(&"");
    if slash {
        parts.pop();
    }
    let segments = parts
        .into_iter()
        .map(decode_segment)
        .collect::<Result<_, _>>()?;
    Ok(MetaPath { segments, slash })
}

fn decode_segment(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("empty path segment (//)".to_owned());
    }
    let bytes = raw.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%'
            && !(bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)))
        {
            return Err(format!("segment {raw:?} has a malformed percent escape"));
        }
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| format!("segment {raw:?} does not decode to UTF-8"))?;
    if decoded == "." || decoded == ".." {
        return Err(format!("dot segment {raw:?}"));
    }
    if decoded
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(format!(
            "segment {raw:?} decodes to a slash, backslash or control character"
        ));
    }
    Ok(decoded.into_owned())
}

#[derive(Debug, PartialEq)]
enum PathKind {
    /// `/`.
    Root,
    /// `/0.1/...` and `/computeMetadata/v1beta1/...`.
    Legacy,
    /// `/computeMetadata/`, the list of API versions.
    Versions,
    /// `/computeMetadata/v1` and below: the segments after `v1`.
    V1(Vec<String>),
    Other,
}

fn classify(path: &MetaPath) -> PathKind {
    let lower: Vec<String> = path
        .segments
        .iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    match lower.as_slice() {
        [] => PathKind::Root,
        [first, ..] if first == "0.1" => PathKind::Legacy,
        [first] if first == "computemetadata" => PathKind::Versions,
        [first, second, ..] if first == "computemetadata" && second == "v1beta1" => {
            PathKind::Legacy
        }
        [first, second, ..] if first == "computemetadata" && second == "v1" => {
            PathKind::V1(path.segments[2..].to_vec())
        }
        _ => PathKind::Other,
    }
}

fn has_flavor(headers: &HeaderMap) -> bool {
    headers
        .get_all("metadata-flavor")
        .iter()
        .any(|v| v == "Google")
}

/// A parsed query string, names matched case-insensitively.
#[derive(Debug, Default)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(query: Option<&str>) -> Self {
        let decode = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        Self(
            query
                .unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (name, value) = p.split_once('=').unwrap_or((p, ""));
                    (decode(name), decode(value))
                })
                .collect(),
        )
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether any `name` is set to something other than false. Generous on purpose: a value the
    /// upstream might read as true must not slip past as a plain listing.
    pub fn flag(&self, name: &str) -> bool {
        self.0
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .any(|(_, v)| {
                !["false", "0", "f"]
                    .iter()
                    .any(|f| v.eq_ignore_ascii_case(f))
            })
    }
}

/// `?scopes=a,b` -> `["a", "b"]`.
fn parse_scopes(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The grant's concealed paths as lowercased segments.
fn conceal_paths(grant: &Grant) -> Vec<Vec<String>> {
    grant
        .conceal
        .iter()
        .map(|c| {
            c.split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty())
        .collect()
}

/// Seconds until `expires_at`, at least 1 (Go's client rejects 0).
fn remaining_secs(expires_at: tokio::time::Instant) -> u64 {
    expires_at
        .saturating_duration_since(tokio::time::Instant::now())
        .as_secs()
        .max(1)
}

fn deny_message(ctx: &CallContext) -> String {
    match &ctx.decision.rule {
        Some(rule) => format!(
            "mds-agent: {} denies {}; ask the VM's administrator to change the policy",
            rule.label(),
            ctx.identity
        ),
        None => format!(
            "mds-agent: no policy rule maps {}; ask the VM's administrator to add a rule",
            ctx.identity
        ),
    }
}

/// Whether the parents (path segments below `/computeMetadata/v1/`) name a directory whose
/// children are named by users (attributes) or are emails: their JSON keys keep their names.
fn user_named(parents: &[String]) -> bool {
    let is = |i: usize, name: &str| parents.get(i).is_some_and(|p| p.eq_ignore_ascii_case(name));
    match parents.len() {
        2 => {
            (is(0, "instance") || is(0, "project")) && is(1, "attributes")
                || is(0, "instance") && (is(1, "service-accounts") || is(1, "guest-attributes"))
        }
        n => n > 2 && is(0, "instance") && is(1, "guest-attributes"),
    }
}

/// The key of a metadata path component in recursive JSON: predefined hyphenated names become
/// camelCase (`numeric-project-id` -> `numericProjectId`), user-named ones stay.
pub(crate) fn json_key(parents: &[String], name: &str) -> String {
    if user_named(parents) {
        return name.to_owned();
    }
    let mut key = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '-' {
            upper = true;
        } else if upper {
            key.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            key.push(c);
        }
    }
    key
}

/// Removes the metadata path `rest` (below `parents`) from a recursive JSON view, matching keys
/// case-insensitively as the concealment does.
fn remove_json_path(tree: &mut Value, parents: &[String], rest: &[String]) {
    let Some((name, deeper)) = rest.split_first() else {
        return;
    };
    let key = json_key(parents, name);
    let child_parents = || {
        let mut p = parents.to_vec();
        p.push(name.clone());
        p
    };
    match tree {
        Value::Object(map) => {
            let Some(found) = map.keys().find(|k| k.eq_ignore_ascii_case(&key)).cloned() else {
                return;
            };
            if deeper.is_empty() {
                map.remove(&found);
            } else if let Some(child) = map.get_mut(&found) {
                remove_json_path(child, &child_parents(), deeper);
            }
        }
        Value::Array(items) => {
            let Ok(index) = name.parse::<usize>() else {
                return;
            };
            if index >= items.len() {
                return;
            }
            if deeper.is_empty() {
                items.remove(index);
            } else {
                remove_json_path(&mut items[index], &child_parents(), deeper);
            }
        }
        _ => {}
    }
}

/// A listing without the hidden children (`name` or `name/`), compared case-insensitively.
fn filter_listing(listing: &str, hidden: &[&str]) -> String {
    listing
        .lines()
        .filter(|line| {
            !hidden
                .iter()
                .any(|h| line.trim_end_matches('/').eq_ignore_ascii_case(h))
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

/// One entry a line, trailing newline; directories end in `/`.
pub(crate) fn render_listing<'a>(entries: impl IntoIterator<Item = &'a str>) -> String {
    entries.into_iter().map(|e| format!("{e}\n")).collect()
}

/// `alt=text` of a recursive view: one `path value` line per leaf, `/`-joined keys, list items
/// numbered.
pub(crate) fn json_to_text(tree: &Value) -> String {
    fn walk(value: &Value, prefix: &str, out: &mut String) {
        let join = |k: &str| {
            if prefix.is_empty() {
                k.to_owned()
            } else {
                format!("{prefix}/{k}")
            }
        };
        match value {
            Value::Object(map) => map.iter().for_each(|(k, v)| walk(v, &join(k), out)),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .for_each(|(i, v)| walk(v, &join(&i.to_string()), out)),
            leaf => {
                let text = match leaf {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.push_str(&if prefix.is_empty() {
                    format!("{text}\n")
                } else {
                    format!("{prefix} {text}\n")
                });
            }
        }
    }
    let mut out = String::new();
    walk(tree, "", &mut out);
    out
}

/// A leaf as text: strings bare, lists one item a line with a trailing newline.
pub(crate) fn leaf_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| format!("{}\n", leaf_text(i)))
            .collect(),
        other => other.to_string(),
    }
}

/// A 16-hex-digit ETag, stable for a value (FNV-1a: the same on every build).
pub(crate) fn etag(body: &[u8]) -> HeaderValue {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    HeaderValue::from_str(&format!("{hash:016x}"))
        .unwrap_or_else(|_| HeaderValue::from_static("0000000000000000"))
}

/// Adds the headers every answer of the real server carries, keeping ones already there.
pub(crate) fn stamp(headers: &mut HeaderMap) {
    for (name, value) in [
        ("metadata-flavor", "Google"),
        ("server", "Metadata Server for VM"),
        ("x-xss-protection", "0"),
        ("x-frame-options", "SAMEORIGIN"),
    ] {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
}

pub(crate) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    stamp(response.headers_mut());
    response
}

/// An error with a message for the caller, as text (clients show the body in their exceptions).
pub fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    respond(status, APPLICATION_TEXT, format!("{message}\n"))
}

/// An error page in the real server's own HTML form (its 403 without the header, its 404).
pub(crate) fn html_error(status: StatusCode, detail: &str) -> Response<Body> {
    let code = status.as_u16();
    let reason = status.canonical_reason().unwrap_or("Error");
    let escaped = detail
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    respond(
        status,
        TEXT_HTML,
        format!(
            "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error {code} ({reason})!!1</title>\n  \
             <p><b>{code}.</b> <ins>That\u{2019}s an error.</ins>\n  <p>{escaped}  <ins>That\u{2019}s all we know.</ins>\n"
        ),
    )
}

pub(crate) fn not_found() -> Response<Body> {
    html_error(
        StatusCode::NOT_FOUND,
        "The requested URL was not found on this server.",
    )
}

fn method_not_allowed() -> Response<Body> {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "mds-agent: this metadata path answers GET only",
    )
}

fn too_large() -> Response<Body> {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("mds-agent: request bodies are limited to {MAX_BODY} bytes"),
    )
}

pub(crate) fn alt_on_listing() -> Response<Body> {
    error_response(
        StatusCode::BAD_REQUEST,
        "alt is not supported on a non-recursive listing; add recursive=true",
    )
}

/// A plain text answer (a leaf or a token), no ETag.
pub(crate) fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, APPLICATION_TEXT, body)
}

/// A listing with its ETag.
pub(crate) fn listing_response<'a>(entries: impl IntoIterator<Item = &'a str>) -> Response<Body> {
    tagged(APPLICATION_TEXT, render_listing(entries))
}

/// A leaf value: `alt=json` as JSON, otherwise as text; with its ETag.
pub(crate) fn value_response(value: &Value, alt: Option<&str>) -> Response<Body> {
    match alt {
        None | Some("text") => tagged(APPLICATION_TEXT, leaf_text(value)),
        Some("json") => tagged(APPLICATION_JSON, value.to_string()),
        Some(other) => error_response(
            StatusCode::BAD_REQUEST,
            &format!("unsupported alt {other:?}; use json or text"),
        ),
    }
}

/// A recursive view: JSON unless `alt=text`; the given ETag, else one of its own.
pub(crate) fn tree_response(
    tree: &Value,
    alt: Option<&str>,
    etag_value: Option<&HeaderValue>,
) -> Response<Body> {
    let (content_type, body) = match alt {
        None | Some("json") => (APPLICATION_JSON, tree.to_string()),
        Some("text") => (APPLICATION_TEXT, json_to_text(tree)),
        Some(other) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("unsupported alt {other:?}; use json or text"),
            )
        }
    };
    let mut response = tagged(content_type, body);
    if let Some(v) = etag_value {
        response.headers_mut().insert(header::ETAG, v.clone());
    }
    response
}

/// A value answer with its ETag.
fn tagged(content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let body = body.into();
    let tag = etag(&body);
    let mut response = respond(StatusCode::OK, content_type, body);
    response.headers_mut().insert(header::ETAG, tag);
    response
}

/// 301 to the directory's slashed path, query kept.
pub(crate) fn redirect(path: &str, query: Option<&str>) -> Response<Body> {
    let location = match query {
        Some(q) => format!("{path}/?{q}"),
        None => format!("{path}/"),
    };
    let Ok(location) = HeaderValue::from_str(&location) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "mds-agent: the request target is not a valid header value",
        );
    };
    let mut response = text_response(StatusCode::MOVED_PERMANENTLY, Bytes::new());
    response.headers_mut().insert(header::LOCATION, location);
    response
}

/// An upstream answer fetched whole, passed on with a body of known length.
fn relay(fetched: UpstreamResponse) -> Response<Body> {
    let UpstreamResponse {
        status,
        mut headers,
        body,
    } = fetched;
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::TRANSFER_ENCODING);
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    stamp(response.headers_mut());
    response
}

fn upstream_failure(e: &UpstreamError) -> Response<Body> {
    warn!("metadata server request failed: {e}");
    error_response(e.status(), &format!("mds-agent: {e}"))
}

fn token_failure(email: &str, e: &BrokerError) -> Response<Body> {
    warn!(%email, "minting a token failed: {e}");
    error_response(e.status(), &format!("mds-agent: {e}"))
}

#[cfg(test)]
mod tests {
    use std::{
        path::Path,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use globset::{Glob, GlobSetBuilder};
    use hyper::body::Incoming;
    use tokio::time::Instant;

    use super::*;
    use crate::{
        emulator::Emulator,
        policy::Policy,
        upstream::test_support::{channel_body, fake, Fake},
    };

    const APP: &str = "app@demo-project.iam.gserviceaccount.com";
    const VM: &str = "vm@demo-project.iam.gserviceaccount.com";
    const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
    const RULE: &str = "rule 1 \"app\" (line 3)";

    /// Records what it was asked for; mints recognisable fake tokens or fails.
    #[derive(Default)]
    struct StubTokens {
        calls: Mutex<Vec<String>>,
        fail: Option<BrokerError>,
    }

    impl StubTokens {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }

        fn record(&self, call: String) -> Result<(), BrokerError> {
            self.calls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(call);
            self.fail.clone().map_or(Ok(()), Err)
        }
    }

    impl TokenSource for StubTokens {
        fn access_token<'a>(
            &'a self,
            email: &'a str,
            scopes: &'a [String],
        ) -> TokenFuture<'a, AccessToken> {
            Box::pin(async move {
                self.record(format!("access {email} {}", scopes.join(",")))?;
                Ok(AccessToken {
                    token: format!("ya29.{email}"),
                    expires_at: Instant::now() + Duration::from_secs(1800),
                })
            })
        }

        fn id_token<'a>(&'a self, email: &'a str, audience: &'a str) -> TokenFuture<'a, IdToken> {
            Box::pin(async move {
                self.record(format!("id {email} {audience}"))?;
                Ok(IdToken {
                    jwt: format!("eyJ.{email}.{audience}"),
                    expires_at: Instant::now() + Duration::from_secs(3600),
                })
            })
        }
    }

    fn config() -> Config {
        let mut cfg = Config::default();
        cfg.emulator
            .attributes
            .insert("ssh-keys".to_owned(), "alice:ssh-ed25519 AAAA".to_owned());
        cfg.emulator
            .attributes
            .insert("enable-oslogin".to_owned(), "TRUE".to_owned());
        cfg
    }

    struct Harness {
        mds: Mds,
        tokens: Arc<StubTokens>,
    }

    fn harness_with(upstream: Upstream, tokens: StubTokens) -> Harness {
        let tokens = Arc::new(tokens);
        Harness {
            mds: Mds::new(Arc::new(upstream), tokens.clone(), &config()),
            tokens,
        }
    }

    /// The emulator as upstream, tokens from the stub.
    fn harness() -> Harness {
        harness_with(
            Upstream::Emulator(Emulator::new(&config().emulator)),
            StubTokens::default(),
        )
    }

    fn caller() -> Arc<Identity> {
        Arc::new(Identity {
            uid: 1000,
            gid: 1000,
            pid: 42,
            comm: "curl".to_owned(),
            user: Some("alice".to_owned()),
            cgroup: Some("/user.slice/user-1000.slice/session-1.scope".to_owned()),
            ..Identity::default()
        })
    }

    fn ctx(outcome: Outcome) -> CallContext {
        CallContext {
            identity: caller(),
            decision: Decision {
                rule: None,
                outcome,
            },
        }
    }

    fn grant() -> Grant {
        Grant {
            email: APP.to_owned(),
            scopes: None,
            audiences: None,
            conceal: Vec::new(),
            rule_label: RULE.to_owned(),
        }
    }

    fn mapped(grant: Grant) -> CallContext {
        ctx(Outcome::ServiceAccount(Arc::new(grant)))
    }

    fn request(
        method: Method,
        target: &str,
        flavor: bool,
        body: impl Into<Bytes>,
    ) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body.into()));
        *req.method_mut() = method;
        *req.uri_mut() = target.parse().unwrap_or_else(|e| panic!("{target}: {e}"));
        if flavor {
            req.headers_mut()
                .insert("metadata-flavor", HeaderValue::from_static("Google"));
        }
        req
    }

    fn get(target: &str) -> Request<Full<Bytes>> {
        request(Method::GET, target, true, Bytes::new())
    }

    fn v1(rel: &str) -> Request<Full<Bytes>> {
        get(&format!("/computeMetadata/v1/{rel}"))
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: String,
    }

    impl Answer {
        fn header(&self, name: &str) -> &str {
            self.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        }

        fn json(&self) -> Value {
            serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
        }
    }

    async fn answer(response: Response<Body>) -> Answer {
        let (parts, body) = response.into_parts();
        let bytes = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("body: {e}"))
            .to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn send(h: &Harness, req: Request<Full<Bytes>>, ctx: &CallContext) -> Answer {
        answer(h.mds.handle(req, ctx).await).await
    }

    fn assert_contract_headers(a: &Answer, what: &str) {
        assert_eq!(a.header("metadata-flavor"), "Google", "{what}");
        assert_eq!(a.header("server"), "Metadata Server for VM", "{what}");
        assert_eq!(a.header("x-xss-protection"), "0", "{what}");
        assert_eq!(a.header("x-frame-options"), "SAMEORIGIN", "{what}");
    }

    /// A fake upstream that answers every request with the VM's own identity in it.
    async fn leaky_upstream() -> Fake {
        fake(|req: Request<Incoming>| async move {
            let body = format!("{VM} {}", req.uri());
            let mut r = Response::new(full(body));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(APPLICATION_TEXT),
            );
            r
        })
        .await
    }

    // --- request validation -------------------------------------------------------------------

    #[tokio::test]
    async fn every_response_carries_the_contract_headers() {
        let h = harness();
        let cases = [
            ("root", get("/"), ctx(Outcome::Passthrough)),
            ("forwarded leaf", v1("project/project-id"), mapped(grant())),
            (
                "local leaf",
                v1("instance/service-accounts/default/email"),
                mapped(grant()),
            ),
            ("redirect", v1("instance"), mapped(grant())),
            ("not found", v1("instance/nope"), ctx(Outcome::Passthrough)),
            (
                "no flavor",
                request(Method::GET, "/computeMetadata/v1/", false, ""),
                mapped(grant()),
            ),
            ("bad path", get("/computeMetadata/v1/%zz"), mapped(grant())),
            ("denied", v1("project/project-id"), ctx(Outcome::Deny)),
            (
                "token",
                v1("instance/service-accounts/default/token"),
                mapped(grant()),
            ),
            (
                "xff",
                {
                    let mut r = v1("");
                    r.headers_mut()
                        .insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
                    r
                },
                mapped(grant()),
            ),
        ];
        for (what, req, ctx) in cases {
            let a = send(&h, req, &ctx).await;
            assert_contract_headers(&a, what);
        }
    }

    #[tokio::test]
    async fn x_forwarded_for_is_refused_and_never_forwarded() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let up = leaky_upstream().await;
        let h = harness_with(up.upstream(), StubTokens::default());
        for outcome in [
            Outcome::Passthrough,
            Outcome::ServiceAccount(Arc::new(grant())),
        ] {
            let mut req = v1("project/project-id");
            req.headers_mut()
                .insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
            let a = send(&h, req, &ctx(outcome)).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN);
            assert!(a.body.contains("X-Forwarded-For"), "{}", a.body);
        }
        assert_eq!(up.hits(), 0);
    }

    #[tokio::test]
    async fn legacy_paths_are_404_and_never_forwarded() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let up = leaky_upstream().await;
        let h = harness_with(up.upstream(), StubTokens::default());
        for path in [
            "/0.1/meta-data/service-accounts/default/acquire",
            "/0.1/meta-data/",
            "/computeMetadata/v1beta1/instance/service-accounts/default/token",
            "/computeMetadata/V1BETA1/",
        ] {
            let a = send(
                &h,
                request(Method::GET, path, false, ""),
                &ctx(Outcome::Passthrough),
            )
            .await;
            assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
        }
        assert_eq!(up.hits(), 0);
    }

    #[tokio::test]
    async fn malformed_paths_are_400_and_never_forwarded() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let up = leaky_upstream().await;
        let h = harness_with(up.upstream(), StubTokens::default());
        for path in [
            "/computeMetadata/v1/instance/%zz",
            "/computeMetadata/v1/instance/%4",
            "/computeMetadata/v1/instance/../instance/service-accounts/",
            "/computeMetadata/v1/instance/./service-accounts/",
            "/computeMetadata/v1/instance/%2e%2E/",
            "/computeMetadata/v1/instance/%2E/service-accounts/",
            "/computeMetadata/v1/instance%2Fservice-accounts/",
            "/computeMetadata/v1/instance%5Cservice-accounts/",
            "/computeMetadata/v1/instance/name%00",
            "/computeMetadata/v1//instance/",
            "//computeMetadata/v1/instance/",
            "/computeMetadata/v1/instance/%ff",
        ] {
            let a = send(&h, get(path), &ctx(Outcome::Passthrough)).await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path}: {}", a.body);
        }
        assert_eq!(up.hits(), 0);
    }

    #[tokio::test]
    async fn v1_without_the_flavor_header_is_403_in_html_and_root_answers() {
        let h = harness();
        let a = send(
            &h,
            request(
                Method::GET,
                "/computeMetadata/v1/project/project-id",
                false,
                "",
            ),
            &ctx(Outcome::Passthrough),
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert!(a.body.contains("Error 403 (Forbidden)"), "{}", a.body);
        assert!(
            a.body.contains("Missing Metadata-Flavor:Google header"),
            "{}",
            a.body
        );
        assert_eq!(a.header("content-type"), TEXT_HTML);
        let mut wrong = request(Method::GET, "/computeMetadata/v1/", false, "");
        wrong
            .headers_mut()
            .insert("metadata-flavor", HeaderValue::from_static("google-ish"));
        assert_eq!(
            send(&h, wrong, &mapped(grant())).await.status,
            StatusCode::FORBIDDEN
        );
        for outcome in [
            Outcome::Passthrough,
            Outcome::Deny,
            Outcome::ServiceAccount(Arc::new(grant())),
        ] {
            let a = send(&h, request(Method::GET, "/", false, ""), &ctx(outcome)).await;
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(a.body, "computeMetadata/\n");
        }
    }

    #[tokio::test]
    async fn bodies_over_one_mib_are_413() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let up = fake(|req: Request<Incoming>| async move {
            let n = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes().len())
                .unwrap_or(0);
            Response::new(full(format!("got {n}")))
        })
        .await;
        let h = harness_with(up.upstream(), StubTokens::default());
        let big = vec![b'x'; MAX_BODY + 1];
        let a = send(
            &h,
            request(Method::POST, "/computeMetadata/v1/instance/x", true, big),
            &ctx(Outcome::Passthrough),
        )
        .await;
        assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
        let mut declared = request(
            Method::PUT,
            "/computeMetadata/v1/instance/guest-attributes/ns/k",
            true,
            "",
        );
        declared
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("2000000"));
        assert_eq!(
            send(&h, declared, &mapped(grant())).await.status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(up.hits(), 0);
        let put = request(
            Method::PUT,
            "/computeMetadata/v1/instance/guest-attributes/ns/k",
            true,
            vec![b'v'; 1000],
        );
        let a = send(&h, put, &mapped(grant())).await;
        assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "got 1000"));
    }

    // --- decisions ----------------------------------------------------------------------------

    #[tokio::test]
    async fn deny_refuses_every_path_and_names_the_caller() {
        let h = harness();
        for rel in [
            "",
            "project/project-id",
            "instance/service-accounts/default/token",
            "instance/attributes/",
        ] {
            let a = send(&h, v1(rel), &ctx(Outcome::Deny)).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{rel}");
            assert!(
                a.body.contains("no policy rule maps uid=1000(alice)"),
                "{rel}: {}",
                a.body
            );
            assert!(a.body.contains("add a rule"), "{}", a.body);
        }
        assert_eq!(
            send(&h, get("/computeMetadata/"), &ctx(Outcome::Deny))
                .await
                .status,
            StatusCode::FORBIDDEN
        );
        assert!(h.tokens.calls().is_empty());
    }

    #[tokio::test]
    async fn a_deny_rule_is_named() {
        let cfg = Config::parse(
            "[[rule]]\nname = \"nobody\"\nuid = 1000\naction = \"deny\"\n",
            Path::new("t.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let policy = Policy::new(&cfg.rules).unwrap_or_else(|e| panic!("{e}"));
        let decision = policy.decide(&caller());
        let a = send(
            &harness(),
            v1("project/project-id"),
            &CallContext {
                identity: caller(),
                decision,
            },
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert!(
            a.body.contains("\"nobody\"") && a.body.contains("uid=1000(alice)"),
            "{}",
            a.body
        );
    }

    #[tokio::test]
    async fn passthrough_forwards_untouched() {
        let h = harness();
        let pass = ctx(Outcome::Passthrough);
        let a = send(&h, v1("instance/service-accounts/"), &pass).await;
        assert_eq!(a.body, format!("default/\n{VM}/\n"));
        let a = send(&h, v1("instance/service-accounts/default/token"), &pass).await;
        assert_eq!(
            a.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "the emulator's own answer"
        );
        assert!(h.tokens.calls().is_empty());
        let a = send(&h, v1("instance?recursive=true"), &pass).await;
        assert_eq!(a.status, StatusCode::MOVED_PERMANENTLY);
    }

    // --- service accounts of a mapped caller --------------------------------------------------

    #[tokio::test]
    async fn the_service_account_tree_shows_only_the_grant() {
        let h = harness();
        let me = mapped(grant());
        let a = send(&h, v1("instance/service-accounts/"), &me).await;
        assert_eq!(a.body, format!("default/\n{APP}/\n"));
        assert_eq!(a.header("content-type"), APPLICATION_TEXT);
        let account = json!({"aliases": ["default"], "email": APP, "scopes": [CLOUD_PLATFORM]});
        let a = send(&h, v1("instance/service-accounts/?recursive=true"), &me).await;
        assert_eq!(a.header("content-type"), APPLICATION_JSON);
        assert_eq!(
            a.json(),
            json!({ "default": account.clone(), APP: account.clone() })
        );
        for acct in ["default", APP] {
            let a = send(&h, v1(&format!("instance/service-accounts/{acct}/")), &me).await;
            assert_eq!(
                a.body, "aliases\nemail\nidentity\nscopes\ntoken\n",
                "{acct}"
            );
            let a = send(
                &h,
                v1(&format!("instance/service-accounts/{acct}/?recursive=true")),
                &me,
            )
            .await;
            assert_eq!(a.json(), account, "{acct}");
            let a = send(
                &h,
                v1(&format!("instance/service-accounts/{acct}/email")),
                &me,
            )
            .await;
            assert_eq!(
                (a.body.as_str(), a.header("content-type")),
                (APP, APPLICATION_TEXT)
            );
            assert_eq!(a.header("etag").len(), 16);
            let a = send(
                &h,
                v1(&format!("instance/service-accounts/{acct}/aliases")),
                &me,
            )
            .await;
            assert_eq!(a.body, "default\n");
            let a = send(
                &h,
                v1(&format!("instance/service-accounts/{acct}/scopes")),
                &me,
            )
            .await;
            assert_eq!(a.body, format!("{CLOUD_PLATFORM}\n"));
        }
        let limited = mapped(Grant {
            scopes: Some(vec!["s1".to_owned(), "s2".to_owned()]),
            ..grant()
        });
        assert_eq!(
            send(&h, v1("instance/service-accounts/default/scopes"), &limited)
                .await
                .body,
            "s1\ns2\n"
        );
        let a = send(
            &h,
            v1("instance/service-accounts/default/scopes?alt=json"),
            &limited,
        )
        .await;
        assert_eq!(a.json(), json!(["s1", "s2"]));
    }

    #[tokio::test]
    async fn other_accounts_and_unknown_leaves_are_404() {
        let h = harness();
        for rel in [
            format!("instance/service-accounts/{VM}/"),
            format!("instance/service-accounts/{VM}/email"),
            "instance/service-accounts/other/token".to_owned(),
            "instance/service-accounts/default/nope".to_owned(),
            "instance/service-accounts/default/email/".to_owned(),
            "instance/service-accounts/default/token/x".to_owned(),
        ] {
            let a = send(&h, v1(&rel), &mapped(grant())).await;
            assert_eq!(a.status, StatusCode::NOT_FOUND, "{rel}");
        }
        assert!(h.tokens.calls().is_empty());
    }

    #[tokio::test]
    async fn nothing_under_service_accounts_is_forwarded_for_a_mapped_caller() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let up = leaky_upstream().await;
        let h = harness_with(up.upstream(), StubTokens::default());
        let me = mapped(grant());
        for rel in [
            "instance/service-accounts/",
            "instance/service-accounts",
            "instance/service-accounts/?recursive=true",
            "instance/Service-Accounts/",
            "INSTANCE/service-accounts/default/",
            "instance/service-accounts/default",
            "instance/service-accounts/default/email",
            "instance/service-accounts/default/token",
            "instance/service-accounts/default/identity?audience=a",
            &format!("instance/service-accounts/{VM}/token"),
            "instance/service-accounts/x/y/z",
            "instance",
            "",
        ] {
            let a = send(
                &h,
                get(&format!(
                    "/computeMetadata/v1{}{rel}",
                    if rel.is_empty() { "" } else { "/" }
                )),
                &me,
            )
            .await;
            assert!(!a.body.contains(VM), "{rel}: {}", a.body);
        }
        let put = request(
            Method::PUT,
            "/computeMetadata/v1/instance/service-accounts/default/email",
            true,
            "x",
        );
        assert_eq!(
            send(&h, put, &me).await.status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(up.hits(), 0);
    }

    #[tokio::test]
    async fn a_mapped_caller_reaches_the_upstream_only_through_v1_paths() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let up = leaky_upstream().await;
        let h = harness_with(up.upstream(), StubTokens::default());
        let me = mapped(grant());
        for (target, status, body) in [
            ("/", StatusCode::OK, "computeMetadata/\n"),
            ("/?recursive=true", StatusCode::OK, "computeMetadata/\n"),
            ("/computeMetadata/", StatusCode::OK, "v1/\n"),
            ("/computeMetadata/?recursive=true", StatusCode::OK, "v1/\n"),
            ("/computeMetadata", StatusCode::MOVED_PERMANENTLY, ""),
            (
                "/computeMetadata/v1;x/instance/?recursive=true",
                StatusCode::NOT_FOUND,
                "",
            ),
            (
                "/computeMetadata/v1/instance/service-accounts;x/",
                StatusCode::NOT_FOUND,
                "",
            ),
            (
                "/computeMetadata/v1/instance;x/?recursive=true",
                StatusCode::NOT_FOUND,
                "",
            ),
            (
                "/computeMetadata/v1/instance/service-accounts%20/",
                StatusCode::NOT_FOUND,
                "",
            ),
            ("/favicon.ico", StatusCode::NOT_FOUND, ""),
        ] {
            let a = send(&h, get(target), &me).await;
            assert_eq!(a.status, status, "{target}");
            if !body.is_empty() {
                assert_eq!(a.body, body, "{target}");
            }
        }
        assert_eq!(up.hits(), 0);
        let a = send(&h, get("/?recursive=true"), &ctx(Outcome::Passthrough)).await;
        assert!(
            a.body.contains(VM),
            "passthrough forwards everything: {}",
            a.body
        );
        assert_eq!(up.hits(), 1);
    }

    #[tokio::test]
    async fn directories_without_a_slash_redirect_keeping_the_query() {
        let h = harness();
        let me = mapped(grant());
        for (rel, location) in [
            (
                "instance/service-accounts",
                "/computeMetadata/v1/instance/service-accounts/",
            ),
            (
                "instance/service-accounts/default?recursive=true",
                "/computeMetadata/v1/instance/service-accounts/default/?recursive=true",
            ),
            (
                "instance?recursive=true&alt=json",
                "/computeMetadata/v1/instance/?recursive=true&alt=json",
            ),
            ("project", "/computeMetadata/v1/project/"),
        ] {
            let a = send(&h, v1(rel), &me).await;
            assert_eq!(a.status, StatusCode::MOVED_PERMANENTLY, "{rel}");
            assert_eq!(a.header("location"), location, "{rel}");
        }
        let a = send(&h, get("/computeMetadata/v1"), &me).await;
        assert_eq!(a.header("location"), "/computeMetadata/v1/");
    }

    #[tokio::test]
    async fn token_asks_the_broker_with_the_right_scopes() {
        let h = harness();
        let a = send(
            &h,
            v1("instance/service-accounts/default/token"),
            &mapped(grant()),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.header("content-type"), APPLICATION_JSON);
        assert!(a.headers.get(header::ETAG).is_none());
        let v = a.json();
        assert_eq!(v["access_token"], format!("ya29.{APP}"));
        assert_eq!(v["token_type"], "Bearer");
        let expires = v["expires_in"].as_u64().unwrap_or(0);
        assert!((1790..=1800).contains(&expires), "{expires}");
        let encoded = format!("instance/service-accounts/{APP}/token?scopes=a%2Cb,c");
        send(&h, v1(&encoded), &mapped(grant())).await;
        let limited = mapped(Grant {
            scopes: Some(vec!["s1".to_owned(), "s2".to_owned()]),
            ..grant()
        });
        send(&h, v1("instance/service-accounts/default/token"), &limited).await;
        send(
            &h,
            v1("instance/service-accounts/default/token?scopes=s2"),
            &limited,
        )
        .await;
        assert_eq!(
            h.tokens.calls(),
            [
                format!("access {APP} {CLOUD_PLATFORM}"),
                format!("access {APP} a,b,c"),
                format!("access {APP} s1,s2"),
                format!("access {APP} s2"),
            ]
        );
    }

    #[tokio::test]
    async fn token_scopes_outside_the_grant_are_403_naming_the_rule() {
        let h = harness();
        let limited = mapped(Grant {
            scopes: Some(vec!["s1".to_owned()]),
            ..grant()
        });
        let a = send(
            &h,
            v1("instance/service-accounts/default/token?scopes=s1,s3"),
            &limited,
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert!(a.body.contains(RULE) && a.body.contains("s3"), "{}", a.body);
        assert!(h.tokens.calls().is_empty());
    }

    #[tokio::test]
    async fn broker_failures_answer_their_status_and_cause() {
        let cases = [
            (
                BrokerError::Unavailable {
                    email: APP.to_owned(),
                    status: 503,
                    message: "backend".to_owned(),
                },
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                BrokerError::PermissionDenied {
                    email: APP.to_owned(),
                    message: "no".to_owned(),
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (fail, status) in cases {
            let h = harness_with(
                Upstream::Emulator(Emulator::new(&config().emulator)),
                StubTokens {
                    fail: Some(fail),
                    ..StubTokens::default()
                },
            );
            for leaf in ["token", "identity?audience=x"] {
                let a = send(
                    &h,
                    v1(&format!("instance/service-accounts/default/{leaf}")),
                    &mapped(grant()),
                )
                .await;
                assert_eq!(a.status, status, "{leaf}");
                assert!(
                    a.body.starts_with("mds-agent: ") && a.body.contains(APP),
                    "{}",
                    a.body
                );
                assert!(
                    !a.body.contains("ya29") && !a.body.contains("eyJ"),
                    "{}",
                    a.body
                );
            }
        }
    }

    #[tokio::test]
    async fn identity_checks_the_audience() {
        let h = harness();
        for rel in ["identity", "identity?audience=", "identity?format=full"] {
            let a = send(
                &h,
                v1(&format!("instance/service-accounts/default/{rel}")),
                &mapped(grant()),
            )
            .await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{rel}");
        }
        let mut set = GlobSetBuilder::new();
        set.add(Glob::new("https://app.example.com").unwrap_or_else(|e| panic!("{e}")));
        let limited = mapped(Grant {
            audiences: Some(set.build().unwrap_or_else(|e| panic!("{e}"))),
            ..grant()
        });
        let a = send(
            &h,
            v1("instance/service-accounts/default/identity?audience=https://evil.example"),
            &limited,
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert!(a.body.contains(RULE), "{}", a.body);
        let a = send(
            &h,
            v1("instance/service-accounts/default/identity?audience=https%3A%2F%2Fapp.example.com&format=full&licenses=TRUE"),
            &limited,
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body, format!("eyJ.{APP}.https://app.example.com"));
        assert_eq!(a.header("content-type"), APPLICATION_TEXT);
        assert_eq!(
            h.tokens.calls(),
            [format!("id {APP} https://app.example.com")]
        );
    }

    // --- recursive views and concealment ------------------------------------------------------

    #[tokio::test]
    async fn recursive_views_show_the_callers_accounts_not_the_vms() {
        let h = harness();
        let me = mapped(grant());
        let account = json!({"aliases": ["default"], "email": APP, "scopes": [CLOUD_PLATFORM]});
        let accounts = json!({ "default": account.clone(), APP: account });
        for (rel, pointer) in [
            ("instance/?recursive=true", "/serviceAccounts"),
            ("instance/?recursive=true&alt=json", "/serviceAccounts"),
            ("instance/?recursive=1", "/serviceAccounts"),
            ("instance/?RECURSIVE=True", "/serviceAccounts"),
            ("?recursive=true", "/instance/serviceAccounts"),
        ] {
            let a = send(&h, v1(rel), &me).await;
            assert_eq!(a.status, StatusCode::OK, "{rel}");
            assert!(!a.body.contains(VM), "{rel}: {}", a.body);
            assert_eq!(a.json().pointer(pointer), Some(&accounts), "{rel}");
            assert_eq!(a.header("content-type"), APPLICATION_JSON);
        }
        let a = send(&h, v1("instance/?recursive=true&alt=text"), &me).await;
        assert!(
            a.body
                .contains(&format!("serviceAccounts/default/email {APP}\n")),
            "{}",
            a.body
        );
        assert!(!a.body.contains(VM));
        let a = send(&h, v1("?recursive=true"), &me).await;
        assert_eq!(
            a.json()["project"]["projectId"],
            "demo-project",
            "the rest stays"
        );
        let a = send(&h, v1("instance/"), &me).await;
        assert!(
            a.body.contains("service-accounts/\n") && !a.body.contains(VM),
            "{}",
            a.body
        );
    }

    #[tokio::test]
    async fn concealed_paths_vanish_everywhere() {
        let h = harness();
        let me = mapped(Grant {
            conceal: vec![
                "instance/attributes/ssh-keys".to_owned(),
                "instance/service-accounts/default/scopes".to_owned(),
            ],
            ..grant()
        });
        for rel in [
            "instance/attributes/ssh-keys",
            "instance/attributes/SSH-KEYS",
            "instance/attributes/ssh-keys/x",
            "instance/service-accounts/default/scopes",
        ] {
            let a = send(&h, v1(rel), &me).await;
            assert_eq!(a.status, StatusCode::NOT_FOUND, "{rel}");
        }
        let a = send(&h, v1("instance/attributes/"), &me).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (StatusCode::OK, "enable-oslogin\n")
        );
        assert_eq!(a.header("content-type"), APPLICATION_TEXT);
        assert_eq!(
            send(&h, v1("instance/attributes/?alt=json"), &me)
                .await
                .status,
            StatusCode::BAD_REQUEST
        );
        let a = send(&h, v1("instance/attributes/?recursive=true"), &me).await;
        assert_eq!(a.json(), json!({"enable-oslogin": "TRUE"}));
        assert_eq!(
            send(&h, v1("instance/attributes"), &me).await.status,
            StatusCode::MOVED_PERMANENTLY
        );
        let a = send(&h, v1("instance/service-accounts/default/"), &me).await;
        assert_eq!(a.body, "aliases\nemail\nidentity\ntoken\n");
        for rel in ["instance/?recursive=true", "?recursive=true"] {
            let a = send(&h, v1(rel), &me).await;
            assert!(
                !a.body.contains("ssh-keys") && !a.body.contains("AAAA"),
                "{rel}: {}",
                a.body
            );
            assert!(a.body.contains("enable-oslogin"), "{rel}");
            let v = a.json();
            let accounts = v
                .pointer("/serviceAccounts")
                .or(v.pointer("/instance/serviceAccounts"));
            let default = accounts
                .and_then(|a| a.get("default"))
                .unwrap_or(&Value::Null);
            assert_eq!(default.get("scopes"), None, "{rel}: {default}");
            assert!(
                accounts
                    .and_then(|a| a.pointer(&format!("/{APP}/scopes")))
                    .is_some(),
                "{rel}: only default's are concealed"
            );
        }
        let a = send(
            &h,
            v1("instance/service-accounts/default/?recursive=true"),
            &me,
        )
        .await;
        assert_eq!(a.json(), json!({"aliases": ["default"], "email": APP}));
        assert_eq!(
            send(&h, v1("project/project-id"), &me).await.body,
            "demo-project"
        );
    }

    #[tokio::test]
    async fn long_polls_are_forwarded_and_streamed() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let release = Arc::new(tokio::sync::Notify::new());
        let up = {
            let release = release.clone();
            fake(move |req: Request<Incoming>| {
                let release = release.clone();
                async move {
                    let (tx, body) = channel_body();
                    let query = req.uri().query().unwrap_or("").to_owned();
                    tokio::spawn(async move {
                        release.notified().await;
                        let _ = tx.send(Bytes::from(query)).await;
                    });
                    Response::new(body.boxed())
                }
            })
            .await
        };
        let h = harness_with(up.upstream(), StubTokens::default());
        let test = async {
            let req =
                v1("instance/attributes/app?wait_for_change=true&last_etag=abc&timeout_sec=60");
            let response = h.mds.handle(req, &mapped(grant())).await;
            // The headers came back while the upstream still holds the body.
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                response
                    .headers()
                    .get("metadata-flavor")
                    .map(HeaderValue::as_bytes),
                Some(&b"Google"[..])
            );
            release.notify_one();
            answer(response).await
        };
        let a = tokio::time::timeout(Duration::from_secs(10), test)
            .await
            .unwrap_or_else(|_| panic!("stalled"));
        assert_eq!(a.body, "wait_for_change=true&last_etag=abc&timeout_sec=60");
        assert_contract_headers(&a, "forwarded long poll");
    }

    #[tokio::test]
    async fn a_recursive_long_poll_waits_on_the_upstream_and_keeps_its_etag() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let up = {
            let seen = seen.clone();
            fake(move |req: Request<Incoming>| {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(req.uri().to_string());
                async move {
                    let body = json!({"serviceAccounts": {VM: {"email": VM}}, "attributes": {"ssh-keys": "k"}, "name": "vm"});
                    let mut r = Response::new(full(body.to_string()));
                    r.headers_mut().insert(header::ETAG, HeaderValue::from_static("00000000000000aa"));
                    r
                }
            })
            .await
        };
        let h = harness_with(up.upstream(), StubTokens::default());
        let me = mapped(Grant {
            conceal: vec!["instance/attributes/ssh-keys".to_owned()],
            ..grant()
        });
        let a = send(&h, v1("instance/?recursive=true&wait_for_change=true&last_etag=00000000000000a9&timeout_sec=30"), &me).await;
        assert_eq!(
            seen.lock().unwrap_or_else(|e| e.into_inner()).as_slice(),
            ["/computeMetadata/v1/instance/?recursive=true&alt=json&wait_for_change=true&last_etag=00000000000000a9&timeout_sec=30"]
        );
        assert_eq!(a.header("etag"), "00000000000000aa");
        let v = a.json();
        assert_eq!(v["attributes"], json!({}));
        assert_eq!(v["name"], "vm");
        assert!(!a.body.contains(VM), "{}", a.body);
        assert_eq!(v["serviceAccounts"]["default"]["email"], APP);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_503_with_the_cause() {
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
        let upstream = Upstream::Real(
            crate::upstream::RealUpstream::new(&url, crate::upstream::test_support::TEST_MARK)
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let h = harness_with(upstream, StubTokens::default());
        for (rel, outcome) in [
            ("project/project-id", Outcome::Passthrough),
            (
                "instance/?recursive=true",
                Outcome::ServiceAccount(Arc::new(grant())),
            ),
        ] {
            let a = send(&h, v1(rel), &ctx(outcome)).await;
            assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{rel}");
            assert!(a.body.contains(&addr.to_string()), "{rel}: {}", a.body);
            assert_contract_headers(&a, rel);
        }
        // Tokens do not need the upstream.
        let a = send(
            &h,
            v1("instance/service-accounts/default/token"),
            &mapped(grant()),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn serves_requests_from_a_real_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let h = Arc::new(harness());
        let server = h.clone();
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let server = server.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        server.mds.handle(req, &mapped(grant())).await,
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let mut req = get(&format!(
            "http://{addr}/computeMetadata/v1/instance/service-accounts/default/email"
        ));
        req.headers_mut().insert(
            header::HOST,
            HeaderValue::from_static("metadata.google.internal"),
        );
        let response = client.request(req).await.unwrap_or_else(|e| panic!("{e}"));
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .to_bytes();
        assert_eq!((parts.status, &body[..]), (StatusCode::OK, APP.as_bytes()));
    }

    // --- the pure pieces ----------------------------------------------------------------------

    #[test]
    fn paths_decode_into_segments() {
        assert_eq!(
            decode_path("/"),
            Ok(MetaPath {
                segments: vec![],
                slash: true
            })
        );
        assert_eq!(
            decode_path("/computeMetadata/v1/instance/attributes/a%20b"),
            Ok(MetaPath {
                segments: vec![
                    "computeMetadata".into(),
                    "v1".into(),
                    "instance".into(),
                    "attributes".into(),
                    "a b".into()
                ],
                slash: false
            })
        );
        assert_eq!(decode_path("/a/b/").map(|p| p.slash), Ok(true));
        for bad in [
            "", "a", "/a//b", "/a/%2", "/a/%g0", "/a/..", "/a/%2e", "/%2f", "/a%00", "/%c3%28",
        ] {
            assert!(decode_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_are_classified_case_insensitively() {
        let kind = |p: &str| {
            decode_path(p)
                .map(|p| classify(&p))
                .unwrap_or(PathKind::Other)
        };
        assert_eq!(kind("/"), PathKind::Root);
        assert_eq!(kind("/0.1/meta-data"), PathKind::Legacy);
        assert_eq!(kind("/computeMetadata/v1beta1/"), PathKind::Legacy);
        assert_eq!(kind("/computeMetadata/v1"), PathKind::V1(vec![]));
        assert_eq!(
            kind("/COMPUTEMETADATA/V1/Instance/"),
            PathKind::V1(vec!["Instance".into()])
        );
        assert_eq!(kind("/computeMetadata/"), PathKind::Versions);
        assert_eq!(kind("/favicon.ico"), PathKind::Other);
        assert_eq!(kind("/computeMetadata/v2/"), PathKind::Other);
    }

    #[test]
    fn queries_decode_and_flags_are_generous() {
        let q = Query::parse(Some("scopes=a%2Cb+c&Recursive=TRUE&empty&x=1&x=2"));
        assert_eq!(q.get("scopes"), Some("a,b c"));
        assert_eq!(q.get("x"), Some("1"));
        assert_eq!(q.get("empty"), Some(""));
        assert!(q.flag("recursive"));
        assert!(!q.flag("missing"));
        assert!(!Query::parse(Some("recursive=false")).flag("recursive"));
        assert!(!Query::parse(Some("recursive=0")).flag("recursive"));
        assert!(Query::parse(Some("recursive=false&recursive=true")).flag("recursive"));
        assert!(Query::parse(Some("recursive=yes")).flag("recursive"));
        assert!(Query::parse(None).get("a").is_none());
    }

    #[test]
    fn scopes_split_on_commas() {
        assert_eq!(parse_scopes("a, b,,c "), ["a", "b", "c"]);
        assert!(parse_scopes("").is_empty());
    }

    #[test]
    fn json_keys_camel_case_predefined_names_only() {
        let p = |s: &str| {
            s.split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            json_key(&p("instance"), "service-accounts"),
            "serviceAccounts"
        );
        assert_eq!(
            json_key(&p("project"), "numeric-project-id"),
            "numericProjectId"
        );
        assert_eq!(json_key(&p(""), "instance"), "instance");
        assert_eq!(json_key(&p("instance/attributes"), "ssh-keys"), "ssh-keys");
        assert_eq!(
            json_key(&p("project/attributes"), "enable-oslogin"),
            "enable-oslogin"
        );
        assert_eq!(
            json_key(
                &p("instance/service-accounts"),
                "a-b@p-q.iam.gserviceaccount.com"
            ),
            "a-b@p-q.iam.gserviceaccount.com"
        );
        assert_eq!(json_key(&p("instance/guest-attributes/ns-1"), "k-1"), "k-1");
        assert_eq!(
            json_key(&p("instance/network-interfaces/0"), "access-configs"),
            "accessConfigs"
        );
        assert_eq!(
            json_key(&p("instance/attributes/x"), "a-b"),
            "aB",
            "only the attributes' own children keep names"
        );
    }

    #[test]
    fn json_paths_are_removed_through_objects_and_arrays() {
        let segs = |s: &str| s.split('/').map(str::to_owned).collect::<Vec<_>>();
        let mut tree = json!({
            "attributes": {"SSH-Keys": "k", "keep": "v"},
            "networkInterfaces": [{"accessConfigs": [{"externalIp": "1.2.3.4", "type": "x"}]}],
        });
        remove_json_path(&mut tree, &segs("instance"), &segs("attributes/ssh-keys"));
        remove_json_path(
            &mut tree,
            &segs("instance"),
            &segs("network-interfaces/0/access-configs/0/external-ip"),
        );
        remove_json_path(&mut tree, &segs("instance"), &segs("nope/deeper"));
        remove_json_path(&mut tree, &segs("instance"), &segs("network-interfaces/7"));
        assert_eq!(
            tree,
            json!({"attributes": {"keep": "v"}, "networkInterfaces": [{"accessConfigs": [{"type": "x"}]}]})
        );
    }

    #[test]
    fn listings_render_and_filter() {
        assert_eq!(render_listing(["a/", "b"]), "a/\nb\n");
        assert_eq!(render_listing([]), "");
        assert_eq!(
            filter_listing("a/\nSSH-Keys\nb\n", &["ssh-keys", "a"]),
            "b\n"
        );
    }

    #[test]
    fn text_renderings() {
        assert_eq!(leaf_text(&json!("v")), "v");
        assert_eq!(leaf_text(&json!(12)), "12");
        assert_eq!(leaf_text(&json!(["a", "b"])), "a\nb\n");
        assert_eq!(
            json_to_text(&json!({"a": {"b": "x"}, "c": [1, "y"]})),
            "a/b x\nc/0 1\nc/1 y\n"
        );
        assert_eq!(json_to_text(&json!("v")), "v\n");
    }

    #[test]
    fn etags_are_16_hex_and_differ_by_value() {
        let a = etag(b"one");
        assert_eq!(a.len(), 16);
        assert!(a
            .to_str()
            .is_ok_and(|s| s.chars().all(|c| c.is_ascii_hexdigit())));
        assert_eq!(a, etag(b"one"));
        assert_ne!(a, etag(b"two"));
    }

    #[test]
    fn stamping_adds_missing_headers_and_keeps_present_ones() {
        let mut headers = HeaderMap::new();
        headers.insert("server", HeaderValue::from_static("Upstream"));
        stamp(&mut headers);
        assert_eq!(
            headers.get("server").map(HeaderValue::as_bytes),
            Some(&b"Upstream"[..])
        );
        assert_eq!(
            headers.get("metadata-flavor").map(HeaderValue::as_bytes),
            Some(&b"Google"[..])
        );
        assert_eq!(headers.get_all("metadata-flavor").iter().count(), 1);
        stamp(&mut headers);
        assert_eq!(headers.len(), 4);
    }

    #[test]
    fn expires_in_is_at_least_one_second() {
        assert_eq!(remaining_secs(Instant::now()), 1);
        let left = remaining_secs(Instant::now() + Duration::from_secs(100));
        assert!((99..=100).contains(&left), "{left}");
    }

    #[test]
    fn error_pages() {
        let r = error_response(StatusCode::SERVICE_UNAVAILABLE, "why");
        assert_eq!(
            r.headers()
                .get(header::CONTENT_TYPE)
                .map(HeaderValue::as_bytes),
            Some(APPLICATION_TEXT.as_bytes())
        );
        let r = html_error(StatusCode::NOT_FOUND, "<x>");
        assert_eq!(
            r.headers()
                .get(header::CONTENT_TYPE)
                .map(HeaderValue::as_bytes),
            Some(TEXT_HTML.as_bytes())
        );
        assert_eq!(
            r.headers().get("server").map(HeaderValue::as_bytes),
            Some(&b"Metadata Server for VM"[..])
        );
    }
}
