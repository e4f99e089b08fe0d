//! Loading, attaching and pinning the kernel programs, and reading what they recorded.
//!
//! Links are pinned in a bpffs directory so interception outlives the agent: while the agent is
//! down or restarting, intercepted connects are refused (nothing listens on the agent's address)
//! instead of reaching the real metadata server as the VM. `mds-agent detach` removes them.

use std::{
    collections::HashSet,
    fs::File,
    io,
    net::{Ipv6Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, HashMap, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, SockOps,
    },
    Ebpf, EbpfLoader,
};
use mds_ebpf_common::{
    Caller, ClientKey, Config as KernelConfig, FLAG_ENABLED, FLAG_INTERCEPT6, MAP_CALLERS,
    MAP_CONFIG, MAP_EXEMPT_CGROUPS, MAP_EXEMPT_UIDS, MAP_OPEN_PORTS, MAP_PENDING,
};
use tracing::{debug, info, warn};

/// The kernel programs, built from `mds-ebpf` by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mds-ebpf"));

/// Program names in the object, in attach order.
const SOCK_ADDR_PROGRAMS: [&str; 6] = [
    "bind4",
    "bind6",
    "connect4",
    "connect6",
    "getpeername4",
    "getpeername6",
];
const SOCK_OPS_PROGRAM: &str = "mds_sockops";

const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "mds-agent needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) to load its kernel \
         programs; run it from deploy/mds-agent.service or with sudo"
    )]
    NotPrivileged,
    #[error(
        "no cgroup v2 filesystem is mounted (none in /proc/self/mountinfo); mds-agent attaches to \
         the unified hierarchy: boot with systemd.unified_cgroup_hierarchy=1, or mount one with \
         `mount -t cgroup2 none /sys/fs/cgroup/unified` and set `cgroup` in the config"
    )]
    NoCgroup2,
    #[error(
        "cannot open cgroup {path}: {source}; set `cgroup` to an existing cgroup v2 directory"
    )]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cgroup {path} is not on a cgroup v2 filesystem (cgroup v1 cannot run cgroup BPF \
         programs); point `cgroup` at a directory under the cgroup2 mount"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("loading the kernel programs failed: {0}")]
    Object(#[source] aya::EbpfError),
    #[error(
        "the kernel rejected program {program}; mds-agent needs Linux 5.15+ with CONFIG_CGROUP_BPF \
         and BTF: {source}"
    )]
    Load {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "attaching {program} to cgroup {cgroup} failed (needs CONFIG_CGROUP_BPF and bpf_link, \
         Linux 5.7+): {source}"
    )]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "pin directory {path} is not on a BPF filesystem; mount one (`mount -t bpf bpf \
         /sys/fs/bpf`) or set `pin_dir` to a directory on one"
    )]
    NotBpffs { path: PathBuf },
    #[error("pinning {what} at {path}: {source}")]
    Pin {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the agent listens on {0}, but interception needs an IPv4 listen address")]
    ListenNotV4(SocketAddr),
    #[error(
        "reading the network namespace cookie of the listening socket: {0} (needs Linux 5.14+)"
    )]
    NetnsCookie(#[source] io::Error),
}

/// What the kernel programs are told.
pub struct InterceptSettings<'a> {
    pub cgroup: &'a Path,
    pub intercept: SocketAddrV4,
    /// The metadata server's IPv6 address, intercepted on `intercept`'s port.
    pub intercept6: Option<Ipv6Addr>,
    pub listen: SocketAddrV4,
    /// Network-namespace cookie of the agent's listening socket; see [`netns_cookie`].
    pub agent_netns: u64,
    pub upstream_mark: u32,
    pub open_ports: &'a [u16],
    pub exempt_uids: &'a [u32],
    /// Cgroup directories (absolute paths) whose subtrees are exempt.
    pub exempt_cgroups: &'a [PathBuf],
    pub map_entries: u32,
    pub pin_dir: &'a Path,
}

/// The loaded and attached programs, and the map the agent reads callers from.
pub struct Interceptor {
    callers: HashMap<MapData, ClientKey, Caller>,
    exempt_cgroups: Mutex<ExemptCgroups>,
    agent_netns: u64,
    // Keeps the programs and the remaining maps alive for as long as the agent runs.
    _ebpf: Ebpf,
}

struct ExemptCgroups {
    map: HashMap<MapData, u64, u8>,
    paths: Vec<PathBuf>,
    ids: HashSet<u64>,
}

