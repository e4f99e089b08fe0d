//! A fake IAM Service Account Credentials API (`generateAccessToken`, `generateIdToken`) for
//! unit tests and for the privileged integration tests, which run it inside a test network
//! namespace and therefore hand it an already-bound listener.
//!
//! It speaks the real REST shapes and error format, and its tokens say whom they stand for:
//! access tokens read `fake-at.<email>.<scopes joined by ','>.<serial>`, ID tokens are unsigned
//! but real-shaped JWTs whose claims a client can decode.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::task::{JoinHandle, JoinSet};

const PATH_PREFIX: &str = "/v1/projects/-/serviceAccounts/";
/// What IAM reports when asked for no particular lifetime, and the lifetime of its ID tokens.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// Which IAM Credentials method was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IamCallKind {
    AccessToken,
    IdToken,
}

/// One request the fake received, whatever it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamCall {
    pub kind: IamCallKind,
    pub email: String,
    /// `scope` of a `generateAccessToken` body, in request order.
    pub scopes: Vec<String>,
    /// `audience` of a `generateIdToken` body.
    pub audience: Option<String>,
    /// The `Authorization` header as sent (these are test credentials).
    pub authorization: Option<String>,
}

#[derive(Default)]
struct State {
    calls: Vec<IamCall>,
    failure: Option<(u16, String)>,
    fail_next: VecDeque<(u16, String)>,
    delay: Duration,
    lifetime: Option<Duration>,
    bearer: Option<String>,
    serial: u64,
}

/// A running fake; the server stops when this is dropped.
pub struct FakeIam {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
}

impl FakeIam {
    /// Serves on `listener` from a task on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime, or if the listener cannot be handed to tokio.
    pub fn start(listener: std::net::TcpListener) -> FakeIam {
        let addr = listener
            .local_addr()
            .expect("fake IAM: the listener has no local address");
        listener
            .set_nonblocking(true)
            .expect("fake IAM: cannot make the listener non-blocking");
        let listener = tokio::net::TcpListener::from_std(listener)
            .expect("fake IAM: cannot register the listener with tokio (is a runtime running?)");
        let state = Arc::new(Mutex::new(State::default()));
        let server = tokio::spawn(serve(listener, Arc::clone(&state)));
        FakeIam {
            addr,
            state,
            server,
        }
    }

    /// Base URL to use as `iam_endpoint`, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn calls(&self) -> Vec<IamCall> {
        lock(&self.state).calls.clone()
    }

    /// How many requests of `kind` were received.
    pub fn count(&self, kind: IamCallKind) -> usize {
        lock(&self.state)
            .calls
            .iter()
            .filter(|call| call.kind == kind)
            .count()
    }

    /// Answer every request with HTTP `status` and a Google error body carrying `message`
    /// (until cleared with `None`).
    pub fn set_failure(&self, failure: Option<(u16, String)>) {
        lock(&self.state).failure = failure;
    }

    /// Answer the next `times` requests with HTTP `status` and `message`, then go back to
    /// whatever `set_failure` says.
    pub fn fail_next(&self, times: usize, status: u16, message: &str) {
        let mut state = lock(&self.state);
        state
            .fail_next
            .extend(std::iter::repeat_n((status, message.to_owned()), times));
    }

    /// Wait this long (on the tokio clock) before answering each request.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state).delay = delay;
    }

    /// Lifetime of the tokens handed out (their `expireTime` and JWT `exp`). By default access
    /// tokens live as long as the request's `lifetime` asks, ID tokens one hour.
    pub fn set_lifetime(&self, lifetime: Duration) {
        lock(&self.state).lifetime = Some(lifetime);
    }

    /// Answer 401 unless the request carries `Authorization: Bearer <token>`.
    pub fn require_bearer(&self, token: Option<String>) {
        lock(&self.state).bearer = token;
    }
}

impl Drop for FakeIam {
    fn drop(&mut self) {
        // The accept task owns the connection tasks: aborting it ends them too.
        self.server.abort();
    }
}

