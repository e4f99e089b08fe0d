//! Helpers shared by the privileged integration tests: a sandbox with the fakes of Google's
//! services and a running agent, and the clients that talk to it.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use mds_agent::testkit::{
    fake_iam::FakeIam,
    fake_metadata::FakeMetadata,
    harness::Harness,
    sandbox::{require_privileged, RunAs, Sandbox},
};
use serde_json::Value;

pub const AGENT: &str = env!("CARGO_BIN_EXE_mds-agent");
pub const PROBE: &str = include_str!("../clients/probe.py");
pub const VM_EMAIL: &str = "vm-sa@fake-project.iam.gserviceaccount.com";

pub struct Env {
    pub harness: Harness,
    pub upstream: FakeMetadata,
    pub iam: FakeIam,
    pub probe: PathBuf,
    // Runs the fakes; dropped last.
    runtime: tokio::runtime::Runtime,
}

/// A sandbox with the fake metadata server on 169.254.169.254:80, the fake IAM Credentials API on
/// loopback, and an agent started with `config(&sandbox)` (the IAM endpoint is added). `None`
/// only when the developer opted out with MDS_SKIP_PRIVILEGED=1.
pub fn start(name: &str, config: impl FnOnce(&Sandbox) -> String) -> Option<Env> {
    if !require_privileged() {
        return None;
    }
    let sandbox = Sandbox::new(name).expect("creating the sandbox");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let metadata = sandbox
        .std_listener("169.254.169.254:80".parse().expect("address"))
        .expect("binding the fake metadata server in the sandbox");
    let iam = sandbox
        .std_listener("127.0.0.1:0".parse().expect("address"))
        .expect("binding the fake IAM server in the sandbox");
    let (upstream, iam) = {
        let _entered = runtime.enter();
        (FakeMetadata::start(metadata), FakeIam::start(iam))
    };
    let probe = sandbox.dir().join("probe.py");
    std::fs::write(&probe, PROBE).expect("writing the probe client");
    let rest = format!("iam_endpoint = \"{}\"\n{}", iam.url(), config(&sandbox));
    let mut harness = Harness::new(sandbox);
    harness.write_config(&rest).expect("writing the config");
    harness
        .start_agent(Path::new(AGENT))
        .expect("starting the agent");
    Some(Env {
        harness,
        upstream,
        iam,
        probe,
        runtime,
    })
}

impl Env {
    /// Runs `f` on the fakes' runtime (for async test steps).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    pub fn probe(&self, uid: u32, cgroup: &str, args: &[&str]) -> Vec<Value> {
        let out = self
            .probe_cmd(uid, cgroup, args)
            .stdin(Stdio::null())
            .output()
            .expect("running the probe");
        parse_lines(&out.stdout, &out.stderr)
    }

    pub fn probe_cmd(&self, uid: u32, cgroup: &str, args: &[&str]) -> Command {
        let mut cmd = self
            .harness
            .command("/usr/bin/python3", RunAs::user(uid, uid, cgroup));
        cmd.arg(&self.probe).args(args);
        cmd
    }

    pub fn email(&self, uid: u32, cgroup: &str) -> (u64, String) {
        let r = self.probe(uid, cgroup, &["email"]);
        (
            r[0]["status"].as_u64().unwrap_or(0),
            r[0]["body"].as_str().unwrap_or("").to_owned(),
        )
    }

    pub fn curl(&self, uid: u32, cgroup: &str, url: &str) -> std::process::Output {
        self.harness
            .command("curl", RunAs::user(uid, uid, cgroup))
            .args(["-s", "-S", "-m", "10", "-H", "Metadata-Flavor: Google", url])
            .stdin(Stdio::null())
            .output()
            .expect("running curl")
    }
}

pub fn parse_lines(stdout: &[u8], stderr: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(stdout);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("probe printed {l:?}: {e}")))
        .collect();
    assert!(
        !lines.is_empty(),
        "the probe printed nothing; stderr: {}",
        String::from_utf8_lossy(stderr)
    );
    lines
}
