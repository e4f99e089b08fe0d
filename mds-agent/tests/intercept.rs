//! Privileged integration tests of the interception path: the real kernel programs, attached to a
//! sandbox cgroup, in a sandbox network namespace where a fake of the real metadata server listens
//! on 169.254.169.254:80. Clients are real processes run as test users in test cgroups.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::Stdio,
};

use common::{parse_lines, Env, AGENT, VM_EMAIL};
use serde_json::Value;

const ALICE_SA: &str = "alice-sa@test-project.iam.gserviceaccount.com";
const BOB_X_SA: &str = "bob-x@test-project.iam.gserviceaccount.com";
const BOB_Y_SA: &str = "bob-y@test-project.iam.gserviceaccount.com";

const ALICE: u32 = 1000;
const BOB: u32 = 1001;
const CAROL: u32 = 1002;
const MALLORY: u32 = 1003;
const EXEMPT: u32 = 1004;
/// A cgroup whose whole subtree is exempt, like `google-guest-agent.service`.
const EXEMPT_CGROUP: &str = "guest-agent";

/// A sandbox with the fake metadata server and a running agent; `None` only when the developer
/// opted out of privileged tests with MDS_SKIP_PRIVILEGED=1.
fn env(name: &str) -> Option<Env> {
    common::start(name, |sandbox| {
        let x = sandbox.cgroup_rel("bob-x");
        let y = sandbox.cgroup_rel("bob-y");
        // Exists before the agent starts, as a system service's cgroup would.
        sandbox.child_cgroup(EXEMPT_CGROUP).expect("exempt cgroup");
        let exempt_cgroup = sandbox.cgroup_rel(EXEMPT_CGROUP);
        format!(
            r#"
[exempt]
uids = [{EXEMPT}]
cgroups = ["{exempt_cgroup}"]

[[rule]]
uid = {ALICE}
service_account = "{ALICE_SA}"

[[rule]]
user = "bob"
cgroup = "{x}"
service_account = "{BOB_X_SA}"

[[rule]]
uid = {BOB}
cgroup = "{y}"
service_account = "{BOB_Y_SA}"

[[rule]]
name = "carol gets the VM"
uid = {CAROL}
action = "passthrough"
"#
        )
    })
}

#[test]
fn each_caller_gets_its_own_identity() {
    let Some(env) = env("identity") else { return };
    assert_eq!(env.email(ALICE, "alice"), (200, ALICE_SA.to_owned()));
    assert_eq!(
        env.email(BOB, "bob-x"),
        (200, BOB_X_SA.to_owned()),
        "same uid, cgroup x"
    );
    assert_eq!(
        env.email(BOB, "bob-y"),
        (200, BOB_Y_SA.to_owned()),
        "same uid, cgroup y"
    );
    assert_eq!(
        env.email(CAROL, "carol"),
        (200, VM_EMAIL.to_owned()),
        "passthrough gets the upstream's answer"
    );
    let (status, body) = env.email(MALLORY, "mallory");
    assert_eq!(status, 403, "an unmapped caller is denied: {body}");
    assert!(
        body.contains(&format!("uid={MALLORY}")),
        "the 403 names the identity seen: {body}"
    );
    assert!(!body.contains(VM_EMAIL), "{body}");
    // Bob outside both of his cgroups matches no rule.
    assert_eq!(env.email(BOB, "elsewhere").0, 403);
    let log = env.harness.agent_log();
    assert!(
        log.contains("decision"),
        "decisions are logged at info: {log}"
    );
}

#[test]
fn other_paths_pass_through_byte_for_byte() {
    let Some(env) = env("passthrough") else {
        return;
    };
    let blob: Vec<u8> = (0..=255u8).collect();
    let out = env.curl(
        ALICE,
        "alice",
        "http://169.254.169.254/computeMetadata/v1/instance/attributes/blob",
    );
    assert_eq!(
        out.stdout,
        blob,
        "curl stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.curl(
        ALICE,
        "alice",
        "http://metadata.google.internal/computeMetadata/v1/project/project-id",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "fake-project");
    // The agent (itself in the intercepted cgroup) reached the real upstream instead of looping
    // back into itself: the fake saw the requests, and no decision was ever made for the agent.
    let seen = env.upstream.requests();
    assert!(
        seen.iter()
            .any(|r| r.path_and_query.ends_with("instance/attributes/blob")),
        "the upstream never saw the forwarded request: {seen:?}"
    );
    let log = env.harness.agent_log();
    assert!(
        !log.contains("uid=0"),
        "the agent's own connection was intercepted: {log}"
    );
}

