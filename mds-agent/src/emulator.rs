//! A built-in metadata server for machines off GCE, answering from `[emulator]` with the real
//! server's contract: listings, `?recursive=true` JSON, `alt`, directory redirects, ETags.
//!
//! It holds no credentials: the VM's own `token` and `identity` answer 503, because callers mapped
//! to a service account get theirs from the broker and only a passthrough caller can reach these.
//! Requests arrive validated by the mds layer (header, path), so it does not check them again.

use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode, Uri};
use serde_json::{json, Map, Value};

use crate::{
    config::EmulatorConfig,
    mds::{
        alt_on_listing, decode_path, error_response, json_key, listing_response, not_found,
        redirect, tree_response, value_response, Body, Query,
    },
    upstream::{UpstreamError, UpstreamResponse},
};

/// What the emulated VM's type is (the config does not name one).
const MACHINE_TYPE: &str = "e2-medium";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Longest hang of a `wait_for_change` whose `last_etag` is current.
const MAX_WAIT: Duration = Duration::from_secs(3600);
const NO_CREDENTIALS: &str =
    "the emulator cannot mint the VM's own tokens; map this caller to a service account";

/// A metadata tree; children in listing order.
enum Node {
    Dir(Vec<(String, Node)>),
    Value(Value),
    /// The VM account's `token` and `identity`: listed, left out of recursive JSON, never minted.
    Credential,
}

fn dir<const N: usize>(children: [(&str, Node); N]) -> Node {
    Node::Dir(
        children
            .into_iter()
            .map(|(name, node)| (name.to_owned(), node))
            .collect(),
    )
}

fn text(value: impl Into<String>) -> Node {
    Node::Value(Value::String(value.into()))
}

/// Ids are JSON numbers in recursive views, as on a real VM.
fn number(digits: &str) -> Node {
    Node::Value(
        digits
            .parse::<u64>()
            .map_or_else(|_| json!(digits), |n| json!(n)),
    )
}

fn attributes(attrs: &std::collections::BTreeMap<String, String>) -> Node {
    Node::Dir(
        attrs
            .iter()
            .map(|(k, v)| (k.clone(), text(v.clone())))
            .collect(),
    )
}

fn account(email: &str) -> Node {
    dir([
        ("aliases", Node::Value(json!(["default"]))),
        ("email", text(email)),
        ("identity", Node::Credential),
        ("scopes", Node::Value(json!([CLOUD_PLATFORM]))),
        ("token", Node::Credential),
    ])
}

/// The built-in metadata server.
pub struct Emulator {
    root: Node,
}

impl Emulator {
    pub fn new(cfg: &EmulatorConfig) -> Emulator {
        let num = &cfg.numeric_project_id;
        let sa = cfg.service_account.as_str();
        let instance = dir([
            ("attributes", attributes(&cfg.attributes)),
            ("hostname", text(&cfg.hostname)),
            ("id", number(&cfg.instance_id)),
            (
                "machine-type",
                text(format!("projects/{num}/machineTypes/{MACHINE_TYPE}")),
            ),
            ("name", text(&cfg.instance_name)),
            (
                "service-accounts",
                dir([("default", account(sa)), (sa, account(sa))]),
            ),
            ("zone", text(format!("projects/{num}/zones/{}", cfg.zone))),
        ]);
        let project = dir([
            ("attributes", attributes(&cfg.project_attributes)),
            ("numeric-project-id", number(num)),
            ("project-id", text(&cfg.project_id)),
        ]);
        let universe = dir([("universe-domain", text("googleapis.com"))]);
        let v1 = dir([
            ("instance", instance),
            ("project", project),
            ("universe", universe),
        ]);
        Emulator {
            root: dir([("computeMetadata", dir([("v1", v1)]))]),
        }
    }

    /// Answers a request; the request body is not read.
    pub async fn forward(&self, req: Request<Body>) -> Response<Body> {
        self.answer(req.method(), req.uri()).await
    }

    /// The agent's own GET, answered whole.
    pub async fn get(&self, path_and_query: &str) -> Result<UpstreamResponse, UpstreamError> {
        let uri: Uri =
            path_and_query
                .parse()
                .map_err(|e: http::uri::InvalidUri| UpstreamError::Request {
                    url: path_and_query.to_owned(),
                    cause: e.to_string(),
                })?;
        UpstreamResponse::collect(self.answer(&Method::GET, &uri).await, path_and_query).await
    }

