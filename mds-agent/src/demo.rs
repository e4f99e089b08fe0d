//! `mds-agent demo`: the agent with its built-in emulator, in a sandbox of its own (a network
//! namespace with `169.254.169.254` on its loopback, and cgroups under a fresh directory), shown to
//! two users in two cgroups asking with curl. The host's network and cgroup root are never touched.

use std::process::Stdio;

use anyhow::Context as _;

use crate::testkit::{
    harness::Harness,
    sandbox::{RunAs, Sandbox},
};

const EMAIL_URL: &str =
    "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/email";
const PROJECT_URL: &str = "http://169.254.169.254/computeMetadata/v1/project/project-id";

pub fn run() -> anyhow::Result<()> {
    let sandbox = Sandbox::new("demo").context("creating the demo sandbox")?;
    let mut harness = Harness::new(sandbox);
    let batch = harness.sandbox.cgroup_rel("batch");
    harness.write_config(&format!(
        r#"upstream = "emulator"

[[rule]]
name = "batch jobs"
cgroup = "{batch}"
service_account = "batch-jobs@demo-project.iam.gserviceaccount.com"

[[rule]]
name = "alice"
user = "alice"
service_account = "alice@demo-project.iam.gserviceaccount.com"
"#
    ))?;
    let exe = std::env::current_exe().context("locating the mds-agent binary")?;
    harness
        .start_agent(&exe)
        .context("starting the agent in the sandbox")?;

    println!("\nmds-agent is running in a sandbox: network namespace with 169.254.169.254 on lo,");
    println!(
        "programs attached to {}",
        harness.sandbox.cgroup_dir().display()
    );
    println!("config: {}\n", harness.config_path.display());
    for (user, uid, cgroup, url) in [
        ("alice", 1000, "web", EMAIL_URL),
        ("bob", 1001, "batch", EMAIL_URL),
        ("bob", 1001, "web", EMAIL_URL),
        ("alice", 1000, "web", PROJECT_URL),
    ] {
        let out = harness
            .command("curl", RunAs::user(uid, uid, cgroup))
            .args([
                "-s",
                "-w",
                "  [HTTP %{http_code}]",
                "-H",
                "Metadata-Flavor: Google",
                url,
            ])
            .stdin(Stdio::null())
            .output()
            .context("running curl in the sandbox (is curl installed?)")?;
        println!("$ {user} in cgroup {cgroup}: curl -H 'Metadata-Flavor: Google' {url}");
        println!("{}\n", String::from_utf8_lossy(&out.stdout).trim());
    }
    if let Some(pid) = harness.agent_pid() {
        let web = harness.sandbox.cgroup_dir().join("web");
        println!("Try it yourself (as root, in another terminal):");
        println!(
            "  sh -c 'echo $$ > {}/cgroup.procs && exec nsenter -t {pid} -n -m setpriv --reuid 1000 --regid 1000 --clear-groups \\\n    curl -s -H \"Metadata-Flavor: Google\" {EMAIL_URL}'",
            web.display()
        );
    }
    println!(
        "\nServing until Ctrl-C; the agent's log: {}",
        harness.sandbox.dir().join("agent.log").display()
    );
    wait_for_stop()?;
    println!("\nstopping; removing the sandbox");
    Ok(())
}

fn wait_for_stop() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r,
                _ = term.recv() => Ok(()),
            }
        })?;
    Ok(())
}