/// The email and scopes a fake access token was minted for. Relies on scopes being URLs
/// (`scheme://...`), which no email domain can contain.
pub fn parse_fake_access_token(token: &str) -> Option<(String, Vec<String>)> {
    let rest = token.strip_prefix("fake-at.")?;
    let (rest, serial) = rest.rsplit_once('.')?;
    if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let at = rest.find('@')?;
    let (dot, _) = rest[at..].match_indices('.').find(|(i, _)| {
        let scopes = &rest[at + i + 1..];
        scopes.split_once("://").is_some_and(|(scheme, _)| {
            !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphabetic())
        })
    })?;
    let email = &rest[..at + dot];
    let scopes = rest[at + dot + 1..].split(',').map(str::to_owned).collect();
    Some((email.to_owned(), scopes))
}

/// The claims of a JWT, decoded without verifying anything (as Python google-auth reads `exp`).
pub fn decode_jwt_claims(jwt: &str) -> Option<Value> {
    crate::broker::jwt_claims(jwt)
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn serve(listener: tokio::net::TcpListener, state: Arc<Mutex<State>>) {
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            Some(_) = connections.join_next() => continue,
        };
        let state = Arc::clone(&state);
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            // A client hanging up mid-request is not the fake's problem.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

enum Verdict {
    Fail(u16, String),
    AccessToken {
        token: String,
        expire_time: SystemTime,
    },
    IdToken {
        jwt: String,
    },
}

async fn handle(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let path = req.uri().path().to_owned();
    let Some((email, kind)) = parse_path(&path) else {
        return google_error(404, &format!("Method not found: {path}"));
    };
    if req.method() != Method::POST {
        return google_error(405, &format!("Method {} not allowed", req.method()));
    }
    let body: Value = match req.into_body().collect().await {
        Ok(collected) => serde_json::from_slice(&collected.to_bytes()).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let scopes: Vec<String> = body["scope"]
        .as_array()
        .map(|scopes| {
            scopes
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let audience = body["audience"].as_str().map(str::to_owned);
    let requested_lifetime = body["lifetime"]
        .as_str()
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs);

    let (delay, verdict) = {
        let mut state = lock(state);
        state.calls.push(IamCall {
            kind,
            email: email.clone(),
            scopes: scopes.clone(),
            audience: audience.clone(),
            authorization: authorization.clone(),
        });
        let expected = state.bearer.as_ref().map(|token| format!("Bearer {token}"));
        let now = SystemTime::now();
        let verdict = if expected.is_some() && expected != authorization {
            Verdict::Fail(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, \
                 login cookie or other valid authentication credential."
                    .to_owned(),
            )
        } else if let Some((status, message)) = state.fail_next.pop_front() {
            Verdict::Fail(status, message)
        } else if let Some((status, message)) = state.failure.clone() {
            Verdict::Fail(status, message)
        } else {
            match kind {
                IamCallKind::AccessToken if scopes.is_empty() => Verdict::Fail(
                    400,
                    "Request contains an invalid argument: at least one scope is required."
                        .to_owned(),
                ),
                IamCallKind::AccessToken => {
                    state.serial += 1;
                    let lifetime = state
                        .lifetime
                        .or(requested_lifetime)
                        .unwrap_or(DEFAULT_LIFETIME);
                    Verdict::AccessToken {
                        token: format!("fake-at.{email}.{}.{}", scopes.join(","), state.serial),
                        expire_time: now + lifetime,
                    }
                }
                IamCallKind::IdToken => match &audience {
                    Some(audience) if !audience.is_empty() => {
                        let include_email = body["includeEmail"].as_bool().unwrap_or(false);
                        let lifetime = state.lifetime.unwrap_or(DEFAULT_LIFETIME);
                        Verdict::IdToken {
                            jwt: fake_id_token(&email, audience, include_email, now, lifetime),
                        }
                    }
                    _ => Verdict::Fail(
                        400,
                        "Request contains an invalid argument: audience is required.".to_owned(),
                    ),
                },
            }
        };
        (state.delay, verdict)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match verdict {
        Verdict::Fail(status, message) => google_error(status, &message),
        Verdict::AccessToken { token, expire_time } => json_response(
            StatusCode::OK,
            &json!({ "accessToken": token, "expireTime": rfc3339(expire_time) }),
        ),
        Verdict::IdToken { jwt } => json_response(StatusCode::OK, &json!({ "token": jwt })),
    }
}

/// `(email, method)` from `/v1/projects/-/serviceAccounts/{EMAIL}:{method}`.
fn parse_path(path: &str) -> Option<(String, IamCallKind)> {
    let (email, method) = path.strip_prefix(PATH_PREFIX)?.rsplit_once(':')?;
    let kind = match method {
        "generateAccessToken" => IamCallKind::AccessToken,
        "generateIdToken" => IamCallKind::IdToken,
        _ => return None,
    };
    let email = percent_encoding::percent_decode_str(email)
        .decode_utf8()
        .ok()?;
    Some((email.into_owned(), kind))
}

fn google_error(status: u16, message: &str) -> Response<Full<Bytes>> {
    let canonical = match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        status,
        &json!({ "error": { "code": status.as_u16(), "message": message, "status": canonical } }),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    response
}

fn fake_id_token(
    email: &str,
    audience: &str,
    include_email: bool,
    now: SystemTime,
    lifetime: Duration,
) -> String {
    let iat = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let subject = unique_id(email);
    let mut claims = json!({
        "aud": audience,
        "azp": subject,
        "exp": iat + lifetime.as_secs(),
        "iat": iat,
        "iss": "https://accounts.google.com",
        "sub": subject,
    });
    if include_email {
        claims["email"] = json!(email);
        claims["email_verified"] = json!(true);
    }
    let header = json!({ "alg": "RS256", "typ": "JWT", "kid": "fake" });
    format!(
        "{}.{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes()),
        base64url(b"sig")
    )
}

/// A stable 21-digit number standing in for the service account's unique id (FNV-1a of the email).
fn unique_id(email: &str) -> String {
    let hash = email.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("1{hash:020}")
}

fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let bits = chunk.iter().enumerate().fold(0u32, |bits, (i, &byte)| {
            bits | u32::from(byte) << (16 - 8 * i)
        });
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(bits >> (18 - 6 * i) & 0x3f) as usize]));
        }
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SSZ`, the form IAM uses for `expireTime`.
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant), for dates after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SA: &str = "app@demo-project.iam.gserviceaccount.com";

    #[test]
    fn formats_expire_time_like_iam() {
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(rfc3339(at(1_767_225_600)), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(1_709_210_096)), "2024-02-29T12:34:56Z");
        assert_eq!(rfc3339(at(951_868_800)), "2000-03-01T00:00:00Z");
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn base64url_matches_the_rfc_4648_vectors_without_padding() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url(plain.as_bytes()), encoded, "{plain:?}");
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn access_tokens_say_whom_they_stand_for() {
        let scopes = "https://www.googleapis.com/auth/cloud-platform,https://www.googleapis.com/auth/userinfo.email";
        let token = format!("fake-at.{SA}.{scopes}.12");
        let (email, parsed) = parse_fake_access_token(&token).expect("parses");
        assert_eq!(email, SA);
        assert_eq!(parsed, scopes.split(',').collect::<Vec<_>>());
        assert_eq!(
            parse_fake_access_token("fake-at.a@b.c.https://x.y.z"),
            None,
            "no serial"
        );
        assert_eq!(parse_fake_access_token("ya29.real-looking"), None);
    }

    #[test]
    fn id_tokens_are_decodable_jwts() {
        let now = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let jwt = fake_id_token(SA, "https://svc.example", true, now, DEFAULT_LIFETIME);
        assert_eq!(jwt.split('.').count(), 3);
        let claims = decode_jwt_claims(&jwt).expect("claims decode");
        assert_eq!(claims["aud"], "https://svc.example");
        assert_eq!(claims["email"], SA);
        assert_eq!(claims["email_verified"], true);
        assert_eq!(claims["iat"], 1_767_225_600);
        assert_eq!(claims["exp"], 1_767_229_200);
        assert_eq!(claims["iss"], "https://accounts.google.com");
        assert_eq!(claims["sub"], claims["azp"]);
        assert_eq!(claims["sub"].as_str().map(str::len), Some(21));
        let without = fake_id_token(SA, "a", false, now, DEFAULT_LIFETIME);
        assert!(decode_jwt_claims(&without)
            .expect("decodes")
            .get("email")
            .is_none());
    }

    #[test]
    fn paths_carry_the_percent_encoded_email() {
        assert_eq!(
            parse_path(
                "/v1/projects/-/serviceAccounts/app%40p.iam.gserviceaccount.com:generateIdToken"
            ),
            Some((
                "app@p.iam.gserviceaccount.com".to_owned(),
                IamCallKind::IdToken
            ))
        );
        assert_eq!(
            parse_path("/v1/projects/-/serviceAccounts/a@b:signJwt"),
            None
        );
    }
}
