//! Mints access and ID tokens for the service accounts that policy maps callers to, through the
//! IAM Service Account Credentials API, with the agent's own credential.
//!
//! Tokens are cached per (account, scopes) and (account, audience), minted once however many
//! callers miss at the same time, and refreshed in the background ahead of expiry so that warm
//! callers never wait on IAM. Token text never reaches logs or `Debug` output.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::upstream::Upstream;

/// The scope of the agent's own token: enough to call the IAM Credentials API.
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
/// A cached token is handed out only while it has at least this long to live.
const SERVE_FLOOR: Duration = Duration::from_secs(60);
/// Bound on one IAM call, connection to last body byte.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// IAM calls per mint, for 429/5xx/connection failures.
const ATTEMPTS: u32 = 3;
/// First backoff between attempts; doubled each time, with jitter.
const RETRY_BASE: Duration = Duration::from_millis(100);
/// After a failed background refresh, wait this long before trying again.
const REFRESH_RETRY: Duration = Duration::from_secs(30);
/// ID tokens carry no lifetime in IAM's answer; this is theirs when the JWT has no `exp`.
const ID_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Largest IAM answer read (real ones are a few KiB).
const MAX_RESPONSE: usize = 1 << 20;
/// Everything but unreserved characters and `@` is escaped in the email's path segment.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'@')
    .remove(b'.')
    .remove(b'-')
    .remove(b'_')
    .remove(b'~');

/// Why a token could not be had. Messages name the cause and the fix; clients retry both the
/// 500s and the 503s `status` maps these to.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// `iam_endpoint` in the config is not usable.
    #[error("iam_endpoint {url:?} is not an http:// or https:// URL ({cause}): set iam_endpoint = \"https://iamcredentials.googleapis.com\"")]
    Endpoint { url: String, cause: String },
    /// The agent could not get its own token to call IAM with.
    #[error("the agent's own credential is unavailable ({cause}): on GCE give the VM a service account with the cloud-platform scope; elsewhere set credentials = \"/path/to/key.json\"")]
    AgentToken { cause: String },
    /// IAM refused the agent's own token (HTTP 401).
    #[error("IAM Credentials API rejected the agent's own credential (IAM said: {message}): the VM's service account token needs the cloud-platform or iam scope")]
    Unauthenticated { message: String },
    /// The agent's account may not mint tokens for `email` (HTTP 403).
    #[error("permission denied minting a token for {email}: grant roles/iam.serviceAccountTokenCreator on {email} to the VM's service account (IAM said: {message})")]
    PermissionDenied { email: String, message: String },
    /// HTTP 404.
    #[error("service account {email} does not exist (IAM said: {message}): fix the service_account of the rule that grants it")]
    NotFound { email: String, message: String },
    /// HTTP 400.
    #[error("IAM Credentials API rejected the request for {email} as invalid (IAM said: {message}): check the rule's scopes and audiences, and [token] lifetime_secs (at most 3600 unless an organization policy allows more)")]
    BadRequest { email: String, message: String },
    /// HTTP 408, 429 or 5xx, after retrying.
    #[error("IAM Credentials API is unavailable (HTTP {status}) minting a token for {email} (IAM said: {message}); try again shortly")]
    Unavailable {
        email: String,
        status: u16,
        message: String,
    },
    /// No connection, or no answer in time, after retrying.
    #[error("IAM Credentials API unreachable at {url}: {cause}; check the VM's route and firewall to it, or iam_endpoint")]
    Unreachable { url: String, cause: String },
    /// Any other HTTP status.
    #[error("IAM Credentials API answered HTTP {status} minting a token for {email} (IAM said: {message})")]
    Rejected {
        email: String,
        status: u16,
        message: String,
    },
    /// A 200 the broker cannot use.
    #[error("unusable answer from the IAM Credentials API for {email}: {cause}")]
    BadResponse { email: String, cause: String },
    /// The minting task ended without an answer: the runtime is shutting down.
    #[error("token minting was abandoned because the agent is shutting down; retry")]
    Aborted,
}

