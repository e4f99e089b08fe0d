//! The agent binary running inside a [`Sandbox`]: config, start with readiness, stop, logs.
//! Used by the privileged integration tests, the benchmarks and `mds-agent demo`.

use std::{
    io,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use super::sandbox::{RunAs, Sandbox};

/// The sub-cgroup the agent runs in: inside the attached subtree, so its own upstream connections
/// prove the mark exemption.
pub const AGENT_CGROUP: &str = "agent";

pub struct Harness {
    pub sandbox: Sandbox,
    pub config_path: PathBuf,
    log_path: PathBuf,
    agent: Option<Child>,
}

impl Harness {
    pub fn new(sandbox: Sandbox) -> Harness {
        let config_path = sandbox.dir().join("config.toml");
        let log_path = sandbox.dir().join("agent.log");
        Harness {
            sandbox,
            config_path,
            log_path,
            agent: None,
        }
    }

    /// The settings every sandboxed agent needs (attach to the sandbox cgroup, pin in its bpffs),
    /// followed by `rest`.
    pub fn config(&self, rest: &str) -> String {
        format!(
            "listen = \"127.0.0.1:12972\"\ncgroup = \"{}\"\npin_dir = \"{}\"\n{rest}",
            self.sandbox.cgroup_dir().display(),
            self.sandbox.bpf_dir().join("mds-agent").display(),
        )
    }

    pub fn write_config(&self, rest: &str) -> io::Result<()> {
        std::fs::write(&self.config_path, self.config(rest))
    }

    /// Starts `mds-agent run` as root in [`AGENT_CGROUP`] and waits until it reports readiness
    /// (sd_notify), or fails with its log.
    pub fn start_agent(&mut self, agent_bin: &Path) -> io::Result<()> {
        self.stop_agent();
        let notify_path = self.sandbox.dir().join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)?;
        notify.set_read_timeout(Some(Duration::from_secs(30)))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = self.sandbox.command(agent_bin, RunAs::root(AGENT_CGROUP));
        cmd.args(["run", "--config"])
            .arg(&self.config_path)
            .env("NOTIFY_SOCKET", &notify_path)
            .env(
                "MDS_AGENT_LOG",
                std::env::var("MDS_AGENT_LOG").unwrap_or_else(|_| "info,mds_agent=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = cmd.spawn()?;
        let mut buf = [0u8; 64];
        loop {
            match notify.recv(&mut buf) {
                Ok(n) if buf[..n].starts_with(b"READY=1") => break,
                Ok(_) => continue,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io::Error::other(format!(
                        "the agent did not become ready ({e}); its log:\n{}",
                        self.agent_log()
                    )));
                }
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(io::Error::other(format!(
                "the agent exited: {status}; its log:\n{}",
                self.agent_log()
            )));
        }
        self.agent = Some(child);
        Ok(())
    }

    /// Runs the agent to completion with `args` (for `check`, or a `run` expected to fail).
    pub fn agent_command(&self, agent_bin: &Path, args: &[&str]) -> io::Result<Output> {
        let mut cmd = self.sandbox.command(agent_bin, RunAs::root(AGENT_CGROUP));
        cmd.args(args).stdin(Stdio::null());
        cmd.output()
    }

    /// Stops the agent with SIGTERM (as systemd does) and waits for it.
    pub fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            for _ in 0..100 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGHUP (reload) to the running agent.
    pub fn reload_agent(&self) {
        if let Some(pid) = self.agent.as_ref().and_then(|c| i32::try_from(c.id()).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGHUP,
            );
        }
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A command run as `who` inside the sandbox.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>, who: RunAs) -> Command {
        self.sandbox.command(program, who)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop_agent();
        // A failing test's most useful evidence; the sandbox (and the log) is removed next.
        if std::thread::panicking() {
            eprintln!(
                "---- agent log ----\n{}---- end of agent log ----",
                self.agent_log()
            );
        }
    }
}
