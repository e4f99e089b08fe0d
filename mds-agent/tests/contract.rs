//! Privileged integration tests of the metadata contract, through the real interception path:
//! the kernel programs attached to a sandbox cgroup, the agent answering for the caller the kernel
//! recorded, the fake metadata server on 169.254.169.254:80 in the sandbox network namespace and
//! the fake IAM Credentials API. Every client is a real process run as a test user in a test
//! cgroup inside the sandbox; nothing here talks to the host's metadata address.

mod common;

use std::{
    collections::BTreeSet,
    fmt,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::{parse_lines, Env, VM_EMAIL};
use mds_agent::testkit::{
    fake_iam::{decode_jwt_claims, parse_fake_access_token, IamCallKind},
    sandbox::RunAs,
};
use serde_json::{json, Value};

const ALICE: u32 = 1000;
const BOB: u32 = 1001;
const CAROL: u32 = 1002;

const ALICE_SA: &str = "alice-sa@test-project.iam.gserviceaccount.com";
const BOB_SA: &str = "bob-sa@test-project.iam.gserviceaccount.com";
const CAROL_SA: &str = "carol-sa@test-project.iam.gserviceaccount.com";
const DEVS_SA: &str = "devs-sa@test-project.iam.gserviceaccount.com";
const UNIT_SA: &str = "app-unit@test-project.iam.gserviceaccount.com";
const CONTAINER_SA: &str = "container@test-project.iam.gserviceaccount.com";

const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const READ_ONLY: &str = "https://www.googleapis.com/auth/devstorage.read_only";
const BIGQUERY: &str = "https://www.googleapis.com/auth/bigquery";
const USERINFO_EMAIL: &str = "https://www.googleapis.com/auth/userinfo.email";

/// A container id the container rule matches (by its first 12 digits) and one it does not.
const CONTAINER_ID: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
const OTHER_CONTAINER_ID: &str = "deadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef";

const TOKEN: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
/// Bound on any one client process: the clients' own timeouts are shorter.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);

fn v1(rel: &str) -> String {
    format!("/computeMetadata/v1/{rel}")
}

/// A GET with `Metadata-Flavor: Google`.
fn get(path: &str) -> Value {
    json!({ "path": path })
}

/// A request with exactly these headers (none: not even the flavor header).
fn with_headers(method: &str, path: &str, headers: Value) -> Value {
    json!({ "method": method, "path": path, "headers": headers })
}

/// One HTTP response as the probe saw it.
struct Reply {
    /// The request, for assertion messages.
    what: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    elapsed: f64,
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body: String = self.body.chars().take(600).collect();
        write!(
            f,
            "[{} -> {} {:?} {body:?}]",
            self.what, self.status, self.headers
        )
    }
}

impl Reply {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{self:?} is not JSON: {e}"))
    }

    fn lines(&self) -> BTreeSet<&str> {
        self.body.lines().collect()
    }
}

