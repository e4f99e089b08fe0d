//! A disposable sandbox for privileged tests and the demo: a network namespace of its own with
//! `169.254.169.254` on `lo`, a cgroup v2 subtree, a private `/etc/{hosts,passwd,group}` view and a
//! bpffs for pinned links. Dropping it kills what runs in it and removes all of it, so nothing
//! touches the host's network, its cgroup root or its files.

use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrStorage,
};
use nix::unistd::{chown, geteuid, setgid, setgroups, setuid, Gid, Pid, Uid};

/// Names of the sandbox cgroups under the cgroup2 mount: `mds-test-<pid>-<n>-<prefix>`.
const CGROUP_PREFIX: &str = "mds-test-";
/// Names of the sandbox directories in /tmp: `mds-sandbox-<pid>-<n>`.
const DIR_PREFIX: &str = "mds-sandbox-";
const TMP: &str = "/tmp";
const SKIP_VAR: &str = "MDS_SKIP_PRIVILEGED";
/// How long Drop waits for killed processes to leave the cgroup before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);
const METADATA_HOSTS_LINE: &str = "169.254.169.254 metadata.google.internal metadata";

/// A user the sandbox's `/etc/passwd` defines (it replaces any host entry with the same name or uid).
#[derive(Clone, Copy, Debug)]
pub struct TestUser {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
}

/// A group the sandbox's `/etc/group` defines (it replaces any host entry with the same name or gid).
#[derive(Clone, Copy, Debug)]
pub struct TestGroup {
    pub name: &'static str,
    pub gid: u32,
    pub members: &'static [&'static str],
}

pub const TEST_USERS: [TestUser; 3] = [
    TestUser {
        name: "alice",
        uid: 1000,
        gid: 1000,
    },
    TestUser {
        name: "bob",
        uid: 1001,
        gid: 1001,
    },
    TestUser {
        name: "carol",
        uid: 1002,
        gid: 1002,
    },
];

pub const TEST_GROUPS: [TestGroup; 4] = [
    TestGroup {
        name: "alice",
        gid: 1000,
        members: &[],
    },
    TestGroup {
        name: "bob",
        gid: 1001,
        members: &[],
    },
    TestGroup {
        name: "carol",
        gid: 1002,
        members: &[],
    },
    TestGroup {
        name: "devs",
        gid: 2000,
        members: &["alice", "carol"],
    },
];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("privileged test: run as root, or set MDS_SKIP_PRIVILEGED=1 to skip explicitly")]
    NotRoot,
    #[error(
        "no cgroup2 file system is mounted (none in /proc/self/mountinfo); mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(#[source] io::Error),
    #[error("sandbox name prefix {0:?} must be non-empty and use only ASCII letters, digits, '-' and '_'")]
    InvalidPrefix(String),
    #[error("creating the sandbox network namespace: {0}")]
    Netns(#[source] io::Error),
    #[error(
        "`ip {args}` in the sandbox network namespace failed: {detail} (is iproute2 installed?)"
    )]
    Ip { args: String, detail: String },
    #[error("creating the sandbox cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("preparing the sandbox directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting a bpffs at {path}: {source} (the kernel needs CONFIG_BPF_SYSCALL)")]
    BpfMount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Who a sandboxed command runs as, and in which sub-cgroup of the sandbox cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups; empty means the user's groups in the sandbox's `/etc/group`, as at login.
    pub groups: Vec<u32>,
    /// Sub-cgroup name (may be nested, `a/b`), created if missing; empty is the sandbox cgroup itself.
    pub cgroup: String,
}

impl RunAs {
    pub fn root(cgroup: impl Into<String>) -> RunAs {
        RunAs {
            uid: 0,
            gid: 0,
            groups: vec![0],
            cgroup: cgroup.into(),
        }
    }

    pub fn user(uid: u32, gid: u32, cgroup: impl Into<String>) -> RunAs {
        RunAs {
            uid,
            gid,
            groups: Vec::new(),
            cgroup: cgroup.into(),
        }
    }
}

/// See the module documentation. Everything it created is removed on drop, also while unwinding.
#[derive(Debug)]
pub struct Sandbox {
    netns: OwnedFd,
    mount: PathBuf,
    cgroup: PathBuf,
    cgroup_rel: String,
    dir: PathBuf,
    // What this sandbox created, so Drop never removes anything it did not make.
    created_cgroup: bool,
    created_dir: bool,
    bpf_mounted: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
static CLEANUP: Once = Once::new();

/// The mount point of the cgroup2 file system, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    crate::bpf::cgroup2_mount().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 mount in /proc/self/mountinfo",
        )
    })
}