impl BrokerError {
    /// The HTTP status the metadata server answers with: 503 when IAM (or the agent's own
    /// credential) is unavailable for now, 500 otherwise.
    pub fn status(&self) -> StatusCode {
        match self {
            BrokerError::AgentToken { .. }
            | BrokerError::Unavailable { .. }
            | BrokerError::Unreachable { .. }
            | BrokerError::Aborted => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Worth another attempt at once (with backoff).
    fn is_transient(&self) -> bool {
        matches!(
            self,
            BrokerError::Unavailable { .. } | BrokerError::Unreachable { .. }
        )
    }
}

/// An OAuth access token for a service account.
#[derive(Clone)]
pub struct AccessToken {
    pub token: String,
    pub expires_at: Instant,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A Google-signed OIDC ID token for a service account.
#[derive(Clone)]
pub struct IdToken {
    pub jwt: String,
    pub expires_at: Instant,
}

impl fmt::Debug for IdToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdToken")
            .field("jwt", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The agent's own credential, which it calls IAM with.
pub trait AgentToken: Send + Sync {
    fn token(&self) -> Pin<Box<dyn Future<Output = Result<String, BrokerError>> + Send + '_>>;
}

/// The agent's own token from the real metadata server: the VM's default service account.
pub struct UpstreamAgentToken {
    upstream: Arc<Upstream>,
    /// Held across the fetch, so concurrent callers wait for one fetch.
    cached: tokio::sync::Mutex<Option<Minted>>,
}

impl UpstreamAgentToken {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        UpstreamAgentToken {
            upstream,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    async fn fetch(&self) -> Result<String, BrokerError> {
        let mut cached = self.cached.lock().await;
        if let Some(token) = cached.as_ref().filter(|t| t.fresh(Instant::now())) {
            return Ok(token.secret.clone());
        }
        let path = format!(
            "/computeMetadata/v1/instance/service-accounts/default/token?scopes={CLOUD_PLATFORM}"
        );
        let response = self
            .upstream
            .get(&path)
            .await
            .map_err(|e| BrokerError::AgentToken {
                cause: format!("metadata server: {}", causes(&e)),
            })?;
        if response.status != StatusCode::OK {
            return Err(BrokerError::AgentToken {
                cause: format!(
                    "metadata server answered HTTP {} for the VM's own token: {}",
                    response.status,
                    excerpt(&response.body)
                ),
            });
        }
        let token = parse_metadata_token(&response.body, Instant::now())?;
        debug!(
            expires_in_s = token
                .expires_at
                .saturating_duration_since(Instant::now())
                .as_secs(),
            "fetched the agent's own token from the metadata server"
        );
        let secret = token.secret.clone();
        *cached = Some(token);
        Ok(secret)
    }
}

impl AgentToken for UpstreamAgentToken {
    fn token(&self) -> Pin<Box<dyn Future<Output = Result<String, BrokerError>> + Send + '_>> {
        Box::pin(self.fetch())
    }
}

/// The agent's own token from gcp_auth: a service-account key file, or its default chain
/// (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud credentials, ...). gcp_auth caches the token.
pub struct GcpAuthAgentToken {
    provider: Arc<dyn gcp_auth::TokenProvider>,
}

impl GcpAuthAgentToken {
    /// `credentials`: the config's key file; `None` uses gcp_auth's default chain.
    pub async fn new(credentials: Option<&Path>) -> Result<Self, BrokerError> {
        let provider: Arc<dyn gcp_auth::TokenProvider> = match credentials {
            Some(path) => Arc::new(gcp_auth::CustomServiceAccount::from_file(path).map_err(
                |e| BrokerError::AgentToken {
                    cause: format!("cannot use key file {}: {}", path.display(), causes(&e)),
                },
            )?),
            None => gcp_auth::provider()
                .await
                .map_err(|e| BrokerError::AgentToken {
                    cause: format!("no credentials found: {}", causes(&e)),
                })?,
        };
        Ok(GcpAuthAgentToken { provider })
    }
}

impl AgentToken for GcpAuthAgentToken {
    fn token(&self) -> Pin<Box<dyn Future<Output = Result<String, BrokerError>> + Send + '_>> {
        Box::pin(async move {
            let token = self
                .provider
                .token(&[CLOUD_PLATFORM])
                .await
                .map_err(|e| BrokerError::AgentToken { cause: causes(&e) })?;
            Ok(token.as_str().to_owned())
        })
    }
}

/// Stands in when the agent has no credential of its own (off GCE, none configured): every mint
/// fails with the reason, and everything but tokens keeps working.
pub struct NoAgentToken(pub BrokerError);

impl AgentToken for NoAgentToken {
    fn token(&self) -> Pin<Box<dyn Future<Output = Result<String, BrokerError>> + Send + '_>> {
        let error = self.0.clone();
        Box::pin(async move { Err(error) })
    }
}

/// Mints and caches tokens; cheap to share behind an `Arc`.
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    agent_token: Arc<dyn AgentToken>,
    /// Invariant: an entry exists only while a mint is in flight for it or a refresher owns it.
    cache: Mutex<HashMap<Key, Entry>>,
}

/// What the broker takes from the config (tests shorten some of it).
struct Settings {
    iam_endpoint: String,
    lifetime: Duration,
    refresh_before: Duration,
    default_scopes: Vec<String>,
    retry_base: Duration,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Access { email: String, scopes: Vec<String> },
    Id { email: String, audience: String },
}

impl Key {
    fn email(&self) -> &str {
        match self {
            Key::Access { email, .. } | Key::Id { email, .. } => email,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Access { email, scopes } => {
                write!(f, "access token for {email} (scopes {})", scopes.join(","))
            }
            Key::Id { email, audience } => {
                write!(f, "ID token for {email} (audience {audience})")
            }
        }
    }
}

/// A token as cached. No `Debug`: it holds the secret.
#[derive(Clone)]
struct Minted {
    secret: String,
    minted_at: Instant,
    expires_at: Instant,
}

impl Minted {
    /// Servable while more than the floor remains: 60 s, or a quarter of the lifetime for
    /// short-lived tokens (which would otherwise never be served from the cache).
    fn fresh(&self, now: Instant) -> bool {
        self.expires_at.saturating_duration_since(now) > SERVE_FLOOR.min(self.lifetime() / 4)
    }

    fn lifetime(&self) -> Duration {
        self.expires_at.saturating_duration_since(self.minted_at)
    }

    /// `refresh_before` ahead of expiry, but never in the first half of the token's life, so
    /// that short-lived tokens cannot make the refresher spin.
    fn refresh_at(&self, refresh_before: Duration) -> Instant {
        let ahead = self
            .expires_at
            .checked_sub(refresh_before)
            .unwrap_or(self.minted_at);
        ahead.max(self.minted_at + self.lifetime() / 2)
    }
}

/// The outcome of one mint, shared by every caller that waited for it.
type Flight = watch::Receiver<Option<Result<Minted, BrokerError>>>;

struct Entry {
    token: Option<Minted>,
    flight: Option<Flight>,
    last_asked: Instant,
    refreshing: bool,
}

impl Broker {
    /// Fails only if `iam_endpoint` is unusable; nothing is fetched until the first request.
    pub fn new(cfg: &Config, agent_token: Arc<dyn AgentToken>) -> Result<Broker, BrokerError> {
        let settings = Settings {
            iam_endpoint: cfg.iam_endpoint.clone(),
            lifetime: Duration::from_secs(cfg.token.lifetime_secs),
            refresh_before: Duration::from_secs(cfg.token.refresh_before_secs),
            default_scopes: cfg.token.default_scopes.clone(),
            retry_base: RETRY_BASE,
        };
        Broker::with_settings(settings, agent_token)
    }

