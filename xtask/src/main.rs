//! `cargo xtask`: everything around the cargo build that a fresh machine needs.

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "mds-agent development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs: nightly rust-src and bpf-linker (skipped when present).
    Setup {
        /// Also create the Python virtualenv with google-auth used by the client tests.
        #[arg(long)]
        python: bool,
    },
    /// Build the agent (the kernel programs are built and embedded by its build script).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the agent with its built-in emulator in a sandbox of its own (needs root).
    Demo,
    /// Set up, then run every test: unit tests and the privileged integration tests (needs root;
    /// MDS_SKIP_PRIVILEGED=1 skips the privileged ones explicitly).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks through the real interception path (needs root).
    Bench {
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// Where the client-test virtualenv lives: outside /root (mode 700), so the test users can run it.
const DEFAULT_PYENV: &str = "/opt/mds-agent/pyenv";
/// Python packages the client tests import.
const PYTHON_PACKAGES: [&str; 2] = ["google-auth==2.*", "requests==2.*"];

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match Cli::parse().task {
        Task::Setup { python } => setup(python),
        Task::Build { release } => {
            setup(false)?;
            build(release)
        }
        Task::Demo => {
            require_root(
                "the demo creates a network namespace and cgroups and loads BPF programs",
            )?;
            setup(false)?;
            build(false)?;
            run(Command::new(root.join("target/debug/mds-agent")).arg("demo"))
        }
        Task::Test { args } => {
            let privileged = env::var_os("MDS_SKIP_PRIVILEGED").is_none_or(|v| v != "1");
            if privileged {
                require_root(
                    "the integration tests load BPF programs into test cgroups and network namespaces; \
                     run as root, or set MDS_SKIP_PRIVILEGED=1 to skip them explicitly",
                )?;
            }
            // The client-test virtualenv is only for the privileged tests (and lives under /opt).
            setup(privileged)?;
            let mut cargo = cargo();
            cargo
                .args(["test", "--no-fail-fast"])
                .env("MDS_PYENV", pyenv());
            if !args.is_empty() {
                cargo.arg("--").args(args);
            }
            run(&mut cargo)
        }
        Task::Bench { args } => {
            require_root("the benchmarks drive the real interception path")?;
            setup(false)?;
            build(true)?;
            let agent = root.join("target/release/mds-agent");
            run(cargo()
                .args([
                    "run",
                    "--release",
                    "-p",
                    "mds-agent",
                    "--example",
                    "bench",
                    "--",
                    "--agent",
                ])
                .arg(&agent)
                .args(args))
        }
    }
}

fn setup(python: bool) -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    if python {
        python_env()?;
    }
    Ok(())
}

/// `-Z build-std=core` needs the nightly's library sources.
fn rust_src() -> anyhow::Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is missing: `rustup toolchain install nightly`")?;
    if Path::new(sysroot.trim())
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker, linked against the nightly's own libLLVM (the default LLVM feature needs a system
/// LLVM these machines do not have).
fn bpf_linker() -> anyhow::Result<()> {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` printed no LLVM version")?
        .to_owned();
    let lib = std::fs::read_dir(sysroot.join("lib"))
        .context("reading the nightly sysroot")?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}/lib", sysroot.display()))?;
    // The installed bpf-linker loads this library at run time, so the prefix must last.
    let prefix = home().join(".local/share/mds-agent/llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    eprintln!(
        "xtask: installing bpf-linker against LLVM {major} ({})",
        lib.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))
}

fn python_env() -> anyhow::Result<()> {
    let venv = pyenv();
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import google.auth.compute_engine, requests"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ready {
        return Ok(());
    }
    eprintln!(
        "xtask: creating the client-test virtualenv at {}",
        venv.display()
    );
    // Debian's python3 is readable by every uid, unlike a pyenv under /root.
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))
    .context("creating the virtualenv (Debian: apt-get install python3-venv)")?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(PYTHON_PACKAGES))
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut cargo = cargo();
    cargo.args(["build", "-p", "mds-agent"]);
    if release {
        cargo.arg("--release");
    }
    run(&mut cargo)
}

fn require_root(why: &str) -> anyhow::Result<()> {
    let uid = output(Command::new("id").arg("-u")).unwrap_or_default();
    if uid.trim() != "0" {
        bail!("not root: {why}");
    }
    Ok(())
}

fn pyenv() -> PathBuf {
    env::var_os("MDS_PYENV").map_or_else(|| PathBuf::from(DEFAULT_PYENV), PathBuf::from)
}

fn home() -> PathBuf {
    env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}