/// Whether a privileged test should run: false only when `MDS_SKIP_PRIVILEGED=1` is set. Panics
/// with the fix when the test cannot run (not root, no cgroup2), so a skipped test is never silent.
pub fn require_privileged() -> bool {
    if std::env::var_os(SKIP_VAR).is_some_and(|v| v == "1") {
        eprintln!("skipping privileged test: {SKIP_VAR}=1");
        return false;
    }
    if !geteuid().is_root() {
        panic!("{}", SandboxError::NotRoot);
    }
    if let Err(e) = cgroup2_mount() {
        panic!("{} ({e})", SandboxError::NoCgroup2);
    }
    true
}

/// Removes what killed earlier runs left behind: `mds-test-*` cgroups and `/tmp/mds-sandbox-*`
/// directories whose process is gone (their processes are killed and their bpffs unmounted first).
pub fn cleanup_stale() {
    remove_stale(|pid| !process_alive(pid));
}

impl Sandbox {
    /// Creates a sandbox; `name_prefix` names its cgroup (`mds-test-<pid>-<n>-<name_prefix>`).
    pub fn new(name_prefix: &str) -> Result<Sandbox, SandboxError> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if name_prefix.is_empty() || !name_prefix.chars().all(valid) {
            return Err(SandboxError::InvalidPrefix(name_prefix.to_owned()));
        }
        if !geteuid().is_root() {
            return Err(SandboxError::NotRoot);
        }
        let mount = cgroup2_mount().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => SandboxError::NoCgroup2,
            _ => SandboxError::Mountinfo(e),
        })?;
        // Before this process has sandboxes of its own, so leftovers of an earlier process that had
        // our pid are stale too.
        let own = std::process::id();
        CLEANUP.call_once(|| remove_stale(|pid| pid == own || !process_alive(pid)));

        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{CGROUP_PREFIX}{own}-{n}-{name_prefix}");
        let mut sandbox = Sandbox {
            netns: new_netns().map_err(SandboxError::Netns)?,
            cgroup: mount.join(&name),
            cgroup_rel: format!("/{name}"),
            mount,
            dir: Path::new(TMP).join(format!("{DIR_PREFIX}{own}-{n}")),
            created_cgroup: false,
            created_dir: false,
            bpf_mounted: false,
        };
        // On error `sandbox` drops here and removes whatever was created so far.
        sandbox.setup()?;
        Ok(sandbox)
    }

    fn setup(&mut self) -> Result<(), SandboxError> {
        fs::create_dir(&self.cgroup).map_err(|source| SandboxError::Cgroup {
            path: self.cgroup.clone(),
            source,
        })?;
        self.created_cgroup = true;
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&self.dir)
            .map_err(|source| SandboxError::Dir {
                path: self.dir.clone(),
                source,
            })?;
        self.created_dir = true;
        self.write_files().map_err(|source| SandboxError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        let bpf = self.bpf_dir();
        fs::create_dir(&bpf).map_err(|source| SandboxError::Dir {
            path: bpf.clone(),
            source,
        })?;
        mount(
            Some("bpf"),
            &bpf,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| SandboxError::BpfMount {
            path: bpf.clone(),
            source,
        })?;
        self.bpf_mounted = true;
        self.ip(&["link", "set", "lo", "up"])?;
        self.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"])
    }

    fn write_files(&self) -> io::Result<()> {
        // The umask may have narrowed the mode; other uids must read the files in here.
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755))?;
        let hostname = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let hosts = format!(
            "127.0.0.1 localhost {}\n::1 localhost ip6-localhost ip6-loopback\n{METADATA_HOSTS_LINE}\n",
            hostname.trim()
        );
        let home = self.dir.join("home");
        let passwd = merged_passwd(&fs::read_to_string("/etc/passwd")?, &home);
        let group = merged_group(&fs::read_to_string("/etc/group")?);
        for (name, text) in [("hosts", hosts), ("passwd", passwd), ("group", group)] {
            let path = self.dir.join(name);
            fs::write(&path, text)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        }
        fs::DirBuilder::new().mode(0o755).create(&home)?;
        for user in TEST_USERS {
            let path = home.join(user.name);
            fs::DirBuilder::new().mode(0o755).create(&path)?;
            chown(
                &path,
                Some(Uid::from_raw(user.uid)),
                Some(Gid::from_raw(user.gid)),
            )?;
        }
        Ok(())
    }

    fn ip(&self, args: &[&str]) -> Result<(), SandboxError> {
        let error = |detail: String| SandboxError::Ip {
            args: args.join(" "),
            detail,
        };
        let mut command = Command::new("ip");
        command.args(args);
        let netns = self.netns.try_clone().map_err(|e| error(e.to_string()))?;
        // SAFETY: setns is async-signal-safe and the closure allocates nothing.
        unsafe {
            command
                .pre_exec(move || setns(&netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from));
        }
        let output = command.output().map_err(|e| error(e.to_string()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(error(format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    }

    /// The sandbox cgroup's directory under the cgroup2 mount.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup
    }

    /// A cgroup path relative to the cgroup2 mount as `/proc/<pid>/cgroup` shows it:
    /// `/mds-test-…/<sub>`, or the sandbox cgroup itself for an empty `sub`.
    pub fn cgroup_rel(&self, sub: &str) -> String {
        match sub.trim_matches('/') {
            "" => self.cgroup_rel.clone(),
            sub => format!("{}/{sub}", self.cgroup_rel),
        }
    }

    /// Creates (like `mkdir -p`) and returns the sub-cgroup `sub` of the sandbox cgroup.
    pub fn child_cgroup(&self, sub: &str) -> io::Result<PathBuf> {
        let sub = sub.trim_matches('/');
        let mut path = self.cgroup.clone();
        for part in sub.split('/').filter(|p| !p.is_empty()) {
            if part == "." || part == ".." || part.contains('\0') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("sub-cgroup {sub:?} must stay inside the sandbox cgroup"),
                ));
            }
            path.push(part);
        }
        fs::create_dir_all(&path)?;
        Ok(path)
    }

    /// The private directory holding `hosts`, `passwd`, `group`, `home/` and `bpf/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A bpffs mount for pinning links; unmounted on drop.
    pub fn bpf_dir(&self) -> PathBuf {
        self.dir.join("bpf")
    }

    pub fn netns_fd(&self) -> BorrowedFd<'_> {
        self.netns.as_fd()
    }

    /// Runs `f` on a thread inside the sandbox network namespace: sockets it creates live there.
    pub fn run_in_netns<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let netns = self.netns.as_fd();
        thread::scope(|scope| {
            let worker = scope.spawn(move || {
                setns(netns, CloneFlags::CLONE_NEWNET)?;
                f()
            });
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts a thread inside the sandbox network namespace; `f` does not run unless entering it
    /// worked. Threads it starts (a tokio runtime built in `f`, say) stay in the namespace too.
    pub fn spawn_in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<JoinHandle<T>> {
        let netns = self.netns.try_clone()?;
        let (entered_tx, entered_rx) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("sandbox-netns".into())
            .spawn(move || {
                let entered = setns(&netns, CloneFlags::CLONE_NEWNET);
                drop(netns);
                let ok = entered.is_ok();
                // The receiver only goes away if the spawner is gone; then nobody waits for `f` either.
                let _ = entered_tx.send(entered);
                ok.then(f)
            })?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(thread::spawn(move || {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    .expect("the thread entered the namespace, so it ran f")
            })),
            Ok(Err(e)) => Err(io::Error::from(e)),
            Err(_) => Err(io::Error::other(
                "the sandbox thread exited before entering the namespace",
            )),
        }
    }

    /// A listening socket bound inside the sandbox network namespace (SO_REUSEADDR, nonblocking,
    /// ready for `tokio::net::TcpListener::from_std`).
    pub fn std_listener(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.run_in_netns(|| {
            let family = match addr {
                SocketAddr::V4(_) => AddressFamily::Inet,
                SocketAddr::V6(_) => AddressFamily::Inet6,
            };
            let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
            let fd = socket(family, SockType::Stream, flags, None)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
            listen(&fd, Backlog::new(1024)?)?;
            Ok(TcpListener::from(fd))
        })
    }

    /// A (blocking) TCP connection made from inside the sandbox network namespace.
    pub fn std_connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        self.run_in_netns(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
    }

    /// A command that runs as `who`, in `who.cgroup` under the sandbox cgroup, in the sandbox
    /// network namespace, seeing the sandbox's hosts, passwd and group files. Its working directory
    /// is the sandbox directory; for a non-root user HOME, USER and LOGNAME are the sandbox user's.
    /// If the sandbox side cannot be prepared, the reason goes to stderr and `spawn` fails.
    pub fn command(&self, program: impl AsRef<OsStr>, who: RunAs) -> Command {
        let mut command = Command::new(program.as_ref());
        command.current_dir(&self.dir);
        let entry = match self.entry(&who) {
            Ok(entry) => entry,
            Err(e) => {
                eprintln!(
                    "sandbox: preparing {}: {e}",
                    Path::new(program.as_ref()).display()
                );
                let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
                // SAFETY: from_raw_os_error allocates nothing.
                unsafe { command.pre_exec(move || Err(io::Error::from_raw_os_error(errno))) };
                return command;
            }
        };
        if let (false, Some(name)) = (who.uid == 0, &entry.user) {
            command
                .env("HOME", self.dir.join("home").join(name))
                .env("USER", name)
                .env("LOGNAME", name);
        }
        let Entry {
            procs,
            netns,
            binds,
            groups,
            uid,
            gid,
            ..
        } = entry;
        // SAFETY: everything the closure uses was prepared above; it only makes syscalls
        // (async-signal-safe) and allocates nothing. The cgroup is joined first so that the
        // process is never seen running outside it.
        unsafe {
            command.pre_exec(move || {
                nix::unistd::write(&procs, b"0")?;
                setns(&netns, CloneFlags::CLONE_NEWNET)?;
                unshare(CloneFlags::CLONE_NEWNS)?;
                mount(
                    None::<&CStr>,
                    c"/",
                    None::<&CStr>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&CStr>,
                )?;
                for (source, target) in &binds {
                    mount(
                        Some(source.as_c_str()),
                        *target,
                        None::<&CStr>,
                        MsFlags::MS_BIND,
                        None::<&CStr>,
                    )?;
                }
                setgroups(&groups)?;
                setgid(gid)?;
                setuid(uid)?;
                Ok(())
            });
        }
        command
    }

    /// What a command's child needs to enter the sandbox, prepared before fork.
    fn entry(&self, who: &RunAs) -> io::Result<Entry> {
        let cgroup = self.child_cgroup(&who.cgroup)?;
        let procs_path = cgroup.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("opening {}: {e}", procs_path.display()))
            })?;
        let binds = [
            (path_cstring(&self.dir.join("hosts"))?, c"/etc/hosts"),
            (path_cstring(&self.dir.join("passwd"))?, c"/etc/passwd"),
            (path_cstring(&self.dir.join("group"))?, c"/etc/group"),
        ];
        let passwd = fs::read_to_string(self.dir.join("passwd"))?;
        let user = passwd_entries(&passwd)
            .find(|e| e.uid == who.uid)
            .map(|e| e.name.to_owned());
        let groups = if who.groups.is_empty() {
            let group = fs::read_to_string(self.dir.join("group"))?;
            login_groups(&group, user.as_deref(), who.gid)
        } else {
            who.groups.clone()
        };
        Ok(Entry {
            procs,
            netns: self.netns.try_clone()?,
            binds,
            groups: groups.into_iter().map(Gid::from_raw).collect(),
            uid: Uid::from_raw(who.uid),
            gid: Gid::from_raw(who.gid),
            user,
        })
    }
}