    async fn answer(&self, method: &Method, uri: &Uri) -> Response<Body> {
        if method != Method::GET && method != Method::HEAD {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "the emulator answers GET only (it stores no guest attributes)",
            );
        }
        let query = Query::parse(uri.query());
        let response = self.lookup(uri, &query);
        if query.flag("wait_for_change") {
            wait_unchanged(&response, &query).await;
        }
        response
    }

    fn lookup(&self, uri: &Uri, query: &Query) -> Response<Body> {
        let path = match decode_path(uri.path()) {
            Ok(p) => p,
            Err(why) => {
                return error_response(StatusCode::BAD_REQUEST, &format!("bad request path: {why}"))
            }
        };
        let mut node = &self.root;
        for segment in &path.segments {
            let Node::Dir(children) = node else {
                return not_found();
            };
            let Some((_, child)) = children.iter().find(|(name, _)| name == segment) else {
                return not_found();
            };
            node = child;
        }
        let alt = query.get("alt");
        match node {
            Node::Dir(_) if !path.slash => redirect(uri.path(), uri.query()),
            Node::Dir(_) if query.flag("recursive") => {
                // JSON keys depend on the path below /computeMetadata/v1/.
                let parents = match path.segments.as_slice() {
                    [c, v, rest @ ..] if c == "computeMetadata" && v == "v1" => rest.to_vec(),
                    other => other.to_vec(),
                };
                tree_response(&to_json(node, &parents), alt, None)
            }
            Node::Dir(_) if alt.is_some() => alt_on_listing(),
            Node::Dir(children) => {
                let names: Vec<String> = children
                    .iter()
                    .map(|(name, child)| match child {
                        Node::Dir(_) => format!("{name}/"),
                        _ => name.clone(),
                    })
                    .collect();
                listing_response(names.iter().map(String::as_str))
            }
            Node::Value(_) | Node::Credential if path.slash => not_found(),
            Node::Value(value) => value_response(value, alt),
            Node::Credential => error_response(StatusCode::SERVICE_UNAVAILABLE, NO_CREDENTIALS),
        }
    }
}

/// Values never change here, so a long poll whose `last_etag` is current hangs for its
/// `timeout_sec` (as the real server would) instead of letting the client spin; any other answers
/// at once.
async fn wait_unchanged(response: &Response<Body>, query: &Query) {
    let current = response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok());
    if current.is_none() || current != query.get("last_etag") {
        return;
    }
    let secs = query
        .get("timeout_sec")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(secs).min(MAX_WAIT)).await;
}