    fn with_settings(
        mut settings: Settings,
        agent_token: Arc<dyn AgentToken>,
    ) -> Result<Broker, BrokerError> {
        let endpoint_error = |cause: &str| BrokerError::Endpoint {
            url: settings.iam_endpoint.clone(),
            cause: cause.to_owned(),
        };
        let uri: http::Uri = settings
            .iam_endpoint
            .parse()
            .map_err(|e: http::uri::InvalidUri| endpoint_error(&e.to_string()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            return Err(endpoint_error("needs a scheme and a host"));
        }
        if uri.query().is_some() || !matches!(uri.path(), "" | "/") {
            return Err(endpoint_error("must not have a path or query"));
        }
        settings.iam_endpoint = settings.iam_endpoint.trim_end_matches('/').to_owned();
        // http:// too: tests and private endpoints; webpki roots so no system store is needed.
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Broker {
            inner: Arc::new(Inner {
                settings,
                client,
                agent_token,
                cache: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// An access token for `email` with `scopes` (the configured default scopes if empty).
    pub async fn access_token(
        &self,
        email: &str,
        scopes: &[String],
    ) -> Result<AccessToken, BrokerError> {
        let mut scopes = if scopes.is_empty() {
            self.inner.settings.default_scopes.clone()
        } else {
            scopes.to_vec()
        };
        scopes.sort();
        scopes.dedup();
        let key = Key::Access {
            email: email.to_owned(),
            scopes,
        };
        let token = Inner::get(&self.inner, key).await?;
        Ok(AccessToken {
            token: token.secret,
            expires_at: token.expires_at,
        })
    }

    /// An ID token for `email` with `aud` = `audience` and the email claim.
    pub async fn id_token(&self, email: &str, audience: &str) -> Result<IdToken, BrokerError> {
        let key = Key::Id {
            email: email.to_owned(),
            audience: audience.to_owned(),
        };
        let token = Inner::get(&self.inner, key).await?;
        Ok(IdToken {
            jwt: token.secret,
            expires_at: token.expires_at,
        })
    }
}

impl Inner {
    fn cache(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        // Nothing panics while holding the lock, so a poisoned map is still consistent.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn get(inner: &Arc<Inner>, key: Key) -> Result<Minted, BrokerError> {
        let flight = {
            let mut cache = inner.cache();
            let now = Instant::now();
            let entry = cache.entry(key.clone()).or_insert_with(|| Entry {
                token: None,
                flight: None,
                last_asked: now,
                refreshing: false,
            });
            entry.last_asked = now;
            if let Some(token) = entry.token.as_ref().filter(|t| t.fresh(now)) {
                return Ok(token.clone());
            }
            match &entry.flight {
                Some(flight) => flight.clone(),
                None => Inner::start_flight(inner, &key, entry),
            }
        };
        land(flight).await
    }

    /// Mints in a task of its own, so that a caller hanging up does not abandon the others.
    fn start_flight(inner: &Arc<Inner>, key: &Key, entry: &mut Entry) -> Flight {
        let (tx, rx) = watch::channel(None);
        entry.flight = Some(rx.clone());
        let inner = Arc::clone(inner);
        let key = key.clone();
        tokio::spawn(async move {
            let result = inner.mint(&key).await;
            let outcome = Inner::settle(&inner, &key, result);
            tx.send_replace(Some(outcome));
        });
        rx
    }

    /// Records a mint's result; on failure falls back to the cached token while it is valid.
    fn settle(
        inner: &Arc<Inner>,
        key: &Key,
        result: Result<Minted, BrokerError>,
    ) -> Result<Minted, BrokerError> {
        let mut cache = inner.cache();
        let Some(entry) = cache.get_mut(key) else {
            return result;
        };
        entry.flight = None;
        match result {
            Ok(token) => {
                entry.token = Some(token.clone());
                if !entry.refreshing {
                    entry.refreshing = true;
                    tokio::spawn(refresh(Arc::downgrade(inner), key.clone()));
                }
                Ok(token)
            }
            Err(error) => {
                let now = Instant::now();
                if let Some(token) = entry.token.as_ref().filter(|t| t.expires_at > now) {
                    warn!(
                        %key,
                        %error,
                        valid_for_s = token.expires_at.saturating_duration_since(now).as_secs(),
                        "could not mint a new token; serving the cached one until it expires"
                    );
                    return Ok(token.clone());
                }
                if !entry.refreshing {
                    cache.remove(key);
                }
                Err(error)
            }
        }
    }

    async fn mint(&self, key: &Key) -> Result<Minted, BrokerError> {
        let email = utf8_percent_encode(key.email(), PATH_SEGMENT);
        let base = &self.settings.iam_endpoint;
        let (url, body) = match key {
            Key::Access { scopes, .. } => (
                format!("{base}/v1/projects/-/serviceAccounts/{email}:generateAccessToken"),
                json!({
                    "scope": scopes,
                    "lifetime": format!("{}s", self.settings.lifetime.as_secs()),
                }),
            ),
            Key::Id { audience, .. } => (
                format!("{base}/v1/projects/-/serviceAccounts/{email}:generateIdToken"),
                json!({ "audience": audience, "includeEmail": true }),
            ),
        };
        let body = Bytes::from(body.to_string());
        let mut attempt = 1;
        loop {
            match self.attempt(key, &url, body.clone()).await {
                Ok(token) => {
                    let expires_in_s = token.lifetime().as_secs();
                    info!(%key, expires_in_s, "minted");
                    return Ok(token);
                }
                Err(error) if error.is_transient() && attempt < ATTEMPTS => {
                    let delay = backoff(self.settings.retry_base, attempt);
                    debug!(%key, attempt, %error, retry_in_ms = delay.as_millis(), "IAM call failed");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn attempt(&self, key: &Key, url: &str, body: Bytes) -> Result<Minted, BrokerError> {
        let agent_token = self.agent_token.token().await?;
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {agent_token}")).map_err(|_| {
                BrokerError::AgentToken {
                    cause: "the token has characters an HTTP header cannot carry".to_owned(),
                }
            })?;
        authorization.set_sensitive(true);
        let request = Request::post(url)
            .header(header::AUTHORIZATION, authorization)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| BrokerError::Endpoint {
                url: url.to_owned(),
                cause: e.to_string(),
            })?;
        let unreachable = |cause: String| BrokerError::Unreachable {
            url: self.settings.iam_endpoint.clone(),
            cause,
        };
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| unreachable(causes(&e)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        let (status, body) = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {}s", CALL_TIMEOUT.as_secs())))??;
        if !status.is_success() {
            return Err(status_error(key.email(), status, &body));
        }
        let bad = |cause: String| BrokerError::BadResponse {
            email: key.email().to_owned(),
            cause,
        };
        let minted_at = Instant::now();
        match key {
            Key::Access { .. } => {
                #[derive(Deserialize)]
                #[serde(rename_all = "camelCase")]
                struct Answer {
                    access_token: String,
                    expire_time: String,
                }
                let answer: Answer =
                    serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
                let expires = parse_rfc3339(&answer.expire_time).ok_or_else(|| {
                    bad(format!(
                        "expireTime {:?} is not RFC 3339",
                        answer.expire_time
                    ))
                })?;
                let expires_at = instant_at(expires, minted_at).ok_or_else(|| {
                    bad(format!(
                        "expireTime {} is already past: is this machine's clock right?",
                        answer.expire_time
                    ))
                })?;
                Ok(Minted {
                    secret: answer.access_token,
                    minted_at,
                    expires_at,
                })
            }
            Key::Id { .. } => {
                #[derive(Deserialize)]
                struct Answer {
                    token: String,
                }
                let answer: Answer =
                    serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
                let expires_at =
                    match jwt_exp(&answer.token) {
                        Some(exp) => instant_at(exp, minted_at).ok_or_else(|| {
                            bad("the ID token's exp is already past: is this machine's clock right?"
                            .to_owned())
                        })?,
                        None => {
                            debug!(%key, "ID token without a readable exp; assuming one hour");
                            minted_at + ID_TOKEN_LIFETIME
                        }
                    };
                Ok(Minted {
                    secret: answer.token,
                    minted_at,
                    expires_at,
                })
            }
        }
    }
}

/// Waits for a mint, however many others wait for it too.
async fn land(mut flight: Flight) -> Result<Minted, BrokerError> {
    match flight.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().unwrap_or(Err(BrokerError::Aborted)),
        Err(_) => Err(BrokerError::Aborted),
    }
}

/// Keeps one key's token fresh ahead of expiry until no caller has asked for it during a whole
/// token lifetime; then drops the key. Holds the broker weakly so that dropping it stops this.
async fn refresh(inner: Weak<Inner>, key: Key) {
    let mut not_before = None;
    loop {
        let wake = {
            let Some(inner) = inner.upgrade() else { return };
            let cache = inner.cache();
            let Some(token) = cache.get(&key).and_then(|entry| entry.token.as_ref()) else {
                return;
            };
            let due = token.refresh_at(inner.settings.refresh_before);
            not_before.map_or(due, |not_before: Instant| due.max(not_before))
        };
        tokio::time::sleep_until(wake).await;
        let Some(inner) = inner.upgrade() else { return };
        let (flight, previous) = {
            let mut cache = inner.cache();
            let now = Instant::now();
            let Some(entry) = cache.get_mut(&key) else {
                return;
            };
            let Some(token) = entry.token.clone() else {
                return;
            };
            let idle = now.saturating_duration_since(entry.last_asked) >= token.lifetime();
            if idle || token.expires_at <= now {
                debug!(%key, idle, "stopped refreshing");
                entry.refreshing = false;
                if entry.flight.is_none() {
                    cache.remove(&key);
                }
                return;
            }
            let flight = match &entry.flight {
                Some(flight) => flight.clone(),
                None => Inner::start_flight(&inner, &key, entry),
            };
            (flight, token.minted_at)
        };
        drop(inner);
        let renewed = matches!(land(flight).await, Ok(token) if token.minted_at > previous);
        not_before = (!renewed).then(|| Instant::now() + REFRESH_RETRY);
    }
}

/// `base * 2^(attempt-1)`, scaled by a random factor in [0.5, 1.5) so that many keys failing
/// together do not retry in lockstep.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let random = RandomState::new().hash_one(attempt) >> 32;
    let unit = f64::from(u32::try_from(random).unwrap_or(u32::MAX)) / 4_294_967_296.0;
    base.saturating_mul(1u32 << (attempt - 1).min(16))
        .mul_f64(0.5 + unit)
}

fn status_error(email: &str, status: StatusCode, body: &[u8]) -> BrokerError {
    #[derive(Deserialize)]
    struct GoogleError {
        error: GoogleErrorBody,
    }
    #[derive(Deserialize)]
    struct GoogleErrorBody {
        message: String,
    }
    let message = serde_json::from_slice::<GoogleError>(body)
        .map_or_else(|_| excerpt(body), |e| e.error.message);
    let email = email.to_owned();
    match status.as_u16() {
        400 => BrokerError::BadRequest { email, message },
        401 => BrokerError::Unauthenticated { message },
        403 => BrokerError::PermissionDenied { email, message },
        404 => BrokerError::NotFound { email, message },
        408 | 429 | 500..=599 => BrokerError::Unavailable {
            email,
            status: status.as_u16(),
            message,
        },
        other => BrokerError::Rejected {
            email,
            status: other,
            message,
        },
    }
}

/// The metadata server's `{"access_token","expires_in","token_type"}` as a cache entry.
fn parse_metadata_token(body: &[u8], now: Instant) -> Result<Minted, BrokerError> {
    #[derive(Deserialize)]
    struct Answer {
        access_token: String,
        expires_in: u64,
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|e| BrokerError::AgentToken {
        cause: format!("unreadable token answer from the metadata server: {e}"),
    })?;
    Ok(Minted {
        secret: answer.access_token,
        minted_at: now,
        expires_at: now + Duration::from_secs(answer.expires_in),
    })
}

/// A JWT's claims, read without verifying the signature (only to learn `exp`).
pub(crate) fn jwt_claims(jwt: &str) -> Option<serde_json::Value> {
    let mut parts = jwt.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    serde_json::from_slice(&base64url_decode(payload)?).ok()
}

fn jwt_exp(jwt: &str) -> Option<SystemTime> {
    let exp = jwt_claims(jwt)?.get("exp")?.as_u64()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

/// Unpadded (or padded) base64url, as JWTs use.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut bits, mut count) = (0u32, 0u32);
    for byte in text.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        bits = bits << 6 | u32::from(value);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Some(out)
}

/// The tokio instant of wall-clock time `at`, if it is after `now` (`now` and the wall clock
/// being read at the same moment).
fn instant_at(at: SystemTime, now: Instant) -> Option<Instant> {
    at.duration_since(SystemTime::now())
        .ok()
        .filter(|left| !left.is_zero())
        .map(|left| now + left)
}

/// Strict RFC 3339 in UTC as IAM writes it: `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<u64> {
        let digits = bytes.get(range)?;
        digits.iter().try_fold(0u64, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
        })
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(i, c)| bytes.get(i) != Some(&c)) {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let nanos = match &bytes[19..] {
        b"Z" => 0,
        [b'.', fraction @ .., b'Z'] if (1..=9).contains(&fraction.len()) => {
            let digits = number(20..20 + fraction.len())?;
            digits * 10u64.pow(9 - fraction.len() as u32)
        }
        _ => return None,
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let valid = year >= 1970
        && (1..=12).contains(&month)
        && day >= 1
        && usize::try_from(month - 1).is_ok_and(|m| day <= month_days[m])
        && hour < 24
        && minute < 60
        && second < 60;
    if !valid {
        return None;
    }
    // Days-from-civil (Howard Hinnant), March-based years.
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y % 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    UNIX_EPOCH.checked_add(Duration::new(secs, u32::try_from(nanos).ok()?))
}

/// `e` and its sources, "outer: inner: innermost".
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The start of a non-JSON answer, for messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

impl crate::mds::TokenSource for Broker {
    fn access_token<'a>(
        &'a self,
        email: &'a str,
        scopes: &'a [String],
    ) -> crate::mds::TokenFuture<'a, AccessToken> {
        Box::pin(Broker::access_token(self, email, scopes))
    }

    fn id_token<'a>(
        &'a self,
        email: &'a str,
        audience: &'a str,
    ) -> crate::mds::TokenFuture<'a, IdToken> {
        Box::pin(Broker::id_token(self, email, audience))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::fake_iam::{parse_fake_access_token, FakeIam, IamCallKind};

    const SA: &str = "app@demo-project.iam.gserviceaccount.com";
    const AGENT: &str = "agent-token";
    const ACCESS: IamCallKind = IamCallKind::AccessToken;

    struct StaticToken(&'static str);

    impl AgentToken for StaticToken {
        fn token(&self) -> Pin<Box<dyn Future<Output = Result<String, BrokerError>> + Send + '_>> {
            Box::pin(async move { Ok(self.0.to_owned()) })
        }
    }

    fn fake() -> FakeIam {
        FakeIam::start(std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback"))
    }

    fn settings(iam_endpoint: String) -> Settings {
        Settings {
            iam_endpoint,
            lifetime: Duration::from_secs(3600),
            refresh_before: Duration::from_secs(300),
            default_scopes: vec![CLOUD_PLATFORM.to_owned()],
            retry_base: Duration::from_millis(1),
        }
    }

    fn broker_for(fake: &FakeIam) -> Broker {
        Broker::with_settings(settings(fake.url()), Arc::new(StaticToken(AGENT)))
            .expect("broker for the fake IAM")
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    /// The fake's per-mint serial number, the last part of its access tokens.
    fn serial(token: &AccessToken) -> u64 {
        token
            .token
            .rsplit_once('.')
            .and_then(|(_, serial)| serial.parse().ok())
            .unwrap_or_else(|| panic!("not a fake access token: {token:?}"))
    }

    /// No mint in flight: every IAM answer has been taken in.
    fn settled(broker: &Broker) -> bool {
        broker
            .inner
            .cache()
            .values()
            .all(|entry| entry.flight.is_none())
    }

    fn cached_keys(broker: &Broker) -> usize {
        broker.inner.cache().len()
    }

    /// A paused clock auto-advances to the next timer whenever the runtime idles, which would
    /// fire the 10 s IAM timeout while loopback I/O is in flight. A running `spawn_blocking`
    /// task inhibits auto-advance (documented at `tokio::time::pause`): while this guard lives,
    /// time moves only by `tokio::time::advance`.
    struct Frozen {
        _release: std::sync::mpsc::Sender<()>,
    }

    fn freeze() -> Frozen {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            // Returns when the guard is dropped; the bound only stops a hung test from hanging.
            let _ = wait.recv_timeout(std::time::Duration::from_secs(60));
        });
        Frozen { _release: release }
    }

    /// Lets other tasks and socket I/O run until `done`, bounded in real time.
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::task::yield_now().await;
        }
    }