struct Entry {
    procs: File,
    netns: OwnedFd,
    binds: [(CString, &'static CStr); 3],
    groups: Vec<Gid>,
    uid: Uid,
    gid: Gid,
    user: Option<String>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.created_cgroup && self.cgroup != self.mount {
            if let Err(e) = remove_cgroup_tree(&self.cgroup) {
                eprintln!("sandbox: removing cgroup {}: {e}", self.cgroup.display());
            }
        }
        let mut dir_free = true;
        if self.bpf_mounted {
            if let Err(e) = umount2(&self.bpf_dir(), MntFlags::MNT_DETACH) {
                eprintln!("sandbox: unmounting {}: {e}", self.bpf_dir().display());
                dir_free = false;
            }
        }
        if dir_free && self.created_dir {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                eprintln!("sandbox: removing {}: {e}", self.dir.display());
            }
        }
    }
}

/// A new network namespace, made on a throwaway thread (unshare(CLONE_NEWNET) only affects the
/// calling thread), held open by the returned fd.
fn new_netns() -> io::Result<OwnedFd> {
    thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNET)?;
        Ok(OwnedFd::from(File::open("/proc/thread-self/ns/net")?))
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Kills every process in the cgroup tree at `dir`, waits until it is empty, then removes the
/// directories depth-first.
fn remove_cgroup_tree(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + KILL_WAIT;
    // cgroup.kill needs Linux 5.14; older kernels get a SIGKILL per listed process until empty.
    match fs::write(dir.join("cgroup.kill"), "1") {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            while Instant::now() < deadline {
                let pids = cgroup_pids(dir);
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    // ESRCH: it exited meanwhile, which is what we want.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        Err(e) => return Err(e),
    }
    while populated(dir)? {
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "processes still in it after {KILL_WAIT:?}: {:?}",
                cgroup_pids(dir)
            )));
        }
        thread::sleep(Duration::from_millis(10));
    }
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs)?;
    // Parents were collected before their children: remove in reverse.
    for path in dirs.iter().rev() {
        loop {
            match fs::remove_dir(path) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("rmdir {}: {e}", path.display()),
                    ))
                }
            }
        }
    }
    Ok(())
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    out.push(dir.to_owned());
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            collect_dirs(&entry.path(), out)?;
        }
    }
    Ok(())
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut dirs = Vec::new();
    if collect_dirs(dir, &mut dirs).is_err() {
        return Vec::new();
    }
    dirs.iter()
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|procs| {
            procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn populated(dir: &Path) -> io::Result<bool> {
    let events = fs::read_to_string(dir.join("cgroup.events"))?;
    Ok(events.lines().any(|l| l.trim() == "populated 1"))
}

fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The pid in a sandbox name `<prefix><pid>-…`.
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

fn remove_stale(stale: impl Fn(u32) -> bool) {
    if let Ok(mount) = cgroup2_mount() {
        for (path, name) in dir_entries(&mount) {
            if owner_pid(&name, CGROUP_PREFIX).is_some_and(&stale) {
                if let Err(e) = remove_cgroup_tree(&path) {
                    eprintln!("sandbox: removing stale cgroup {}: {e}", path.display());
                }
            }
        }
    }
    for (path, name) in dir_entries(Path::new(TMP)) {
        if !owner_pid(&name, DIR_PREFIX).is_some_and(&stale) {
            continue;
        }
        // Unmount the stale bpffs (deepest first) so removing the directory cannot recurse into it.
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut inside: Vec<PathBuf> = mounts(&mountinfo)
            .map(|(point, _)| point)
            .filter(|p| p.starts_with(&path))
            .collect();
        inside.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        let mut unmounted = true;
        for point in inside {
            if let Err(e) = umount2(&point, MntFlags::MNT_DETACH) {
                eprintln!("sandbox: unmounting stale {}: {e}", point.display());
                unmounted = false;
            }
        }
        if unmounted {
            if let Err(e) = fs::remove_dir_all(&path) {
                eprintln!("sandbox: removing stale {}: {e}", path.display());
            }
        }
    }
}

fn dir_entries(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.path(), e.file_name().into_string().ok()?)))
        .collect()
}