impl Interceptor {
    /// Loads the programs, fills their maps, attaches them to `settings.cgroup` and pins the links,
    /// replacing (after the new ones are attached, so there is no gap) links a previous run pinned.
    pub fn start(settings: &InterceptSettings<'_>) -> Result<Interceptor, BpfError> {
        check_privileges()?;
        let cgroup = open_cgroup(settings.cgroup)?;
        check_bpffs(settings.pin_dir)?;

        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_PENDING, settings.map_entries)
            .map_max_entries(MAP_CALLERS, settings.map_entries)
            .load(PROGRAMS)
            .map_err(|e| match &e {
                aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if io_error.kind() == io::ErrorKind::PermissionDenied =>
                {
                    BpfError::NotPrivileged
                }
                _ => BpfError::Object(e),
            })?;
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf).map(spawn_log_reader) {
            debug!("kernel program logging unavailable: {e}");
        }

        let kernel_config = KernelConfig {
            intercept_addr: u32::from_ne_bytes(settings.intercept.ip().octets()),
            agent_addr: u32::from_ne_bytes(settings.listen.ip().octets()),
            intercept_port: settings.intercept.port(),
            agent_port: settings.listen.port(),
            upstream_mark: settings.upstream_mark,
            flags: FLAG_ENABLED | settings.intercept6.map_or(0, |_| FLAG_INTERCEPT6),
            _pad: 0,
            agent_netns: settings.agent_netns,
            intercept_addr6: settings.intercept6.map_or([0; 4], |a| {
                let o = a.octets();
                [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
            }),
        };
        let mut config: Array<_, KernelConfig> = map(&mut ebpf, MAP_CONFIG)?;
        config
            .set(0, kernel_config, 0)
            .map_err(|source| BpfError::Map {
                name: MAP_CONFIG,
                source,
            })?;
        let mut ports: HashMap<_, u16, u8> = map(&mut ebpf, MAP_OPEN_PORTS)?;
        for port in settings.open_ports {
            ports.insert(port, 1, 0).map_err(|source| BpfError::Map {
                name: MAP_OPEN_PORTS,
                source,
            })?;
        }
        let mut uids: HashMap<_, u32, u8> = map(&mut ebpf, MAP_EXEMPT_UIDS)?;
        for uid in settings.exempt_uids {
            uids.insert(uid, 1, 0).map_err(|source| BpfError::Map {
                name: MAP_EXEMPT_UIDS,
                source,
            })?;
        }
        let exempt_map = take_map(&mut ebpf, MAP_EXEMPT_CGROUPS)?;
        let mut exempt_cgroups = ExemptCgroups {
            map: exempt_map,
            paths: settings.exempt_cgroups.to_vec(),
            ids: HashSet::new(),
        };
        exempt_cgroups.refresh();
        let callers = take_map(&mut ebpf, MAP_CALLERS)?;

        let mut links = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let program: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            program.load().map_err(|source| BpfError::Load {
                program: name,
                source,
            })?;
            let id = program
                .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| attach_error(name, settings.cgroup, source))?;
            let link = program
                .take_link(id)
                .map_err(|source| attach_error(name, settings.cgroup, source))?;
            links.push((name, FdLink::try_from(link).map_err(link_error(name))?));
        }
        let sockops: &mut SockOps = program(&mut ebpf, SOCK_OPS_PROGRAM)?;
        sockops.load().map_err(|source| BpfError::Load {
            program: SOCK_OPS_PROGRAM,
            source,
        })?;
        let id = sockops
            .attach(cgroup.as_fd(), CgroupAttachMode::Single)
            .map_err(|source| attach_error(SOCK_OPS_PROGRAM, settings.cgroup, source))?;
        let link = sockops
            .take_link(id)
            .map_err(|source| attach_error(SOCK_OPS_PROGRAM, settings.cgroup, source))?;
        links.push((
            SOCK_OPS_PROGRAM,
            FdLink::try_from(link).map_err(link_error(SOCK_OPS_PROGRAM))?,
        ));

        std::fs::create_dir_all(settings.pin_dir).map_err(|source| BpfError::Pin {
            what: "the pin directory".into(),
            path: settings.pin_dir.to_owned(),
            source,
        })?;
        for (name, link) in links {
            let path = settings.pin_dir.join(format!("link_{name}"));
            replace_pin(&path)?;
            link.pin(&path).map_err(|e| BpfError::Pin {
                what: format!("link {name}"),
                path: path.clone(),
                source: io::Error::other(e),
            })?;
        }
        info!(
            cgroup = %settings.cgroup.display(),
            intercept = %settings.intercept,
            agent = %settings.listen,
            pins = %settings.pin_dir.display(),
            "kernel programs attached"
        );
        Ok(Interceptor {
            callers,
            exempt_cgroups: Mutex::new(exempt_cgroups),
            agent_netns: settings.agent_netns,
            _ebpf: ebpf,
        })
    }

    /// The caller the kernel recorded for a connection accepted from `peer`, if any: a connection
    /// that was not rewritten by the programs has none.
    pub fn caller(&self, peer: SocketAddr) -> Option<Caller> {
        let SocketAddr::V4(peer) = peer else {
            return None;
        };
        let key = ClientKey {
            netns_cookie: self.agent_netns,
            addr: u32::from_ne_bytes(peer.ip().octets()),
            port: peer.port(),
            _pad: 0,
        };
        self.callers.get(&key, 0).ok()
    }

    /// Re-reads the ids of the exempt cgroups: a unit's cgroup gets a new id when it restarts.
    pub fn refresh_exemptions(&self) {
        if let Ok(mut exempt) = self.exempt_cgroups.lock() {
            exempt.refresh();
        }
    }
}