/// Runs `cmd` to completion, killing it (and failing) if it takes longer than `limit`.
fn run_bounded(mut cmd: Command, limit: Duration, what: &str) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
    let (done, finished) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        let expired = finished.recv_timeout(limit).is_err();
        if expired {
            // Only the process this test started.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        expired
    });
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    let _ = done.send(());
    let killed = watchdog.join().expect("watchdog");
    assert!(
        !killed,
        "{what} did not finish within {limit:?}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Sends `specs` (see `http_request` in probe.py), one connection each, as `uid` in `cgroup`.
fn send(env: &Env, uid: u32, cgroup: &str, specs: &[Value]) -> Vec<Reply> {
    let args: Vec<String> = specs.iter().map(Value::to_string).collect();
    let mut all = vec!["http"];
    all.extend(args.iter().map(String::as_str));
    let what = format!("probe as uid {uid} in {cgroup:?}");
    let out = run_bounded(env.probe_cmd(uid, cgroup, &all), CLIENT_LIMIT, &what);
    let lines = parse_lines(&out.stdout, &out.stderr);
    assert_eq!(
        lines.len(),
        specs.len(),
        "{what}: one result per request expected: {lines:?}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines
        .into_iter()
        .zip(specs)
        .map(|(line, spec)| to_reply(&line, spec, uid))
        .collect()
}

fn to_reply(line: &Value, spec: &Value, uid: u32) -> Reply {
    let what = format!(
        "uid {uid} {} {}{}",
        spec["method"].as_str().unwrap_or("GET"),
        spec["path"].as_str().unwrap_or("?"),
        if spec.get("headers").is_some() {
            format!(" headers {}", spec["headers"])
        } else {
            String::new()
        }
    );
    assert!(
        line["status"].as_u64().unwrap_or(0) != 0,
        "{what}: the request failed: {line}"
    );
    Reply {
        what,
        status: u16::try_from(line["status"].as_u64().unwrap_or(0)).unwrap_or(0),
        headers: line["headers"]
            .as_array()
            .map(|pairs| {
                pairs
                    .iter()
                    .map(|p| {
                        (
                            p[0].as_str().unwrap_or("").to_owned(),
                            p[1].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        body: line["body"].as_str().unwrap_or("").to_owned(),
        elapsed: line["elapsed"].as_f64().unwrap_or(0.0),
    }
}

fn send_one(env: &Env, uid: u32, cgroup: &str, spec: Value) -> Reply {
    send(env, uid, cgroup, &[spec]).pop().expect("one reply")
}

/// The email, scopes and serial of a token answer, after checking its shape.
fn token_of(reply: &Reply) -> (String, Vec<String>, u64, String) {
    assert_eq!(reply.status, 200, "token request failed: {reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{reply:?}"
    );
    let v = reply.json();
    assert_eq!(v["token_type"], "Bearer", "{reply:?}");
    let expires_in = v["expires_in"].as_u64().unwrap_or(0);
    assert!(expires_in > 0, "expires_in must be positive: {reply:?}");
    let token = v["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token: {reply:?}"));
    let (email, scopes) = parse_fake_access_token(token)
        .unwrap_or_else(|| panic!("not a token of the fake IAM: {reply:?}"));
    let serial = token
        .rsplit('.')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (email, scopes, serial, token.to_owned())
}

fn expires_in(reply: &Reply) -> u64 {
    reply.json()["expires_in"].as_u64().unwrap_or(0)
}

fn claims_of(reply: &Reply) -> Value {
    assert_eq!(reply.status, 200, "identity request failed: {reply:?}");
    decode_jwt_claims(reply.body.trim())
        .unwrap_or_else(|| panic!("the identity answer is not a JWT: {reply:?}"))
}

/// Polls `done` every 50 ms until it holds or `limit` passes; returns whether it held.
fn poll(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn assert_no_vm_identity(replies: &[Reply]) {
    for r in replies {
        assert!(
            !r.body.contains(VM_EMAIL),
            "the VM's account leaked to a mapped caller: {r:?}"
        );
        assert!(
            !r.body.contains("vm-token."),
            "the VM's token leaked to a mapped caller: {r:?}"
        );
    }
}

// --- 1. per-identity tokens -------------------------------------------------------------------

#[test]
fn users_groups_units_and_containers_each_get_their_own_tokens() {
    let Some(env) = common::start("c-identities", |_| {
        format!(
            r#"
[[rule]]
name = "containers"
container = "{prefix}*"
service_account = "{CONTAINER_SA}"

[[rule]]
name = "app unit"
unit = "app.service"
service_account = "{UNIT_SA}"

[[rule]]
user = "alice"
service_account = "{ALICE_SA}"

[[rule]]
name = "developers"
group = "devs"
service_account = "{DEVS_SA}"

[[rule]]
user = "bob"
service_account = "{BOB_SA}"
"#,
            prefix = &CONTAINER_ID[..12]
        )
    }) else {
        return;
    };
    let docker = format!("system.slice/docker-{CONTAINER_ID}.scope");
    let other_docker = format!("system.slice/docker-{OTHER_CONTAINER_ID}.scope");
    let callers: [(&str, u32, &str, &str); 7] = [
        ("user rule", ALICE, "alice", ALICE_SA),
        ("supplementary group devs", CAROL, "carol", DEVS_SA),
        ("user rule", BOB, "bob", BOB_SA),
        ("system unit", BOB, "system.slice/app.service", UNIT_SA),
        (
            "user-manager unit",
            ALICE,
            "user.slice/user-1000.slice/user@1000.service/app.slice/app.service",
            UNIT_SA,
        ),
        ("container", BOB, &docker, CONTAINER_SA),
        (
            "container the glob does not match",
            BOB,
            &other_docker,
            BOB_SA,
        ),
    ];
    for (how, uid, cgroup, expected) in callers {
        let tag = format!("u{uid}-{}", cgroup.len());
        let audience = format!("https://{tag}.example.test");
        let replies = send(
            &env,
            uid,
            cgroup,
            &[
                get(TOKEN),
                get(&v1(&format!(
                    "instance/service-accounts/default/identity?audience={audience}&format=full"
                ))),
                get(&v1("instance/service-accounts/default/email")),
            ],
        );
        let (email, _, _, _) = token_of(&replies[0]);
        assert_eq!(
            email, expected,
            "{how} (uid {uid}, cgroup {cgroup}): the access token is another account's: {:?}",
            replies[0]
        );
        let claims = claims_of(&replies[1]);
        assert_eq!(
            claims["email"], expected,
            "{how} (uid {uid}, cgroup {cgroup}): ID token of another account: {claims}"
        );
        assert_eq!(
            claims["aud"],
            audience.as_str(),
            "{how}: the ID token's audience is not the one asked for: {claims}"
        );
        assert_eq!(
            (replies[2].status, replies[2].body.as_str()),
            (200, expected),
            "{how}: {:?}",
            replies[2]
        );
        assert_no_vm_identity(&replies);
    }
    let minted: BTreeSet<String> = env
        .iam
        .calls()
        .into_iter()
        .filter(|c| c.kind == IamCallKind::AccessToken)
        .map(|c| c.email)
        .collect();
    let expected: BTreeSet<String> = [ALICE_SA, DEVS_SA, BOB_SA, UNIT_SA, CONTAINER_SA]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        minted, expected,
        "IAM was asked for exactly the mapped accounts"
    );
}

// --- 2. scope and audience limits -------------------------------------------------------------

#[test]
fn scope_and_audience_limits_refuse_with_the_rule_and_allow_inside_them() {
    let Some(env) = common::start("c-limits", |_| {
        format!(
            r#"
[[rule]]
name = "limited"
user = "alice"
service_account = "{ALICE_SA}"
scopes = ["{READ_ONLY}", "{CLOUD_PLATFORM}"]
audiences = ["https://*.example.test"]
"#
        )
    }) else {
        return;
    };
    let identity = |aud: &str| {
        get(&v1(&format!(
            "instance/service-accounts/default/identity?audience={aud}&format=full"
        )))
    };
    let r = send(
        &env,
        ALICE,
        "alice",
        &[
            get(&format!("{TOKEN}?scopes={BIGQUERY}")),
            get(&format!("{TOKEN}?scopes={READ_ONLY},{BIGQUERY}")),
            get(&format!("{TOKEN}?scopes={READ_ONLY}")),
            get(TOKEN),
            identity("https://evil.test"),
            identity("https://evil.test/x.example.test"),
            identity("https://api.example.test"),
        ],
    );
    for (i, refused) in [(0, BIGQUERY), (1, BIGQUERY)] {
        assert_eq!(
            r[i].status, 403,
            "a scope outside the rule must be refused: {:?}",
            r[i]
        );
        assert!(
            r[i].body.contains("rule 1 \"limited\""),
            "the 403 names the rule: {:?}",
            r[i]
        );
        assert!(
            r[i].body.contains(refused),
            "the 403 names the refused scope: {:?}",
            r[i]
        );
    }
    let (email, scopes, _, _) = token_of(&r[2]);
    assert_eq!(
        (email.as_str(), scopes),
        (ALICE_SA, vec![READ_ONLY.to_owned()]),
        "a scope inside the rule: {:?}",
        r[2]
    );
    let (_, scopes, _, _) = token_of(&r[3]);
    let scopes: BTreeSet<_> = scopes.into_iter().collect();
    let rule_scopes: BTreeSet<_> = [READ_ONLY, CLOUD_PLATFORM]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        scopes, rule_scopes,
        "no scopes asked: the rule's scopes: {:?}",
        r[3]
    );
    for i in [4, 5] {
        assert_eq!(
            r[i].status, 403,
            "an audience outside the rule must be refused: {:?}",
            r[i]
        );
        assert!(
            r[i].body.contains("rule 1 \"limited\""),
            "the 403 names the rule: {:?}",
            r[i]
        );
    }
    let claims = claims_of(&r[6]);
    assert_eq!(
        (claims["email"].as_str(), claims["aud"].as_str()),
        (Some(ALICE_SA), Some("https://api.example.test")),
        "{claims}"
    );
    // Refused requests never reached IAM.
    for call in env.iam.calls() {
        assert!(
            !call.scopes.iter().any(|s| s == BIGQUERY),
            "IAM was asked for a refused scope: {call:?}"
        );
        assert!(
            !call.audience.as_deref().is_some_and(|a| a.contains("evil")),
            "IAM was asked for a refused audience: {call:?}"
        );
    }
}

// --- 3. concealment ---------------------------------------------------------------------------

#[test]
fn concealed_paths_are_hidden_from_leaf_listing_and_recursive_views() {
    let Some(env) = common::start("c-conceal", |_| {
        format!(
            r#"
[[rule]]
name = "no ssh keys"
user = "alice"
service_account = "{ALICE_SA}"
conceal = ["instance/attributes/ssh-keys"]

[[rule]]
user = "bob"
service_account = "{BOB_SA}"
"#
        )
    }) else {
        return;
    };
    const KEY: &str = "FakeInstanceKey";
    let specs = [
        get(&v1("instance/attributes/ssh-keys")),
        get(&v1("instance/attributes/ssh-keys?alt=json")),
        get(&v1("instance/attributes/")),
        get(&v1("instance/attributes/?recursive=true")),
        get(&v1("instance/?recursive=true")),
        get(&v1("?recursive=true")),
        get(&v1("project/attributes/ssh-keys")),
    ];
    // Other spellings of the concealed leaf, and its text rendering through the parent.
    let variants = [
        get(&v1("instance/attributes/ssh%2Dkeys")),
        get(&v1("instance/attributes/ssh-keys/")),
        get(&v1("instance/attributes/?recursive=true&alt=text")),
        get(&v1("instance/?recursive=true&alt=text")),
    ];
    let mut alice_specs = specs.to_vec();
    alice_specs.extend(variants);
    let a = send(&env, ALICE, "alice", &alice_specs);
    assert_eq!(a[0].status, 404, "the concealed leaf: {:?}", a[0]);
    for r in &a[7..9] {
        assert_eq!(
            r.status, 404,
            "another spelling of the concealed leaf: {r:?}"
        );
    }
    for r in &a[9..] {
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.body.contains("startup-script") && !r.body.contains("ssh-keys"),
            "the text rendering still shows the concealed key: {r:?}"
        );
    }
    assert_eq!(a[1].status, 404, "the concealed leaf as JSON: {:?}", a[1]);
    assert_eq!(a[2].status, 200, "{:?}", a[2]);
    assert!(
        !a[2].lines().contains("ssh-keys"),
        "the listing still shows the concealed key: {:?}",
        a[2]
    );
    assert!(
        a[2].lines().contains("startup-script"),
        "the listing lost other keys: {:?}",
        a[2]
    );
    let attrs = a[3].json();
    assert!(
        attrs.get("ssh-keys").is_none() && attrs.get("startup-script").is_some(),
        "{:?}",
        a[3]
    );
    let instance = a[4].json();
    assert!(
        instance["attributes"].get("ssh-keys").is_none(),
        "instance/?recursive=true still has it: {:?}",
        a[4]
    );
    assert!(
        instance["attributes"].get("startup-script").is_some(),
        "{:?}",
        a[4]
    );
    let root = a[5].json();
    assert!(
        root["instance"]["attributes"].get("ssh-keys").is_none(),
        "/computeMetadata/v1/?recursive=true still has it: {:?}",
        a[5]
    );
    assert!(
        root["instance"]["attributes"]
            .get("startup-script")
            .is_some(),
        "{:?}",
        a[5]
    );
    assert!(
        root["project"]["attributes"].get("ssh-keys").is_some(),
        "only the instance's keys are concealed: {:?}",
        a[5]
    );
    assert_eq!(
        a[6].status, 200,
        "project/attributes/ssh-keys is not concealed: {:?}",
        a[6]
    );
    for r in &a {
        assert!(!r.body.contains(KEY), "the concealed value leaked: {r:?}");
    }
    assert_no_vm_identity(&a);

    // Bob's rule conceals nothing.
    let b = send(&env, BOB, "bob", &specs[..6]);
    assert_eq!(b[0].status, 200, "{:?}", b[0]);
    assert!(b[0].body.contains(KEY), "{:?}", b[0]);
    assert!(b[2].lines().contains("ssh-keys"), "{:?}", b[2]);
    assert!(b[3].json().get("ssh-keys").is_some(), "{:?}", b[3]);
    assert!(
        b[4].json()["attributes"].get("ssh-keys").is_some(),
        "{:?}",
        b[4]
    );
    assert!(
        b[5].json()["instance"]["attributes"]
            .get("ssh-keys")
            .is_some(),
        "{:?}",
        b[5]
    );
}

// --- 4. contract headers ----------------------------------------------------------------------

#[test]
fn the_contract_headers_hold_for_mapped_passthrough_and_denied_callers() {
    let Some(env) = common::start("c-headers", alice_mapped_carol_passthrough) else {
        return;
    };
    let no_headers = || json!({});
    let mut every = Vec::new();
    // bob matches no rule: denied.
    for (who, uid, cgroup) in [
        ("mapped", ALICE, "alice"),
        ("passthrough", CAROL, "carol"),
        ("denied", BOB, "bob"),
    ] {
        let marker = format!("xff-marker-{uid}");
        let r = send(
            &env,
            uid,
            cgroup,
            &[
                with_headers("GET", &v1("instance/id"), no_headers()),
                with_headers("GET", TOKEN, no_headers()),
                with_headers("GET", "/", no_headers()),
                with_headers(
                    "GET",
                    &v1(&format!("instance/attributes/{marker}")),
                    json!({"Metadata-Flavor": "Google", "X-Forwarded-For": "203.0.113.7"}),
                ),
                with_headers(
                    "GET",
                    TOKEN,
                    json!({"Metadata-Flavor": "Google", "X-Forwarded-For": "203.0.113.7"}),
                ),
                with_headers(
                    "GET",
                    "/0.1/meta-data/service-accounts/default/acquire",
                    no_headers(),
                ),
                get("/0.1/meta-data/project-id"),
                with_headers(
                    "GET",
                    "/computeMetadata/v1beta1/instance/service-accounts/default/token",
                    no_headers(),
                ),
                get("/computeMetadata/v1beta1/instance/id"),
                get(&v1("instance?alt=json&marker=1")),
                get(&v1("project/project-id")),
            ],
        );
        assert_eq!(
            r[0].status, 403,
            "{who}: no Metadata-Flavor must be 403: {:?}",
            r[0]
        );
        assert_eq!(
            r[1].status, 403,
            "{who}: no Metadata-Flavor on the token must be 403: {:?}",
            r[1]
        );
        assert_eq!(
            (r[2].status, r[2].body.as_str()),
            (200, "computeMetadata/\n"),
            "{who}: / without the header: {:?}",
            r[2]
        );
        assert_eq!(
            r[3].status, 403,
            "{who}: X-Forwarded-For must be refused: {:?}",
            r[3]
        );
        assert_eq!(
            r[4].status, 403,
            "{who}: X-Forwarded-For on the token must be refused: {:?}",
            r[4]
        );
        for legacy in &r[5..=8] {
            assert_eq!(
                legacy.status, 404,
                "{who}: legacy paths must be 404: {legacy:?}"
            );
        }
        match who {
            "denied" => assert_eq!(r[9].status, 403, "{who}: {:?}", r[9]),
            _ => {
                assert_eq!(
                    r[9].status, 301,
                    "{who}: a directory without its slash: {:?}",
                    r[9]
                );
                assert_eq!(
                    r[9].header("location"),
                    Some("/computeMetadata/v1/instance/?alt=json&marker=1"),
                    "{who}: the 301 keeps the query: {:?}",
                    r[9]
                );
                assert_eq!(
                    (r[10].status, r[10].body.as_str()),
                    (200, "fake-project"),
                    "{who}: {:?}",
                    r[10]
                );
            }
        }
        if who == "mapped" {
            assert_no_vm_identity(&r);
        }
        every.extend(r);
    }
    // A few more kinds of answer from the mapped caller: token, listing, 404, recursive JSON.
    every.extend(send(
        &env,
        ALICE,
        "alice",
        &[
            get(TOKEN),
            get(&v1("instance/service-accounts/")),
            get(&v1("no/such/path")),
            get(&v1("instance/?recursive=true")),
        ],
    ));
    for r in &every {
        assert_eq!(
            r.all("server"),
            ["Metadata Server for VM"],
            "every answer carries the Server header: {r:?}"
        );
        assert_eq!(
            r.all("metadata-flavor"),
            ["Google"],
            "every answer carries Metadata-Flavor: Google: {r:?}"
        );
    }
    let seen = env.upstream.requests();
    for req in &seen {
        let p = &req.path_and_query;
        assert!(
            !p.contains("xff-marker"),
            "a request with X-Forwarded-For reached the upstream: {p}"
        );
        assert!(
            !req.headers.contains_key("x-forwarded-for"),
            "X-Forwarded-For reached the upstream: {p}"
        );
        assert!(
            !p.starts_with("/0.1")
                && !p
                    .to_ascii_lowercase()
                    .starts_with("/computemetadata/v1beta1"),
            "a legacy path reached the upstream: {p}"
        );
        assert!(
            req.headers
                .get("metadata-flavor")
                .is_some_and(|v| v == "Google")
                || p == "/",
            "a request without the flavor header reached the upstream: {p}"
        );
    }
}

// --- 5. the service-account view --------------------------------------------------------------

#[test]
fn a_mapped_caller_sees_only_default_and_its_own_account() {
    let Some(env) = common::start("c-accounts", |_| {
        format!(
            r#"
[[rule]]
user = "alice"
service_account = "{ALICE_SA}"

[[rule]]
user = "bob"
service_account = "{BOB_SA}"
"#
        )
    }) else {
        return;
    };
    let sa = |rel: &str| get(&v1(&format!("instance/service-accounts/{rel}")));
    let r = send(
        &env,
        ALICE,
        "alice",
        &[
            sa(""),
            sa("?recursive=true"),
            sa("default/?recursive=true"),
            sa(&format!("{ALICE_SA}/?recursive=true")),
            sa("default/"),
            sa("default/email"),
            sa(&format!("{ALICE_SA}/email")),
            sa("default/aliases"),
            sa("default/scopes"),
            get(&v1("instance/?recursive=true")),
            get(&v1("?recursive=true")),
            get(&v1("instance/?recursive=true&alt=text")),
            get(&v1("instance/")),
            sa(&format!("{VM_EMAIL}/email")),
            sa(&format!("{VM_EMAIL}/")),
            sa(&format!("{VM_EMAIL}/token")),
            sa(&format!("{}/email", VM_EMAIL.to_ascii_uppercase())),
            sa(&format!("{BOB_SA}/email")),
            sa(&format!("{BOB_SA}/token")),
        ],
    );
    for reply in &r[..13] {
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let listing: BTreeSet<&str> = r[0].lines();
    let own = format!("{ALICE_SA}/");
    assert_eq!(
        listing,
        BTreeSet::from(["default/", own.as_str()]),
        "the account listing: {:?}",
        r[0]
    );
    let account = json!({"aliases": ["default"], "email": ALICE_SA, "scopes": [CLOUD_PLATFORM]});
    assert_eq!(
        r[1].json(),
        json!({"default": account, ALICE_SA: account}),
        "{:?}",
        r[1]
    );
    assert_eq!(r[2].json(), account, "default/?recursive=true: {:?}", r[2]);
    assert_eq!(r[3].json(), account, "<email>/?recursive=true: {:?}", r[3]);
    assert_eq!(
        r[4].lines(),
        BTreeSet::from(["aliases", "email", "identity", "scopes", "token"]),
        "{:?}",
        r[4]
    );
    assert_eq!(r[5].body, ALICE_SA, "{:?}", r[5]);
    assert_eq!(r[6].body, ALICE_SA, "{:?}", r[6]);
    // The fake upstream answers `default` without a newline, the agent `default\n` (a one-item list);
    // which the real server sends is unconfirmed, and clients trim it: either is accepted.
    assert_eq!(r[7].body.trim_end(), "default", "{:?}", r[7]);
    assert_eq!(r[8].body, format!("{CLOUD_PLATFORM}\n"), "{:?}", r[8]);
    assert_eq!(
        r[9].json()["serviceAccounts"],
        json!({"default": account, ALICE_SA: account}),
        "{:?}",
        r[9]
    );
    assert_eq!(
        r[10].json()["instance"]["serviceAccounts"],
        json!({"default": account, ALICE_SA: account}),
        "{:?}",
        r[10]
    );
    assert!(r[11].body.contains(ALICE_SA), "{:?}", r[11]);
    assert!(r[12].lines().contains("service-accounts/"), "{:?}", r[12]);
    for reply in &r[13..] {
        assert_eq!(
            reply.status, 404,
            "another account's path must be 404: {reply:?}"
        );
    }
    assert_no_vm_identity(&r);
}

// --- 6. pass-through: long poll and guest attributes ------------------------------------------

#[test]
fn a_held_wait_for_change_returns_the_new_value_and_guest_attribute_puts_pass() {
    let Some(env) = common::start("c-longpoll", alice_mapped_carol_passthrough) else {
        return;
    };
    env.upstream
        .set_value("instance/attributes/some-key", "before");
    let spec = json!({
        "path": v1("instance/attributes/some-key?wait_for_change=true&timeout_sec=30"),
        "timeout": 45,
    })
    .to_string();
    let mut child = env
        .probe_cmd(ALICE, "alice", &["http", &spec])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the long-poll client");
    let held = poll(Duration::from_secs(10), || {
        env.upstream
            .requests()
            .iter()
            .any(|r| r.path_and_query.contains("some-key?wait_for_change=true"))
    });
    if !held {
        let _ = child.kill();
        let out = child.wait_with_output().expect("client output");
        panic!(
            "the long poll never reached the upstream; client said {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Held for more than a second: the client must still be waiting.
    thread::sleep(Duration::from_millis(1500));
    if let Ok(Some(status)) = child.try_wait() {
        let out = child.wait_with_output().expect("client output");
        panic!(
            "the long poll returned ({status}) before the value changed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    env.upstream
        .set_value("instance/attributes/some-key", "after");
    let answered = poll(Duration::from_secs(20), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !answered {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("client output");
    assert!(
        answered,
        "the long poll did not return after the change: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = &parse_lines(&out.stdout, &out.stderr)[0];
    let reply = to_reply(
        line,
        &json!({"path": "some-key?wait_for_change=true"}),
        ALICE,
    );
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "after"),
        "the long poll got the new value: {reply:?}"
    );
    assert!(
        reply.elapsed > 1.0 && reply.elapsed < 30.0,
        "the request was held until the change (> 1 s, < 30 s): {:.2} s",
        reply.elapsed
    );
    assert_eq!(reply.all("server"), ["Metadata Server for VM"], "{reply:?}");

    // A guest-attribute PUT from a passthrough caller reaches the upstream.
    let r = send(
        &env,
        CAROL,
        "carol",
        &[
            json!({"method": "PUT", "path": v1("instance/guest-attributes/ns/key"), "body": "hello-guest"}),
            get(&v1("instance/guest-attributes/ns/key")),
        ],
    );
    assert_eq!(r[0].status, 200, "the PUT: {:?}", r[0]);
    assert_eq!(
        r[1].body, "hello-guest",
        "the value written is read back: {:?}",
        r[1]
    );
    let put = env
        .upstream
        .requests()
        .into_iter()
        .find(|q| q.method == http::Method::PUT)
        .expect("the upstream never saw the PUT");
    assert_eq!(put.path_and_query, v1("instance/guest-attributes/ns/key"));
    assert_eq!(
        &put.body[..],
        b"hello-guest",
        "the PUT body arrived unchanged"
    );
}

// --- 7. single flight -------------------------------------------------------------------------

#[test]
fn a_hundred_concurrent_cold_token_requests_make_one_iam_call() {
    let Some(env) = common::start("c-flight", |_| {
        format!(
            r#"
[[rule]]
user = "alice"
service_account = "{ALICE_SA}"
"#
        )
    }) else {
        return;
    };
    // A slow IAM keeps the mint in flight while the requests arrive.
    env.iam.set_delay(Duration::from_millis(500));
    let what = "100 concurrent token requests";
    let out = run_bounded(
        env.probe_cmd(ALICE, "alice", &["concurrent_get", "100", TOKEN]),
        CLIENT_LIMIT,
        what,
    );
    let results = parse_lines(&out.stdout, &out.stderr);
    assert_eq!(results.len(), 100, "{what}: {results:?}");
    let mut tokens = BTreeSet::new();
    for r in &results {
        assert_eq!(r["status"], 200, "{what}: one failed: {r}");
        let v: Value =
            serde_json::from_str(r["body"].as_str().unwrap_or("")).unwrap_or(Value::Null);
        tokens.insert(v["access_token"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(
        tokens.len(),
        1,
        "{what}: all got the same token: {tokens:?}"
    );
    let token = tokens.into_iter().next().unwrap_or_default();
    assert_eq!(
        parse_fake_access_token(&token).map(|(e, _)| e).as_deref(),
        Some(ALICE_SA)
    );
    assert_eq!(
        env.iam.count(IamCallKind::AccessToken),
        1,
        "{what}: IAM calls: {:?}",
        env.iam.calls()
    );
}

// --- 8. refresh ahead of expiry ---------------------------------------------------------------

#[test]
fn tokens_are_refreshed_ahead_of_expiry_with_no_caller_waiting() {
    let Some(env) = common::start("c-refresh", |_| {
        format!(
            r#"
[token]
refresh_before_secs = 5

[[rule]]
user = "alice"
service_account = "{ALICE_SA}"
"#
        )
    }) else {
        return;
    };
    // Lifetime 8 s, refresh_before 5 s: refreshed at max(8 - 5, 8 / 2) = 4 s after minting;
    // served from the cache while more than min(60, 8 / 4) = 2 s remain.
    env.iam.set_lifetime(Duration::from_secs(8));
    let start = Instant::now();
    let first = send_one(&env, ALICE, "alice", get(TOKEN));
    let minted_by = start.elapsed();
    let (email, _, serial, token1) = token_of(&first);
    assert_eq!((email.as_str(), serial), (ALICE_SA, 1), "{first:?}");
    assert!(expires_in(&first) <= 8, "{first:?}");
    assert_eq!(env.iam.count(IamCallKind::AccessToken), 1);

    let refreshed = poll(Duration::from_secs(8), || {
        env.iam.count(IamCallKind::AccessToken) >= 2
    });
    let refreshed_at = start.elapsed();
    assert!(
        refreshed,
        "no background refresh within 8 s of minting: {:?}",
        env.iam.calls()
    );
    assert!(
        refreshed_at >= Duration::from_secs(3),
        "refreshed after {refreshed_at:?}: too early for an 8 s token with refresh_before 5 s"
    );
    assert!(
        refreshed_at < Duration::from_secs(8) + minted_by,
        "refreshed after {refreshed_at:?}: not ahead of the first token's expiry"
    );

    let second = send_one(&env, ALICE, "alice", get(TOKEN));
    let (email, _, serial, token2) = token_of(&second);
    assert_eq!(email, ALICE_SA);
    assert_eq!(
        serial, 2,
        "the next caller gets the refreshed token: {second:?}"
    );
    assert_ne!(token1, token2);
    assert!(
        expires_in(&second) > 2,
        "the refreshed token has most of its life left: {second:?}"
    );
    assert_eq!(
        env.iam.count(IamCallKind::AccessToken),
        2,
        "the request after the refresh was answered from the cache: {:?}",
        env.iam.calls()
    );
}

// --- 9. IAM down ------------------------------------------------------------------------------

fn alice_mapped_carol_passthrough(_: &mds_agent::testkit::sandbox::Sandbox) -> String {
    format!(
        r#"
[[rule]]
user = "alice"
service_account = "{ALICE_SA}"

[[rule]]
name = "carol gets the VM"
user = "carol"
action = "passthrough"
"#
    )
}

fn three_accounts(_: &mds_agent::testkit::sandbox::Sandbox) -> String {
    format!(
        r#"
[[rule]]
user = "alice"
service_account = "{ALICE_SA}"

[[rule]]
user = "bob"
service_account = "{BOB_SA}"

[[rule]]
user = "carol"
service_account = "{CAROL_SA}"
"#
    )
}

fn assert_log_has_no_secrets(env: &Env, secrets: &[String]) {
    let log = env.harness.agent_log();
    assert!(
        log.contains("minted"),
        "the log shows the mints (so the check below means something): {log}"
    );
    for pattern in ["fake-at.", "vm-token.", "eyJ"] {
        assert!(
            !log.contains(pattern),
            "the agent log contains a token ({pattern}): {log}"
        );
    }
    for secret in secrets {
        assert!(
            !log.contains(secret.as_str()),
            "the agent log contains a token it served: {log}"
        );
    }
}

#[test]
fn with_iam_down_cached_tokens_are_served_and_new_ones_fail_with_the_cause() {
    let Some(env) = common::start("c-iamdown", three_accounts) else {
        return;
    };
    let identity = v1(
        "instance/service-accounts/default/identity?audience=https://a.example.test&format=full",
    );
    let before = send(&env, ALICE, "alice", &[get(TOKEN), get(&identity)]);
    let (_, _, _, token) = token_of(&before[0]);
    let jwt = before[1].body.clone();
    assert_eq!(claims_of(&before[1])["email"], ALICE_SA);
    let calls = env.iam.calls().len();

    env.iam.set_failure(Some((
        503,
        "The service is currently unavailable.".to_owned(),
    )));
    let during = send(&env, ALICE, "alice", &[get(TOKEN), get(&identity)]);
    assert_eq!(
        token_of(&during[0]).3,
        token,
        "the cached access token is served while IAM is down: {:?}",
        during[0]
    );
    assert_eq!(
        (during[1].status, &during[1].body),
        (200, &jwt),
        "the cached ID token is served: {:?}",
        during[1]
    );
    assert_eq!(
        env.iam.calls().len(),
        calls,
        "a fresh cached token needs no IAM call"
    );

    let bob = send(&env, BOB, "bob", &[get(TOKEN), get(&identity)]);
    for r in &bob {
        assert_eq!(
            r.status, 503,
            "an account never minted, with IAM down: {r:?}"
        );
        assert!(
            r.body
                .contains("IAM Credentials API is unavailable (HTTP 503)"),
            "the body names the cause: {r:?}"
        );
        assert!(
            r.body.contains("currently unavailable"),
            "the body carries IAM's message: {r:?}"
        );
        assert!(r.body.contains(BOB_SA), "the body names the account: {r:?}");
        assert_eq!(r.all("server"), ["Metadata Server for VM"], "{r:?}");
    }

    let denied =
        "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).";
    env.iam.set_failure(Some((403, denied.to_owned())));
    let carol = send(&env, CAROL, "carol", &[get(TOKEN), get(&identity)]);
    for r in &carol {
        assert!(
            (500..600).contains(&r.status),
            "IAM's 403 is a server error for the caller: {r:?}"
        );
        assert!(
            r.body.contains("roles/iam.serviceAccountTokenCreator"),
            "the body names the role to grant: {r:?}"
        );
        assert!(
            r.body.contains(CAROL_SA),
            "the body names the account: {r:?}"
        );
    }
    // Alice is still served from the cache.
    let again = send_one(&env, ALICE, "alice", get(TOKEN));
    assert_eq!(token_of(&again).3, token, "{again:?}");

    assert_log_has_no_secrets(&env, &[token, jwt]);
}

#[test]
fn with_iam_down_a_token_past_its_serving_floor_is_served_until_it_expires() {
    let Some(env) = common::start("c-iamstale", three_accounts) else {
        return;
    };
    // Lifetime 20 s: background refresh at 10 s, served from the cache while more than 5 s remain;
    // between 15 s and 20 s a request tries IAM and, IAM being down, gets the still-valid token.
    env.iam.set_lifetime(Duration::from_secs(20));
    let start = Instant::now();
    let first = send_one(&env, ALICE, "alice", get(TOKEN));
    let answered = start.elapsed();
    let (_, _, serial, token) = token_of(&first);
    assert_eq!(serial, 1);
    env.iam.set_failure(Some((
        503,
        "The service is currently unavailable.".to_owned(),
    )));

    // The background refresh tries (and retries) and fails.
    let tried = poll(Duration::from_secs(14), || {
        env.iam.count(IamCallKind::AccessToken) >= 2
    });
    assert!(
        tried,
        "no background refresh attempt: {:?}",
        env.iam.calls()
    );
    // Into the last quarter of the token's life (the mint happened before `answered`).
    let stale_from = answered + Duration::from_millis(15_300);
    if let Some(wait) = stale_from.checked_sub(start.elapsed()) {
        thread::sleep(wait);
    }
    assert!(
        start.elapsed() < Duration::from_secs(18),
        "the machine is too slow for this test's timing"
    );
    let calls = env.iam.count(IamCallKind::AccessToken);
    let stale = send_one(&env, ALICE, "alice", get(TOKEN));
    assert_eq!(
        token_of(&stale).3,
        token,
        "the still-valid token is served while IAM is down: {stale:?}"
    );
    assert!(
        expires_in(&stale) <= 5,
        "it is the old token, near its end: {stale:?}"
    );
    assert!(
        env.iam.count(IamCallKind::AccessToken) > calls,
        "past the serving floor the request tried IAM before falling back: {:?}",
        env.iam.calls()
    );
    assert_log_has_no_secrets(&env, &[token]);
}

// --- 10. the official client ------------------------------------------------------------------

fn pyenv_python() -> PathBuf {
    let pyenv = std::env::var_os("MDS_PYENV")
        .map_or_else(|| PathBuf::from("/opt/mds-agent/pyenv"), PathBuf::from);
    let python = pyenv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: the google-auth client tests need the virtualenv; run `cargo xtask setup --python` \
         (or set MDS_PYENV to a virtualenv with google-auth and requests)",
        python.display()
    );
    python
}

#[test]
fn google_auth_from_pypi_gets_each_callers_own_identity_unchanged() {
    let Some(env) = common::start("c-google-auth", |_| {
        format!(
            r#"
[[rule]]
name = "alice"
uid = {ALICE}
service_account = "{ALICE_SA}"

[[rule]]
name = "bob, limited"
user = "bob"
service_account = "{BOB_SA}"
scopes = ["{CLOUD_PLATFORM}", "{USERINFO_EMAIL}"]
audiences = ["https://example.test"]
"#
        )
    }) else {
        return;
    };
    let python = pyenv_python();
    let script = env.harness.sandbox.dir().join("google_auth_client.py");
    std::fs::write(&script, include_str!("clients/google_auth_client.py"))
        .expect("writing the google-auth client");
    for (who, uid, expected) in [("alice", ALICE, ALICE_SA), ("bob", BOB, BOB_SA)] {
        let mut cmd = env.harness.command(&python, RunAs::user(uid, uid, who));
        cmd.arg(&script);
        // Inherited settings that would steer the library elsewhere are dropped; nothing is set.
        for var in [
            "GCE_METADATA_HOST",
            "GCE_METADATA_ROOT",
            "GCE_METADATA_IP",
            "GCE_METADATA_MTLS_MODE",
            "NO_GCE_CHECK",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "GOOGLE_CLOUD_PROJECT",
            "GCLOUD_PROJECT",
            "CLOUDSDK_CONFIG",
        ] {
            cmd.env_remove(var);
        }
        let out = run_bounded(cmd, CLIENT_LIMIT, &format!("google-auth as {who}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let r = parse_lines(&out.stdout, &out.stderr)
            .pop()
            .expect("one line");
        let errors: Vec<_> = r
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.ends_with("_error"))
            .collect();
        assert!(
            errors.is_empty(),
            "google-auth as {who} failed: {errors:?}; output {r}; stderr {stderr}"
        );
        assert_eq!(
            r["ping"], true,
            "{who}: google-auth's metadata ping failed: {r}"
        );
        let token = r["access"]["token"].as_str().unwrap_or("");
        let (email, _) = parse_fake_access_token(token)
            .unwrap_or_else(|| panic!("{who}: not a minted token: {r}"));
        assert_eq!(
            email, expected,
            "{who}: Credentials().refresh() got another account's token: {r}"
        );
        assert_eq!(r["access"]["service_account_email"], expected, "{who}: {r}");
        assert_eq!(r["access"]["valid"], true, "{who}: {r}");
        assert_eq!(
            r["id"]["claims"]["email"], expected,
            "{who}: IDTokenCredentials got another account's token: {r}"
        );
        assert_eq!(
            r["id"]["claims"]["aud"], "https://example.test",
            "{who}: {r}"
        );
        assert_eq!(r["id"]["service_account_email"], expected, "{who}: {r}");
        assert_eq!(
            r["default"]["project"], "fake-project",
            "{who}: google.auth.default(): {r}"
        );
        assert_eq!(
            r["default"]["type"], "google.auth.compute_engine.credentials.Credentials",
            "{who}: google.auth.default() found the metadata server: {r}"
        );
        assert!(
            !r.to_string().contains(VM_EMAIL),
            "{who}: the VM's identity reached the client: {r}"
        );
    }
}