#[test]
fn every_way_into_the_metadata_address_is_covered() {
    let Some(env) = env("bypass") else { return };
    let r = env.probe(ALICE, "alice", &["v6mapped"]);
    assert_eq!(r[0]["status"], 200, "{r:?}");
    assert_eq!(
        r[0]["body"], ALICE_SA,
        "AF_INET6 to ::ffff:169.254.169.254 is intercepted"
    );

    // The IPv6 metadata address, dialled directly.
    let out = env
        .harness
        .command("ip", mds_agent::testkit::sandbox::RunAs::root("setup"))
        .args([
            "-6",
            "addr",
            "add",
            "fd20:ce::254/128",
            "dev",
            "lo",
            "nodad",
        ])
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = env.probe(ALICE, "alice", &["email6", "fd20:ce::254"]);
    assert_eq!(r[0]["body"], ALICE_SA, "fd20:ce::254 is intercepted: {r:?}");
    assert_eq!(
        r[0]["peer"],
        serde_json::json!(["fd20:ce::254", 80]),
        "getpeername reports it: {r:?}"
    );
    let r = env.probe(ALICE, "alice", &["connect", "6", "fd20:ce::254", "8080"]);
    assert_eq!(
        r[0]["errno"],
        libc::EPERM,
        "its other ports are refused: {r:?}"
    );

    let r = env.probe(ALICE, "alice", &["fastopen"]);
    assert_eq!(r[0]["ok"], true, "{r:?}");
    assert_eq!(
        r[0]["body"], ALICE_SA,
        "TCP fast open is intercepted: {r:?}"
    );

    let r = env.probe(ALICE, "alice", &["connect", "4", "169.254.169.254", "8080"]);
    assert_eq!(
        r[0]["errno"],
        libc::EPERM,
        "port 8080 is refused at connect(): {r:?}"
    );
    let r = env.probe(
        ALICE,
        "alice",
        &["connect", "6", "::ffff:169.254.169.254", "8080"],
    );
    assert_eq!(
        r[0]["errno"],
        libc::EPERM,
        "port 8080 over v4-mapped IPv6 too: {r:?}"
    );
    let r = env.probe(ALICE, "alice", &["connect", "4", "169.254.169.254", "53"]);
    assert_eq!(
        r[0]["errno"],
        libc::ECONNREFUSED,
        "port 53 is let through (nothing listens): {r:?}"
    );

    // MPTCP connects through a TCP subflow that the hooks see in the caller's context: it is
    // intercepted like TCP (or, on kernels that show the MPTCP protocol, refused). Never the VM.
    let r = env.probe(ALICE, "alice", &["mptcp"]);
    if r[0]["supported"] == true {
        let served_as_alice = r[0]["status"] == 200 && r[0]["body"] == ALICE_SA;
        assert!(
            served_as_alice || r[0]["errno"] == libc::EPERM,
            "MPTCP got past the agent: {r:?}"
        );
    }
}

#[test]
fn getpeername_reports_the_dialled_address() {
    let Some(env) = env("peername") else { return };
    let r = env.probe(ALICE, "alice", &["getpeername", "4"]);
    assert_eq!(r[0]["peer"], serde_json::json!(["169.254.169.254", 80]));
    let r = env.probe(ALICE, "alice", &["getpeername", "6"]);
    assert_eq!(
        r[0]["peer"],
        serde_json::json!(["::ffff:169.254.169.254", 80])
    );
}