impl ExemptCgroups {
    fn refresh(&mut self) {
        let ids: HashSet<u64> = self
            .paths
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.ino())
            .collect();
        for gone in self.ids.difference(&ids) {
            let _ = self.map.remove(gone);
        }
        for new in ids.difference(&self.ids) {
            if let Err(e) = self.map.insert(new, 1, 0) {
                warn!("exempting cgroup id {new}: {e}");
            }
        }
        self.ids = ids;
    }
}

/// Removes the pinned links at the paths a previous run left in `pin_dir`, which detaches them.
pub fn detach(pin_dir: &Path) -> Result<usize, BpfError> {
    let mut removed = 0;
    for name in SOCK_ADDR_PROGRAMS.into_iter().chain([SOCK_OPS_PROGRAM]) {
        let path = pin_dir.join(format!("link_{name}"));
        if path.exists() {
            replace_pin(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(char::from(b)),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The network-namespace cookie of a socket (`SO_NETNS_COOKIE`, Linux 5.14+).
pub fn netns_cookie(socket: &impl AsRawFd) -> Result<u64, BpfError> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(BpfError::NetnsCookie(io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// Root, or the capabilities loading and attaching cgroup programs needs.
pub fn check_privileges() -> Result<(), BpfError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    // CAP_NET_ADMIN (12), CAP_SYS_ADMIN (21), CAP_BPF (39).
    let needed: u64 = (1 << 12) | (1 << 21) | (1 << 39);
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0);
    if effective & needed == needed {
        Ok(())
    } else {
        Err(BpfError::NotPrivileged)
    }
}

fn open_cgroup(path: &Path) -> Result<File, BpfError> {
    let file = File::open(path).map_err(|source| BpfError::Cgroup {
        path: path.to_owned(),
        source,
    })?;
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| BpfError::Cgroup {
        path: path.to_owned(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(BpfError::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

fn check_bpffs(pin_dir: &Path) -> Result<(), BpfError> {
    // The directory may not exist yet; its nearest existing ancestor must be on bpffs.
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match nix::sys::statfs::statfs(existing) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC => Ok(()),
        _ => Err(BpfError::NotBpffs {
            path: pin_dir.to_owned(),
        }),
    }
}

/// Unpins (and so detaches, once nothing else holds it) a link pinned at `path`.
fn replace_pin(path: &Path) -> Result<(), BpfError> {
    match PinnedLink::from_pin(path) {
        Ok(old) => {
            old.unpin().map_err(|source| BpfError::Pin {
                what: "the previous link".into(),
                path: path.to_owned(),
                source,
            })?;
            debug!(path = %path.display(), "replaced a link pinned by an earlier run");
            Ok(())
        }
        Err(_) if !path.exists() => Ok(()),
        Err(_) => std::fs::remove_file(path).map_err(|source| BpfError::Pin {
            what: "a stale pin".into(),
            path: path.to_owned(),
            source,
        }),
    }
}

fn map<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.map_mut(name).ok_or(BpfError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(BpfError::Load {
        program: name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    program.try_into().map_err(|source| BpfError::Load {
        program: name,
        source,
    })
}

fn attach_error(
    program: &'static str,
    cgroup: &Path,
    source: aya::programs::ProgramError,
) -> BpfError {
    BpfError::Attach {
        program,
        cgroup: cgroup.to_owned(),
        source,
    }
}

fn link_error(program: &'static str) -> impl Fn(aya::programs::links::LinkError) -> BpfError {
    move |e| BpfError::Pin {
        what: format!("link {program}"),
        path: PathBuf::new(),
        source: io::Error::other(e),
    }
}

/// Forwards the kernel programs' aya-log records to tracing.
fn spawn_log_reader(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its fd and is moved into the AsyncFd, which drops it last.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut logger) = registered else {
        return;
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(
            unescape_mountinfo(r"/sys/fs/cgroup/with\040space"),
            "/sys/fs/cgroup/with space"
        );
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
    }

    #[test]
    fn this_host_has_a_cgroup2_mount() {
        let mount = cgroup2_mount().expect("a cgroup2 mount in /proc/self/mountinfo");
        assert!(
            mount.join("cgroup.procs").exists(),
            "{} is not a cgroup2 root",
            mount.display()
        );
    }

    #[test]
    fn netns_cookie_is_read_from_a_socket() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let a = netns_cookie(&socket).expect("cookie");
        let other = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        assert_ne!(a, 0);
        assert_eq!(
            a,
            netns_cookie(&other).expect("cookie"),
            "same namespace, same cookie"
        );
    }
}
