//! Privileged integration tests of operating the agent: reloads, and the errors an operator sees
//! when the agent cannot start.

mod common;

use std::{process::Stdio, time::Duration};

use common::{Env, AGENT};
use mds_agent::testkit::sandbox::RunAs;

const ALICE: u32 = 1000;
const FIRST_SA: &str = "first@test-project.iam.gserviceaccount.com";
const SECOND_SA: &str = "second@test-project.iam.gserviceaccount.com";

fn rule(email: &str) -> String {
    format!("[[rule]]\nuid = {ALICE}\nservice_account = \"{email}\"\n")
}

fn env(name: &str) -> Option<Env> {
    common::start(name, |_| rule(FIRST_SA))
}

/// Polls `f` for up to 10 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn sighup_reloads_the_rules_and_a_bad_file_keeps_the_running_policy() {
    let Some(env) = env("reload") else { return };
    assert_eq!(env.email(ALICE, "alice"), (200, FIRST_SA.to_owned()));

    let good = env.harness.config(&rule(SECOND_SA));
    std::fs::write(&env.harness.config_path, good).expect("config");
    env.harness.reload_agent();
    eventually("the new rule", || {
        env.email(ALICE, "alice") == (200, SECOND_SA.to_owned())
    });

    for bad in [
        "[[rule]\nuid = 1",
        "[[rule]]\nuid = 1000\nservice_account = \"no-at-sign\"\n",
    ] {
        std::fs::write(&env.harness.config_path, env.harness.config(bad)).expect("config");
        env.harness.reload_agent();
        eventually("the rejection in the log", || {
            env.harness.agent_log().matches("reload rejected").count() >= 1
        });
        assert_eq!(
            env.email(ALICE, "alice"),
            (200, SECOND_SA.to_owned()),
            "a bad reload changed the policy"
        );
    }
    let log = env.harness.agent_log();
    assert!(
        log.contains("config.toml:"),
        "the rejection names the file and position: {log}"
    );
}

#[test]
fn startup_errors_name_the_cause_and_the_fix() {
    let Some(env) = env("errors") else { return };
    let agent = std::path::Path::new(AGENT);
    let config = env.harness.config_path.to_str().expect("utf-8 path");

    // A second agent on the same address.
    let out = env
        .harness
        .agent_command(agent, &["run", "--config", config])
        .expect("second agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("127.0.0.1:12972 is in use") && err.contains("set `listen`"),
        "{err}"
    );

    // Not root.
    let out = env
        .harness
        .command(agent, RunAs::user(ALICE, ALICE, "alice"))
        .args(["run", "--config", config])
        .stdin(Stdio::null())
        .output()
        .expect("agent as alice");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("needs root") || err.contains("permission"),
        "{err}"
    );

    // A cgroup v1 / non-cgroup directory.
    let other = env.harness.sandbox.dir().join("other.toml");
    let text = std::fs::read_to_string(config)
        .expect("config")
        .replace(
            "listen = \"127.0.0.1:12972\"",
            "listen = \"127.0.0.1:12974\"",
        )
        .replace(
            &format!(
                "cgroup = \"{}\"",
                env.harness.sandbox.cgroup_dir().display()
            ),
            "cgroup = \"/tmp\"",
        );
    std::fs::write(&other, text).expect("config");
    let out = env
        .harness
        .agent_command(agent, &["run", "--config", other.to_str().expect("utf-8")])
        .expect("agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/tmp is not on a cgroup v2 filesystem"),
        "{err}"
    );

    // Config errors, with file, line and column; `check` prints the rules as understood.
    let bad = env.harness.sandbox.dir().join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:12972\"\n[[rule]]\nuid = \"alice\"\n",
    )
    .expect("config");
    let out = env
        .harness
        .agent_command(agent, &["check", "--config", bad.to_str().expect("utf-8")])
        .expect("check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.toml:3:"), "{err}");
    let out = env
        .harness
        .agent_command(agent, &["check", "--config", config])
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(FIRST_SA) && text.contains("uid"), "{text}");

    // The first agent is unharmed by all of this.
    assert_eq!(env.email(ALICE, "alice"), (200, FIRST_SA.to_owned()));
}