#[test]
fn connections_without_a_kernel_record_are_refused() {
    let Some(env) = env("direct") else { return };
    // A mapped user dialling the agent's port directly is not served as anyone.
    let r = env.probe(ALICE, "alice", &["direct", "127.0.0.1", "12972"]);
    assert_eq!(r[0]["status"], 403, "{r:?}");
    assert!(
        !r[0]["body"].as_str().unwrap_or("").contains(ALICE_SA),
        "{r:?}"
    );

    // Port reuse: alice is served from source port 41000, then bob dials the agent directly from
    // the same port. The record of alice's connection must not serve bob.
    let mut alice = env
        .probe_cmd(ALICE, "alice", &["pingpong", "41000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("alice's client");
    writeln!(alice.stdin.as_mut().expect("stdin"), "go").expect("write");
    let mut line = String::new();
    BufReader::new(alice.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    drop(alice.stdin.take());
    let _ = alice.wait();
    let first: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(first["body"], ALICE_SA, "{first}");
    let r = env.probe(BOB, "bob-x", &["direct", "127.0.0.1", "12972", "41000"]);
    assert_eq!(
        r[0]["status"], 403,
        "bob got served on alice's old port: {r:?}"
    );
    assert!(
        !r[0]["body"].as_str().unwrap_or("").contains(ALICE_SA),
        "{r:?}"
    );
}

#[test]
fn no_misattribution_under_port_reuse_and_concurrency() {
    let Some(env) = env("load") else { return };
    // Both clients cycle through the same four source ports, so every port is used alternately
    // by the two uids; each connection is closed with RST so the port is free at once.
    let ports = "42000,42001,42002,42003";
    let spawn = |uid, cgroup| {
        env.probe_cmd(uid, cgroup, &["pingpong", ports])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("client")
    };
    let mut clients = [
        (spawn(ALICE, "alice"), ALICE_SA),
        (spawn(BOB, "bob-x"), BOB_X_SA),
    ];
    let mut readers: Vec<_> = clients
        .iter_mut()
        .map(|(c, _)| BufReader::new(c.stdout.take().expect("stdout")))
        .collect();
    let mut wrong = Vec::new();
    let mut reused = std::collections::HashMap::<u64, std::collections::HashSet<String>>::new();
    for i in 0..2000 {
        let k = i % 2;
        let (client, expected) = &mut clients[k];
        writeln!(client.stdin.as_mut().expect("stdin"), "go").expect("write");
        let mut line = String::new();
        readers[k].read_line(&mut line).expect("read");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        if v["status"] != 200 || v["body"] != *expected {
            wrong.push(v.clone());
        }
        reused
            .entry(v["port"].as_u64().unwrap_or(0))
            .or_default()
            .insert(expected.to_string());
    }
    for (client, _) in &mut clients {
        drop(client.stdin.take());
        let _ = client.wait();
    }
    assert!(
        wrong.is_empty(),
        "{} of 2000 sequential requests were misattributed or failed: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert!(
        reused.values().all(|who| who.len() == 2),
        "every port served both uids: {reused:?}"
    );

    // 200 concurrent connections from four identities.
    let who = [
        (ALICE, "alice", ALICE_SA),
        (BOB, "bob-x", BOB_X_SA),
        (BOB, "bob-y", BOB_Y_SA),
        (CAROL, "carol", VM_EMAIL),
    ];
    let children: Vec<_> = who
        .iter()
        .map(|(uid, cg, _)| {
            env.probe_cmd(*uid, cg, &["concurrent", "50"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("client")
        })
        .collect();
    for (child, (_, cg, expected)) in children.into_iter().zip(who) {
        let out = child.wait_with_output().expect("client output");
        let results = parse_lines(&out.stdout, &out.stderr);
        assert_eq!(results.len(), 50);
        let bad: Vec<_> = results
            .iter()
            .filter(|r| r["status"] != 200 || r["body"] != expected)
            .collect();
        assert!(
            bad.is_empty(),
            "{cg}: {} of 50 concurrent requests misattributed or failed: {:?}",
            bad.len(),
            &bad[..bad.len().min(3)]
        );
    }
}

#[test]
fn while_the_agent_is_down_exempt_callers_go_direct_and_others_fail_closed() {
    let Some(mut env) = env("exempt") else { return };
    let (status, body) = env.email(EXEMPT, "exempt");
    assert_eq!(
        (status, body.as_str()),
        (200, VM_EMAIL),
        "the exempt uid reaches the real server"
    );
    // Any uid, in a process below the exempt cgroup.
    let nested = format!("{EXEMPT_CGROUP}/worker");
    assert_eq!(
        env.email(ALICE, &nested),
        (200, VM_EMAIL.to_owned()),
        "the exempt cgroup's subtree goes direct"
    );
    env.harness.stop_agent();
    let (status, body) = env.email(EXEMPT, "exempt");
    assert_eq!(
        (status, body.as_str()),
        (200, VM_EMAIL),
        "…even with the agent stopped"
    );
    assert_eq!(
        env.email(ALICE, &nested),
        (200, VM_EMAIL.to_owned()),
        "…and so does the exempt subtree"
    );
    let r = env.probe(ALICE, "alice", &["connect", "4", "169.254.169.254", "80"]);
    assert_eq!(
        r[0]["ok"], false,
        "with the agent down, a mapped caller must not reach the real server: {r:?}"
    );
    assert_eq!(r[0]["errno"], libc::ECONNREFUSED, "{r:?}");
    // Nobody else may take the agent's address meanwhile and answer as the metadata server.
    for (family, addr) in [
        ("4", "127.0.0.1"),
        ("4", "0.0.0.0"),
        ("6", "::"),
        ("6", "::ffff:127.0.0.1"),
    ] {
        let r = env.probe(ALICE, "alice", &["bind", family, addr, "12972"]);
        assert_eq!(
            r[0]["errno"],
            libc::EPERM,
            "binding {addr}:12972 while the agent is down: {r:?}"
        );
    }
    let r = env.probe(ALICE, "alice", &["bind", "4", "127.0.0.1", "12973"]);
    assert_eq!(r[0]["ok"], true, "other ports stay free to bind: {r:?}");
    // A new agent replaces the pinned links and serves again.
    env.harness
        .start_agent(Path::new(AGENT))
        .expect("restarting the agent");
    assert_eq!(env.email(ALICE, "alice"), (200, ALICE_SA.to_owned()));
}