    /// Gives anything that is due a chance to run (nothing is, when this is used).
    async fn idle_a_while() {
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn concurrent_cold_requests_make_one_iam_call() {
        let fake = fake();
        fake.set_delay(Duration::from_millis(200));
        let broker = Arc::new(broker_for(&fake));
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let broker = Arc::clone(&broker);
            callers.spawn(async move { broker.access_token(SA, &[]).await });
        }
        let tokens: Vec<AccessToken> = callers
            .join_all()
            .await
            .into_iter()
            .map(|result| result.expect("every caller gets the token"))
            .collect();
        assert_eq!(fake.count(ACCESS), 1);
        assert!(tokens.iter().all(|t| t.token == tokens[0].token));
        assert_eq!(
            parse_fake_access_token(&tokens[0].token),
            Some((SA.to_owned(), strings(&[CLOUD_PLATFORM])))
        );
        let call = &fake.calls()[0];
        assert_eq!(call.authorization.as_deref(), Some("Bearer agent-token"));
        assert_eq!(call.email, SA);
    }

    #[tokio::test]
    async fn concurrent_failures_share_one_error() {
        let fake = fake();
        fake.set_delay(Duration::from_millis(100));
        fake.set_failure(Some((403, "Permission denied".to_owned())));
        let broker = Arc::new(broker_for(&fake));
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let broker = Arc::clone(&broker);
            callers.spawn(async move { broker.id_token(SA, "https://svc").await });
        }
        for result in callers.join_all().await {
            assert!(matches!(result, Err(BrokerError::PermissionDenied { .. })));
        }
        assert_eq!(fake.count(IamCallKind::IdToken), 1);
        assert_eq!(cached_keys(&broker), 0, "failed keys are not kept");
    }

    #[tokio::test]
    async fn cached_tokens_are_served_without_calling_iam() {
        let fake = fake();
        let broker = broker_for(&fake);
        let a = strings(&[
            "https://www.googleapis.com/auth/b",
            "https://www.googleapis.com/auth/a",
        ]);
        let first = broker.access_token(SA, &a).await.expect("minted");
        // Same scopes in another order, repeated: the same key.
        let reordered = strings(&[
            "https://www.googleapis.com/auth/a",
            "https://www.googleapis.com/auth/b",
            "https://www.googleapis.com/auth/a",
        ]);
        let again = broker.access_token(SA, &reordered).await.expect("cached");
        assert_eq!(again.token, first.token);
        assert_eq!(fake.count(ACCESS), 1);
        assert_eq!(
            fake.calls()[0].scopes,
            strings(&[
                "https://www.googleapis.com/auth/a",
                "https://www.googleapis.com/auth/b"
            ]),
            "scopes are sent sorted and deduplicated"
        );
        broker.access_token(SA, &[]).await.expect("other scopes");
        assert_eq!(fake.count(ACCESS), 2, "other scopes are another key");

        let id = broker.id_token(SA, "https://one").await.expect("ID token");
        assert_eq!(
            broker
                .id_token(SA, "https://one")
                .await
                .expect("cached")
                .jwt,
            id.jwt
        );
        broker
            .id_token(SA, "https://two")
            .await
            .expect("other audience");
        assert_eq!(fake.count(IamCallKind::IdToken), 2);
        let audiences: Vec<_> = fake
            .calls()
            .into_iter()
            .filter_map(|c| c.audience)
            .collect();
        assert_eq!(audiences, strings(&["https://one", "https://two"]));
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_of_expiry_with_no_caller_waiting() {
        let _frozen = freeze();
        let fake = fake();
        let broker = broker_for(&fake);
        let first = broker.access_token(SA, &[]).await.expect("first token");
        assert_eq!(serial(&first), 1);
        // expireTime has whole seconds, so the token lives 3599-3600 s: the refresh is due
        // at 3299-3300 s.
        tokio::time::advance(Duration::from_secs(3298)).await;
        idle_a_while().await;
        assert_eq!(fake.count(ACCESS), 1, "refreshed too early");
        tokio::time::advance(Duration::from_secs(3)).await;
        eventually("the background refresh", || {
            fake.count(ACCESS) == 2 && settled(&broker)
        })
        .await;
        // Past the first token's expiry, the refreshed one is served at once, from the cache.
        tokio::time::advance(Duration::from_secs(300)).await;
        let next = tokio::time::timeout(Duration::ZERO, broker.access_token(SA, &[]))
            .await
            .expect("served without waiting")
            .expect("token");
        assert_eq!(serial(&next), 2);
        assert_eq!(fake.count(ACCESS), 2);
        assert!(next.expires_at >= first.expires_at + Duration::from_secs(3299));
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_stops_for_keys_nobody_asks_for() {
        let _frozen = freeze();
        let fake = fake();
        let broker = broker_for(&fake);
        let idle = strings(&["https://www.googleapis.com/auth/idle"]);
        let busy = strings(&["https://www.googleapis.com/auth/busy"]);
        let calls_for = |scopes: &Vec<String>| {
            fake.calls()
                .iter()
                .filter(|call| &call.scopes == scopes)
                .count()
        };
        broker.access_token(SA, &idle).await.expect("idle key");
        broker.access_token(SA, &busy).await.expect("busy key");
        tokio::time::advance(Duration::from_secs(3301)).await;
        eventually("both refreshes", || {
            fake.count(ACCESS) == 4 && settled(&broker)
        })
        .await;
        tokio::time::advance(Duration::from_secs(1699)).await;
        broker
            .access_token(SA, &busy)
            .await
            .expect("busy key, cached");
        assert_eq!(fake.count(ACCESS), 4);
        // Second refresh due at about 6600 s: the idle key was last asked for 6600 s ago,
        // longer than a token lifetime, the busy one 1600 s ago.
        tokio::time::advance(Duration::from_secs(1603)).await;
        eventually("the idle key to be dropped", || {
            cached_keys(&broker) == 1 && settled(&broker) && calls_for(&busy) == 3
        })
        .await;
        assert_eq!(calls_for(&idle), 2);
        broker
            .access_token(SA, &idle)
            .await
            .expect("idle key again");
        assert_eq!(calls_for(&idle), 3, "a dropped key is minted afresh");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_refresh_keeps_the_token_and_tries_again_later() {
        let _frozen = freeze();
        let fake = fake();
        let broker = broker_for(&fake);
        broker.access_token(SA, &[]).await.expect("first token");
        fake.set_failure(Some((403, "Permission denied".to_owned())));
        tokio::time::advance(Duration::from_secs(3301)).await;
        eventually("the failed refresh", || {
            fake.count(ACCESS) == 2 && settled(&broker)
        })
        .await;
        let kept = tokio::time::timeout(Duration::ZERO, broker.access_token(SA, &[]))
            .await
            .expect("served without waiting")
            .expect("the cached token");
        assert_eq!(serial(&kept), 1);
        idle_a_while().await;
        assert_eq!(fake.count(ACCESS), 2, "no retry before REFRESH_RETRY");
        fake.set_failure(None);
        tokio::time::advance(REFRESH_RETRY).await;
        eventually("the second refresh", || {
            fake.count(ACCESS) == 3 && settled(&broker)
        })
        .await;
        let renewed = broker.access_token(SA, &[]).await.expect("renewed token");
        assert_eq!(serial(&renewed), 2);
    }

    #[tokio::test]
    async fn iam_down_serves_a_still_valid_cached_token() {
        let fake = fake();
        // expireTime has whole seconds, so the token may end up to 1 s sooner than 8 s.
        fake.set_lifetime(Duration::from_secs(8));
        let broker = broker_for(&fake);
        let first = broker.access_token(SA, &[]).await.expect("first token");
        fake.set_failure(Some((
            503,
            "The service is currently unavailable.".to_owned(),
        )));
        // Inside the last quarter of its life: past the serving floor, so the request tries IAM
        // (as the background refresh did), and still valid, so it is what the caller gets.
        tokio::time::sleep(Duration::from_millis(6500)).await;
        let calls_before = fake.count(ACCESS);
        let second = broker
            .access_token(SA, &[])
            .await
            .expect("the cached token");
        assert_eq!(second.token, first.token);
        assert_eq!(
            fake.count(ACCESS),
            calls_before + ATTEMPTS as usize,
            "the request tried IAM"
        );
    }

    #[tokio::test]
    async fn iam_down_with_nothing_cached_is_a_503() {
        let fake = fake();
        fake.set_failure(Some((
            503,
            "The service is currently unavailable.".to_owned(),
        )));
        let broker = broker_for(&fake);
        let error = broker
            .access_token(SA, &[])
            .await
            .expect_err("no token to serve");
        assert!(
            matches!(error, BrokerError::Unavailable { status: 503, .. }),
            "{error}"
        );
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            error.to_string().contains("currently unavailable"),
            "{error}"
        );
        assert_eq!(fake.count(ACCESS), ATTEMPTS as usize);
        assert_eq!(cached_keys(&broker), 0);
    }

    #[tokio::test]
    async fn unreachable_iam_is_a_503_naming_the_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let url = format!("http://{}", closed.local_addr().expect("address"));
        drop(closed);
        let broker = Broker::with_settings(settings(url.clone()), Arc::new(StaticToken(AGENT)))
            .expect("broker");
        let error = broker
            .id_token(SA, "https://svc")
            .await
            .expect_err("nobody listens");
        assert!(matches!(error, BrokerError::Unreachable { .. }), "{error}");
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        let message = error.to_string();
        assert!(
            message.contains(&format!("unreachable at {url}")),
            "{message}"
        );
        assert!(message.contains("refused"), "{message}");
    }

    #[tokio::test]
    async fn permission_denied_is_not_retried_and_names_the_role() {
        let fake = fake();
        let iam_says = "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).";
        fake.set_failure(Some((403, iam_says.to_owned())));
        let broker = broker_for(&fake);
        let error = broker.access_token(SA, &[]).await.expect_err("denied");
        assert_eq!(fake.count(ACCESS), 1);
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            error.to_string(),
            format!(
                "permission denied minting a token for {SA}: grant roles/iam.serviceAccountTokenCreator \
                 on {SA} to the VM's service account (IAM said: {iam_says})"
            )
        );
    }

    #[tokio::test]
    async fn client_errors_are_not_retried() {
        let fake = fake();
        let broker = broker_for(&fake);
        fake.set_failure(Some((
            404,
            "Not found; Gaia id not found for email".to_owned(),
        )));
        let error = broker
            .access_token(SA, &[])
            .await
            .expect_err("no such account");
        assert!(error
            .to_string()
            .starts_with(&format!("service account {SA} does not exist")));
        fake.set_failure(Some((
            400,
            "Request contains an invalid argument.".to_owned(),
        )));
        let error = broker.id_token(SA, "x").await.expect_err("bad request");
        assert!(matches!(error, BrokerError::BadRequest { .. }), "{error}");
        assert_eq!(fake.calls().len(), 2);
    }

    #[tokio::test]
    async fn retries_server_errors_then_succeeds() {
        let fake = fake();
        fake.fail_next(2, 500, "Internal error encountered.");
        let broker = broker_for(&fake);
        let token = broker
            .access_token(SA, &[])
            .await
            .expect("third attempt succeeds");
        assert_eq!(serial(&token), 1);
        assert_eq!(fake.count(ACCESS), 3);
    }

    #[tokio::test]
    async fn the_agent_token_is_the_bearer() {
        let fake = fake();
        fake.require_bearer(Some("the-right-one".to_owned()));
        let wrong = broker_for(&fake);
        let error = wrong.access_token(SA, &[]).await.expect_err("401");
        assert!(
            matches!(error, BrokerError::Unauthenticated { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("cloud-platform"), "{error}");
        let right =
            Broker::with_settings(settings(fake.url()), Arc::new(StaticToken("the-right-one")))
                .expect("broker");
        right.access_token(SA, &[]).await.expect("accepted");
        assert_eq!(fake.count(ACCESS), 2, "401 is not retried");
    }

    #[tokio::test]
    async fn the_email_is_percent_encoded_in_the_path() {
        let fake = fake();
        let broker = broker_for(&fake);
        let odd = "a/b?c#d%e:f@demo-project.iam.gserviceaccount.com";
        broker.id_token(odd, "https://svc").await.expect("minted");
        assert_eq!(fake.calls()[0].email, odd);
    }

    #[tokio::test]
    async fn expiries_come_from_iam() {
        let fake = fake();
        fake.set_lifetime(Duration::from_secs(1800));
        let broker = broker_for(&fake);
        let now = Instant::now();
        let access = broker.access_token(SA, &[]).await.expect("access token");
        let left = access.expires_at - now;
        assert!(
            left > Duration::from_secs(1798) && left <= Duration::from_secs(1801),
            "{left:?}"
        );
        let id = broker.id_token(SA, "https://svc").await.expect("ID token");
        let left = id.expires_at - now;
        assert!(
            left > Duration::from_secs(1798) && left <= Duration::from_secs(1801),
            "{left:?}"
        );
        let claims = jwt_claims(&id.jwt).expect("claims");
        assert_eq!(claims["aud"], "https://svc");
        assert_eq!(claims["email"], SA, "includeEmail is sent");
    }

    #[tokio::test]
    async fn broker_new_takes_endpoint_lifetime_and_default_scopes_from_the_config() {
        let fake = fake();
        let mut cfg = Config {
            iam_endpoint: fake.url(),
            ..Config::default()
        };
        cfg.token.lifetime_secs = 1200;
        let broker = Broker::new(&cfg, Arc::new(StaticToken(AGENT))).expect("broker");
        let now = Instant::now();
        let token = broker.access_token(SA, &[]).await.expect("token");
        assert_eq!(fake.calls()[0].scopes, cfg.token.default_scopes);
        // The fake honours the requested lifetime, as IAM does.
        let left = token.expires_at - now;
        assert!(
            left > Duration::from_secs(1198) && left <= Duration::from_secs(1201),
            "{left:?}"
        );
    }

    /// Needs CAP_NET_ADMIN, like the upstream module's tests: its sockets carry SO_MARK.
    #[tokio::test]
    async fn the_agent_token_comes_from_the_metadata_server_once() {
        // Marks sockets (CAP_NET_ADMIN).
        if !crate::testkit::sandbox::require_privileged() {
            return;
        }
        use crate::testkit::fake_metadata::FakeMetadata;
        use crate::upstream::RealUpstream;

        let metadata =
            FakeMetadata::start(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
        let url: http::Uri = format!("http://{}", metadata.local_addr())
            .parse()
            .expect("url");
        let upstream = RealUpstream::new(&url, 0x7e57).expect("upstream");
        let agent = Arc::new(UpstreamAgentToken::new(Arc::new(Upstream::Real(upstream))));
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let agent = Arc::clone(&agent);
            callers.spawn(async move { agent.token().await });
        }
        for token in callers.join_all().await {
            assert_eq!(token.expect("agent token"), "vm-token.1");
        }
        assert_eq!(agent.token().await.expect("cached"), "vm-token.1");
        let paths: Vec<_> = metadata
            .requests()
            .into_iter()
            .map(|r| r.path_and_query)
            .collect();
        assert_eq!(
            paths,
            [format!("/computeMetadata/v1/instance/service-accounts/default/token?scopes={CLOUD_PLATFORM}")]
        );

        let fake = fake();
        fake.require_bearer(Some("vm-token.1".to_owned()));
        let broker = Broker::with_settings(settings(fake.url()), agent).expect("broker");
        broker
            .id_token(SA, "https://svc")
            .await
            .expect("IAM accepts the VM's token");
    }

    #[tokio::test]
    async fn no_agent_token_is_a_503_with_the_fix() {
        let cfg = Config {
            upstream: crate::config::UpstreamKind::Emulator,
            ..Config::default()
        };
        let upstream = Upstream::from_config(&cfg).expect("emulator");
        let agent = Arc::new(UpstreamAgentToken::new(Arc::new(upstream)));
        let fake = fake();
        let broker = Broker::with_settings(settings(fake.url()), agent).expect("broker");
        let error = broker
            .access_token(SA, &[])
            .await
            .expect_err("the emulator mints no VM token");
        assert!(matches!(error, BrokerError::AgentToken { .. }), "{error}");
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(error.to_string().contains("HTTP 503"), "{error}");
        assert!(
            fake.calls().is_empty(),
            "IAM is not called without a credential"
        );
    }

    #[test]
    fn parses_expire_time() {
        let at = |secs, nanos| Some(UNIX_EPOCH + Duration::new(secs, nanos));
        assert_eq!(parse_rfc3339("2026-01-01T00:00:00Z"), at(1_767_225_600, 0));
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56Z"), at(1_709_210_096, 0));
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:00.5Z"),
            at(951_868_800, 500_000_000)
        );
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00.000000001Z"), at(0, 1));
        for bad in [
            "2026-01-01 00:00:00Z",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00+00:00",
            "2026-01-01T00:00:00.Z",
            "2026-01-01T00:00:00.1234567890Z",
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:60Z",
            "2026-1-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "+026-01-01T00:00:00Z",
            "",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_jwt_exp() {
        // {"aud":"x","exp":1767225600}, unpadded base64url.
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4IiwiZXhwIjoxNzY3MjI1NjAwfQ.c2ln";
        assert_eq!(
            jwt_exp(jwt),
            Some(UNIX_EPOCH + Duration::from_secs(1_767_225_600))
        );
        assert_eq!(
            jwt_exp("eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4In0.c2ln"),
            None,
            "no exp"
        );
        assert_eq!(jwt_exp("not-a-jwt"), None);
        assert_eq!(jwt_exp("a.!!!.c"), None);
        assert_eq!(base64url_decode("Zm9vYmFy"), Some(b"foobar".to_vec()));
        assert_eq!(base64url_decode("Zm9vYg=="), Some(b"foob".to_vec()));
        assert_eq!(base64url_decode("-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(base64url_decode("Zm9vY"), None);
    }

    #[test]
    fn reads_the_metadata_servers_token_answer() {
        let now = Instant::now();
        let body = br#"{"access_token":"ya29.x","expires_in":3599,"token_type":"Bearer"}"#;
        let token = parse_metadata_token(body, now).expect("parses");
        assert_eq!(token.secret, "ya29.x");
        assert_eq!(token.expires_at - now, Duration::from_secs(3599));
        let error = parse_metadata_token(b"<html>", now)
            .err()
            .expect("rejected");
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn debug_output_never_shows_tokens() {
        let now = Instant::now();
        let access = format!(
            "{:?}",
            AccessToken {
                token: "ya29.secret".to_owned(),
                expires_at: now
            }
        );
        let id = format!(
            "{:?}",
            IdToken {
                jwt: "eyJ.secret.sig".to_owned(),
                expires_at: now
            }
        );
        assert!(
            !access.contains("secret") && access.contains("<redacted>"),
            "{access}"
        );
        assert!(!id.contains("secret") && id.contains("<redacted>"), "{id}");
    }

    #[test]
    fn endpoint_must_be_a_bare_http_url() {
        let agent: Arc<dyn AgentToken> = Arc::new(StaticToken(AGENT));
        for bad in [
            "iamcredentials.googleapis.com",
            "ftp://host",
            "https://host/v1",
            "https://host/?a=b",
            "",
        ] {
            let result = Broker::with_settings(settings(bad.to_owned()), Arc::clone(&agent));
            assert!(
                matches!(result, Err(BrokerError::Endpoint { .. })),
                "{bad:?}"
            );
        }
        let broker = Broker::with_settings(
            settings("https://iamcredentials.googleapis.com/".to_owned()),
            agent,
        )
        .expect("the default endpoint");
        assert_eq!(
            broker.inner.settings.iam_endpoint,
            "https://iamcredentials.googleapis.com"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter() {
        let base = Duration::from_millis(100);
        for attempt in 1..=3 {
            let nominal = base * 2u32.pow(attempt - 1);
            for _ in 0..50 {
                let delay = backoff(base, attempt);
                assert!(
                    delay >= nominal / 2 && delay < nominal * 3 / 2,
                    "{attempt}: {delay:?}"
                );
            }
        }
    }

    #[test]
    fn refresh_is_due_ahead_of_expiry_but_not_in_the_first_half() {
        let now = Instant::now();
        let token = |lifetime| Minted {
            secret: String::new(),
            minted_at: now,
            expires_at: now + Duration::from_secs(lifetime),
        };
        let before = Duration::from_secs(300);
        assert_eq!(
            token(3600).refresh_at(before),
            now + Duration::from_secs(3300)
        );
        assert_eq!(
            token(400).refresh_at(before),
            now + Duration::from_secs(200)
        );
    }
}