/// (mount point, fstype) of each line of a mountinfo file.
fn mounts(mountinfo: &str) -> impl Iterator<Item = (PathBuf, &str)> {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        let fstype = right.split(' ').next()?;
        Some((
            PathBuf::from(OsStr::from_bytes(&unescape_octal(point))),
            fstype,
        ))
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape_octal(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let uid = fields.nth(1)?.parse().ok()?;
        Some(PasswdEntry { name, uid })
    })
}

/// The host's passwd with the test users in place of host entries sharing their name or uid.
fn merged_passwd(host: &str, home: &Path) -> String {
    let mut out = String::new();
    for line in host.lines() {
        let mut fields = line.split(':');
        let name = fields.next().unwrap_or_default();
        let uid = fields.nth(1).and_then(|f| f.parse::<u32>().ok());
        if TEST_USERS
            .iter()
            .any(|u| u.name == name || Some(u.uid) == uid)
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    for TestUser { name, uid, gid } in TEST_USERS {
        let home = home.join(name);
        out.push_str(&format!(
            "{name}:x:{uid}:{gid}:{name}:{}:/bin/sh\n",
            home.display()
        ));
    }
    out
}

/// The host's group file with the test groups in place of host entries sharing their name or gid.
fn merged_group(host: &str) -> String {
    let mut out = String::new();
    for line in host.lines() {
        let mut fields = line.split(':');
        let name = fields.next().unwrap_or_default();
        let gid = fields.nth(1).and_then(|f| f.parse::<u32>().ok());
        if TEST_GROUPS
            .iter()
            .any(|g| g.name == name || Some(g.gid) == gid)
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    for TestGroup { name, gid, members } in TEST_GROUPS {
        out.push_str(&format!("{name}:x:{gid}:{}\n", members.join(",")));
    }
    out
}

/// `gid` plus every group in `group` listing `user` as a member (what initgroups would set).
fn login_groups(group: &str, user: Option<&str>, gid: u32) -> Vec<u32> {
    let mut groups = vec![gid];
    let Some(user) = user else { return groups };
    for line in group.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        let (Some(id), Some(members)) = (fields.get(2).and_then(|f| f.parse().ok()), fields.get(3))
        else {
            continue;
        };
        if members.split(',').any(|m| m == user) && !groups.contains(&id) {
            groups.push(id);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
77 22 0:50 / /tmp/with\\040space rw shared:3 - bpf bpf rw
";

    #[test]
    fn mountinfo_finds_the_cgroup2_mount_of_a_hybrid_layout() {
        let found: Vec<_> = mounts(MOUNTINFO).filter(|(_, t)| *t == "cgroup2").collect();
        assert_eq!(
            found,
            vec![(PathBuf::from("/sys/fs/cgroup/unified"), "cgroup2")]
        );
    }

    #[test]
    fn mountinfo_paths_are_unescaped_despite_optional_fields() {
        let bpf: Vec<_> = mounts(MOUNTINFO).filter(|(_, t)| *t == "bpf").collect();
        assert_eq!(bpf, vec![(PathBuf::from("/tmp/with space"), "bpf")]);
        assert_eq!(unescape_octal("a\\134b\\0"), b"a\\b\\0");
    }

    #[test]
    fn test_users_replace_colliding_host_entries() {
        let host =
            "root:x:0:0:root:/root:/bin/bash\ncloudsdk:x:1000:1000::/home/cloudsdk:/bin/bash\n\
                    bob:x:4242:4242::/home/bob:/bin/sh\n";
        let passwd = merged_passwd(host, Path::new("/tmp/s/home"));
        assert!(passwd.starts_with("root:x:0:0:root:/root:/bin/bash\n"));
        assert!(!passwd.contains("cloudsdk") && !passwd.contains("4242"));
        assert!(passwd.contains("alice:x:1000:1000:alice:/tmp/s/home/alice:/bin/sh\n"));
        assert_eq!(passwd_entries(&passwd).filter(|e| e.uid == 1001).count(), 1);

        let group = merged_group("root:x:0:\ncloudsdk:x:1000:\nusers:x:100:\n");
        assert!(group.contains("users:x:100:\n") && !group.contains("cloudsdk"));
        assert!(group.ends_with("devs:x:2000:alice,carol\n"));
    }

    #[test]
    fn login_groups_include_memberships() {
        let group = merged_group("");
        assert_eq!(login_groups(&group, Some("alice"), 1000), vec![1000, 2000]);
        assert_eq!(login_groups(&group, Some("bob"), 1001), vec![1001]);
        assert_eq!(login_groups(&group, None, 7), vec![7]);
    }

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(
            owner_pid("mds-test-4242-0-agent", CGROUP_PREFIX),
            Some(4242)
        );
        assert_eq!(owner_pid("mds-sandbox-17-3", DIR_PREFIX), Some(17));
        assert_eq!(owner_pid("mds-test-x-0-agent", CGROUP_PREFIX), None);
        assert_eq!(owner_pid("system.slice", CGROUP_PREFIX), None);
    }

    #[test]
    fn run_as_user_takes_login_groups() {
        let who = RunAs::user(1000, 1000, "alice");
        assert!(who.groups.is_empty());
        assert_eq!(RunAs::root("x").groups, vec![0]);
    }
}