/// The recursive JSON of a node; `parents` is its path below `/computeMetadata/v1/`.
fn to_json(node: &Node, parents: &[String]) -> Value {
    match node {
        Node::Dir(children) => {
            let mut map = Map::new();
            for (name, child) in children {
                if matches!(child, Node::Credential) {
                    continue;
                }
                let mut path = parents.to_vec();
                path.push(name.clone());
                map.insert(json_key(parents, name), to_json(child, &path));
            }
            Value::Object(map)
        }
        Node::Value(value) => value.clone(),
        Node::Credential => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::BodyExt;

    use super::*;

    fn emulator() -> Emulator {
        let mut cfg = EmulatorConfig::default();
        cfg.attributes
            .insert("ssh-keys".to_owned(), "alice:ssh-ed25519 AAAA".to_owned());
        cfg.attributes
            .insert("enable-oslogin".to_owned(), "TRUE".to_owned());
        cfg.project_attributes
            .insert("team".to_owned(), "infra".to_owned());
        Emulator::new(&cfg)
    }

    async fn get(path: &str) -> UpstreamResponse {
        match emulator().get(path).await {
            Ok(r) => r,
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    fn body(r: &UpstreamResponse) -> &str {
        std::str::from_utf8(&r.body).unwrap_or_else(|e| panic!("body is not UTF-8: {e}"))
    }

    fn header<'a>(r: &'a UpstreamResponse, name: &str) -> &'a str {
        r.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header"))
    }

    fn json_body(r: &UpstreamResponse) -> Value {
        serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", body(r)))
    }

    #[tokio::test]
    async fn root_lists_compute_metadata() {
        let r = get("/").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(body(&r), "computeMetadata/\n");
        assert_eq!(header(&r, "metadata-flavor"), "Google");
        assert_eq!(header(&r, "server"), "Metadata Server for VM");
    }

    #[tokio::test]
    async fn leaves_answer_the_configured_values() {
        let cases = [
            ("project/project-id", "demo-project"),
            ("project/numeric-project-id", "123456789012"),
            ("instance/id", "1234567890123456789"),
            ("instance/name", "mds-demo"),
            (
                "instance/hostname",
                "mds-demo.us-central1-a.c.demo-project.internal",
            ),
            ("instance/zone", "projects/123456789012/zones/us-central1-a"),
            (
                "instance/machine-type",
                "projects/123456789012/machineTypes/e2-medium",
            ),
            ("instance/attributes/ssh-keys", "alice:ssh-ed25519 AAAA"),
            ("project/attributes/team", "infra"),
            ("universe/universe-domain", "googleapis.com"),
            (
                "instance/service-accounts/default/email",
                "vm@demo-project.iam.gserviceaccount.com",
            ),
            ("instance/service-accounts/default/aliases", "default\n"),
            (
                "instance/service-accounts/default/scopes",
                "https://www.googleapis.com/auth/cloud-platform\n",
            ),
        ];
        for (path, want) in cases {
            let r = get(&format!("/computeMetadata/v1/{path}")).await;
            assert_eq!(r.status, StatusCode::OK, "{path}");
            assert_eq!(body(&r), want, "{path}");
            assert_eq!(header(&r, "content-type"), "application/text", "{path}");
            assert_eq!(header(&r, "etag").len(), 16, "{path}");
        }
    }

    #[tokio::test]
    async fn listings_mark_directories_with_a_slash() {
        let r = get("/computeMetadata/v1/instance/").await;
        assert_eq!(
            body(&r),
            "attributes/\nhostname\nid\nmachine-type\nname\nservice-accounts/\nzone\n"
        );
        let r = get("/computeMetadata/v1/instance/service-accounts/").await;
        assert_eq!(
            body(&r),
            "default/\nvm@demo-project.iam.gserviceaccount.com/\n"
        );
        let r = get("/computeMetadata/v1/instance/service-accounts/default/").await;
        assert_eq!(body(&r), "aliases\nemail\nidentity\nscopes\ntoken\n");
        let r = get("/computeMetadata/v1/instance/attributes/").await;
        assert_eq!(body(&r), "enable-oslogin\nssh-keys\n");
    }

    #[tokio::test]
    async fn a_directory_without_its_slash_redirects_keeping_the_query() {
        let r = get("/computeMetadata/v1/instance?recursive=true").await;
        assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            header(&r, "location"),
            "/computeMetadata/v1/instance/?recursive=true"
        );
        assert_eq!(header(&r, "metadata-flavor"), "Google");
    }

    #[tokio::test]
    async fn unknown_paths_and_leaves_with_a_slash_are_404() {
        for path in [
            "/computeMetadata/v1/instance/nope",
            "/computeMetadata/v1/project/project-id/",
            "/nope",
        ] {
            let r = get(path).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(header(&r, "metadata-flavor"), "Google", "{path}");
        }
    }

    #[tokio::test]
    async fn recursive_json_camel_cases_predefined_keys_only() {
        let r = get("/computeMetadata/v1/?recursive=true").await;
        assert_eq!(header(&r, "content-type"), "application/json");
        let v = json_body(&r);
        assert_eq!(v["project"]["numericProjectId"], json!(123456789012_u64));
        assert_eq!(v["project"]["projectId"], "demo-project");
        assert_eq!(v["instance"]["id"], json!(1234567890123456789_u64));
        assert_eq!(
            v["instance"]["machineType"],
            "projects/123456789012/machineTypes/e2-medium"
        );
        assert_eq!(
            v["instance"]["attributes"]["ssh-keys"],
            "alice:ssh-ed25519 AAAA"
        );
        assert_eq!(v["instance"]["attributes"]["enable-oslogin"], "TRUE");
        assert_eq!(v["universe"]["universeDomain"], "googleapis.com");
        let account = &v["instance"]["serviceAccounts"]["vm@demo-project.iam.gserviceaccount.com"];
        assert_eq!(account["aliases"], json!(["default"]));
        assert_eq!(account["email"], "vm@demo-project.iam.gserviceaccount.com");
        // token and identity are left out of recursive views.
        assert_eq!(
            v["instance"]["serviceAccounts"]["default"]
                .as_object()
                .map(Map::len),
            Some(3)
        );
    }

    #[tokio::test]
    async fn account_recursive_is_what_python_asks_first() {
        let r = get("/computeMetadata/v1/instance/service-accounts/default/?recursive=true").await;
        assert_eq!(
            json_body(&r),
            json!({
                "aliases": ["default"],
                "email": "vm@demo-project.iam.gserviceaccount.com",
                "scopes": [CLOUD_PLATFORM],
            })
        );
    }

    #[tokio::test]
    async fn alt_switches_format_and_is_refused_on_plain_listings() {
        let r = get("/computeMetadata/v1/project/numeric-project-id?alt=json").await;
        assert_eq!(body(&r), "123456789012");
        assert_eq!(header(&r, "content-type"), "application/json");
        let r = get("/computeMetadata/v1/project/project-id?alt=json").await;
        assert_eq!(body(&r), "\"demo-project\"");
        let r = get("/computeMetadata/v1/project/?recursive=true&alt=text").await;
        assert_eq!(header(&r, "content-type"), "application/text");
        assert!(
            body(&r).contains("projectId demo-project\n"),
            "{}",
            body(&r)
        );
        assert_eq!(
            get("/computeMetadata/v1/project/?alt=json").await.status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            get("/computeMetadata/v1/project/project-id?alt=xml")
                .await
                .status,
            StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test]
    async fn the_vm_accounts_tokens_are_503_with_the_fix() {
        for leaf in ["token", "identity?audience=x"] {
            let r = get(&format!(
                "/computeMetadata/v1/instance/service-accounts/default/{leaf}"
            ))
            .await;
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{leaf}");
            assert!(
                body(&r).contains("map this caller to a service account"),
                "{leaf}: {}",
                body(&r)
            );
            assert_eq!(header(&r, "metadata-flavor"), "Google");
        }
    }

    #[tokio::test]
    async fn etags_are_stable_per_value() {
        let a = get("/computeMetadata/v1/instance/name").await;
        let b = get("/computeMetadata/v1/instance/name").await;
        let c = get("/computeMetadata/v1/instance/hostname").await;
        assert_eq!(header(&a, "etag"), header(&b, "etag"));
        assert_ne!(header(&a, "etag"), header(&c, "etag"));
        assert!(header(&a, "etag").chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_change_answers_at_once_unless_the_etag_is_current() {
        let e = emulator();
        let start = tokio::time::Instant::now();
        let r = e
            .get("/computeMetadata/v1/instance/name?wait_for_change=true&timeout_sec=30")
            .await;
        assert_eq!(r.map(|r| r.status).ok(), Some(StatusCode::OK));
        assert_eq!(start.elapsed(), Duration::ZERO);
        let r = e
            .get(
                "/computeMetadata/v1/instance/name?wait_for_change=true&last_etag=0&timeout_sec=30",
            )
            .await;
        assert_eq!(r.map(|r| r.status).ok(), Some(StatusCode::OK));
        assert_eq!(start.elapsed(), Duration::ZERO);
        let tag = get("/computeMetadata/v1/instance/name").await;
        let tag = header(&tag, "etag").to_owned();
        let r = e
            .get(&format!("/computeMetadata/v1/instance/name?wait_for_change=true&last_etag={tag}&timeout_sec=30"))
            .await;
        assert_eq!(r.map(|r| r.status).ok(), Some(StatusCode::OK));
        assert_eq!(start.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn only_get_is_answered() {
        let mut req = Request::new(crate::mds::full(Bytes::from_static(b"v")));
        *req.method_mut() = Method::PUT;
        *req.uri_mut() = Uri::from_static("/computeMetadata/v1/instance/guest-attributes/a/b");
        let r = emulator().forward(req).await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn forward_answers_the_same_as_get() {
        let mut req = Request::new(crate::mds::full(Bytes::new()));
        *req.uri_mut() = Uri::from_static("/computeMetadata/v1/project/project-id");
        let r = emulator().forward(req).await;
        assert_eq!(r.status(), StatusCode::OK);
        let body = r.into_body().collect().await.map(|c| c.to_bytes()).ok();
        assert_eq!(body.as_deref(), Some(&b"demo-project"[..]));
    }
}
