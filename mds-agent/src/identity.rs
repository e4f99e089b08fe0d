//! Who called: what the kernel recorded for a connection (uid, gid, pid, comm, cgroup id,
//! network namespace), enriched with user and group names from NSS and with the cgroup's path
//! and what that path tells: systemd unit, slices, container, Kubernetes pod.

use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::hash::Hash;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use nix::unistd::{getgrouplist, Gid, Group, Uid, User};

/// Who called, enriched; built once per accepted connection. Nothing in it is secret: it is
/// logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub comm: String,
    /// Name of `uid` from NSS; `None` if unknown.
    pub user: Option<String>,
    /// Name of `gid`.
    pub group: Option<String>,
    /// `gid`, then the user's supplementary groups (getgrouplist).
    pub groups: Vec<u32>,
    /// Names of `groups` that have one.
    pub group_names: Vec<String>,
    pub cgroup_id: u64,
    /// cgroup v2 path relative to the mount: `/system.slice/app.service`, `/` for the root.
    pub cgroup: Option<String>,
    /// Innermost systemd unit in the path, e.g. `app.service`.
    pub unit: Option<String>,
    /// Every `.slice` component of the path, outermost first.
    pub slices: Vec<String>,
    /// Container id (64 hex digits) from the runtime's cgroup name.
    pub container: Option<String>,
    /// Kubernetes pod uid, with dashes.
    pub pod: Option<String>,
    pub netns_cookie: u64,
}

/// `uid=1000(alice) gid=1000(alice) pid=42 comm=curl cgroup=/a/b unit=app.service`; values a
/// workload chooses (comm, cgroup names) are quoted and escaped when they hold anything but
/// visible characters, so a log line cannot be forged through them.
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            uid,
            gid,
            pid,
            comm,
            user,
            group,
            cgroup_id,
            cgroup,
            unit,
            container,
            pod,
            ..
        } = self;
        write!(f, "uid={uid}")?;
        if let Some(user) = user {
            write!(f, "({})", Value(user))?;
        }
        write!(f, " gid={gid}")?;
        if let Some(group) = group {
            write!(f, "({})", Value(group))?;
        }
        write!(f, " pid={pid} comm={}", Value(comm))?;
        match cgroup {
            Some(cgroup) => write!(f, " cgroup={}", Value(cgroup))?,
            None => write!(f, " cgroup_id={cgroup_id}")?,
        }
        for (key, value) in [("unit", unit), ("container", container), ("pod", pod)] {
            if let Some(value) = value {
                write!(f, " {key}={}", Value(value))?;
            }
        }
        Ok(())
    }
}

/// A logged value: as is when it is plain, else quoted and escaped.
struct Value<'a>(&'a str);

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = !self.0.is_empty()
            && self
                .0
                .chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\\' | '(' | ')'));
        if plain {
            f.write_str(self.0)
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

/// How long user and group names are trusted: renamed or added users show within this time.
const ACCOUNT_TTL: Duration = Duration::from_secs(60);
/// How long a cgroup id the walk did not find is answered `None` without walking again: ids are
/// never reused, but a walk racing with a rename can miss a live cgroup.
const MISSING_TTL: Duration = Duration::from_secs(5);
/// Entries a cache holds before it drops expired ones (and, if still full, everything).
const CACHE_LIMIT: usize = 4096;

/// Turns what the kernel recorded into an [`Identity`]. On a warm cache, `resolve` makes one
/// `stat` (to check the cached cgroup path still has that id) and no NSS lookup.
#[derive(Debug)]
pub struct Resolver {
    cgroup_mount: PathBuf,
    accounts: Mutex<TtlCache<(u32, u32), Accounts>>,
    /// cgroup id -> path, as the last walk saw them.
    cgroups: RwLock<HashMap<u64, String>>,
    /// Ids the last walks did not find. Held during a walk, so walks do not run in parallel.
    missing: Mutex<TtlCache<u64, ()>>,
}

/// What NSS says about a (uid, gid).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Accounts {
    user: Option<String>,
    group: Option<String>,
    groups: Vec<u32>,
    group_names: Vec<String>,
}

impl Resolver {
    /// `cgroup_mount`: the cgroup2 mount the kernel's cgroup ids refer to.
    pub fn new(cgroup_mount: PathBuf) -> Resolver {
        Resolver {
            cgroup_mount,
            accounts: Mutex::new(TtlCache::new(ACCOUNT_TTL)),
            cgroups: RwLock::new(HashMap::new()),
            missing: Mutex::new(TtlCache::new(MISSING_TTL)),
        }
    }

    /// Everything known about a caller. Never fails: what cannot be found is `None`, and a rule
    /// keyed on it does not match. May block (NSS, a walk of the cgroup hierarchy).
    pub fn resolve(
        &self,
        uid: u32,
        gid: u32,
        pid: u32,
        comm: &[u8; 16],
        cgroup_id: u64,
        netns_cookie: u64,
    ) -> Identity {
        let accounts = self.accounts(uid, gid);
        let cgroup = self.cgroup_path(cgroup_id);
        identity(
            uid,
            gid,
            pid,
            comm,
            cgroup_id,
            netns_cookie,
            accounts,
            cgroup,
        )
    }

    /// [`Resolver::resolve`] from the caches alone (one `stat` to check the cgroup's path), or
    /// `None` when that needs NSS or a walk: cheap enough to call on the accept path.
    pub fn resolve_cached(
        &self,
        uid: u32,
        gid: u32,
        pid: u32,
        comm: &[u8; 16],
        cgroup_id: u64,
        netns_cookie: u64,
    ) -> Option<Identity> {
        let accounts = lock(&self.accounts)
            .get(&(uid, gid), Instant::now())?
            .clone();
        let cgroup = read(&self.cgroups).get(&cgroup_id).cloned()?;
        if !self.has_id(&cgroup, cgroup_id) {
            return None;
        }
        Some(identity(
            uid,
            gid,
            pid,
            comm,
            cgroup_id,
            netns_cookie,
            accounts,
            Some(cgroup),
        ))
    }

    fn accounts(&self, uid: u32, gid: u32) -> Accounts {
        let now = Instant::now();
        if let Some(cached) = lock(&self.accounts).get(&(uid, gid), now) {
            return cached.clone();
        }
        // Without the lock: NSS may be slow (LDAP, sssd) and other callers are likely cached.
        let fresh = lookup_accounts(uid, gid);
        lock(&self.accounts).insert((uid, gid), fresh.clone(), now);
        fresh
    }

    /// The path of cgroup `id`: from the cache if the path still has that inode, else from a
    /// walk of the hierarchy (cgroups come and go, and directories can be renamed).
    fn cgroup_path(&self, id: u64) -> Option<String> {
        let cached = read(&self.cgroups).get(&id).cloned();
        if let Some(path) = &cached {
            if self.has_id(path, id) {
                return cached;
            }
        }
        let mut missing = lock(&self.missing);
        // Another caller's walk may have found it while this one waited for the lock.
        let current = read(&self.cgroups).get(&id).cloned();
        if let Some(path) = current
            .as_ref()
            .filter(|&path| Some(path) != cached.as_ref())
        {
            if self.has_id(path, id) {
                return current;
            }
        }
        let now = Instant::now();
        if missing.get(&id, now).is_some() {
            return None;
        }
        let seen = walk(&self.cgroup_mount);
        let found = seen.get(&id).cloned();
        *write(&self.cgroups) = seen;
        if found.is_none() {
            missing.insert(id, (), now);
        }
        found
    }

    /// One `stat`: does `path` (relative to the mount) still have inode `id`?
    fn has_id(&self, path: &str, id: u64) -> bool {
        let full = self.cgroup_mount.join(path.trim_start_matches('/'));
        std::fs::symlink_metadata(full).is_ok_and(|meta| meta.ino() == id)
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "the kernel record's fields, plus what was looked up"
)]
fn identity(
    uid: u32,
    gid: u32,
    pid: u32,
    comm: &[u8; 16],
    cgroup_id: u64,
    netns_cookie: u64,
    accounts: Accounts,
    cgroup: Option<String>,
) -> Identity {
    let Accounts {
        user,
        group,
        groups,
        group_names,
    } = accounts;
    let path = cgroup.as_deref().unwrap_or("");
    Identity {
        uid,
        gid,
        pid,
        comm: comm_string(comm),
        user,
        group,
        groups,
        group_names,
        cgroup_id,
        unit: unit(path).map(str::to_owned),
        slices: slices(path).map(str::to_owned).collect(),
        container: container(path).map(str::to_owned),
        pod: pod(path),
        cgroup,
        netns_cookie,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The caches stay consistent whatever a panicking holder did: keep using them.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn lookup_accounts(uid: u32, gid: u32) -> Accounts {
    let user = User::from_uid(Uid::from_raw(uid)).unwrap_or_else(|error| {
        tracing::warn!(uid, %error, "looking up the user name failed");
        None
    });
    let mut groups = vec![gid];
    if let Some(user) = &user {
        let supplementary = CString::new(user.name.as_bytes())
            .map_err(|_| nix::Error::EINVAL)
            .and_then(|name| getgrouplist(&name, Gid::from_raw(gid)));
        match supplementary {
            Ok(list) => {
                for g in list.into_iter().map(Gid::as_raw) {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
            Err(error) => tracing::warn!(uid, %error, "looking up supplementary groups failed"),
        }
    }
    let names: Vec<Option<String>> = groups
        .iter()
        .map(|&g| match Group::from_gid(Gid::from_raw(g)) {
            Ok(group) => group.map(|group| group.name),
            Err(error) => {
                tracing::warn!(gid = g, %error, "looking up the group name failed");
                None
            }
        })
        .collect();
    Accounts {
        user: user.map(|user| user.name),
        group: names.first().cloned().flatten(),
        group_names: names.into_iter().flatten().collect(),
        groups,
    }
}

/// Every directory under `mount`, by inode number (= cgroup id on cgroup v2), with its path
/// relative to `mount`. Symlinks are not followed. On cgroupfs the directory entry carries the
/// inode number and type, so the walk needs no `stat` per cgroup. Names that are not UTF-8
/// (not made by systemd or a container runtime) are skipped with their subtree: such a cgroup
/// resolves to no path.
fn walk(mount: &Path) -> HashMap<u64, String> {
    let mut seen = HashMap::new();
    if let Ok(meta) = std::fs::metadata(mount) {
        seen.insert(meta.ino(), "/".to_owned());
    }
    let mut pending = vec![(mount.to_path_buf(), String::new())];
    while let Some((dir, relative)) = pending.pop() {
        // A cgroup removed since it was listed is not an error.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let path = format!("{relative}/{name}");
            seen.insert(entry.ino(), path.clone());
            pending.push((entry.path(), path));
        }
    }
    seen
}

/// A map whose entries expire; time is passed in so tests need no sleeping.
#[derive(Debug)]
struct TtlCache<K, V> {
    ttl: Duration,
    entries: HashMap<K, (Instant, V)>,
}

impl<K: Eq + Hash, V> TtlCache<K, V> {
    fn new(ttl: Duration) -> Self {
        TtlCache {
            ttl,
            entries: HashMap::new(),
        }
    }

    fn get(&self, key: &K, now: Instant) -> Option<&V> {
        let (at, value) = self.entries.get(key)?;
        (now.saturating_duration_since(*at) < self.ttl).then_some(value)
    }

    fn insert(&mut self, key: K, value: V, now: Instant) {
        if self.entries.len() >= CACHE_LIMIT && !self.entries.contains_key(&key) {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
            if self.entries.len() >= CACHE_LIMIT {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (now, value));
    }
}

/// The kernel's `comm`: up to the first NUL, invalid UTF-8 replaced.
fn comm_string(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn components(path: &str) -> impl DoubleEndedIterator<Item = &str> {
    path.split('/').filter(|c| !c.is_empty())
}

/// The innermost systemd unit: `/system.slice/app.service/worker` -> `app.service`.
fn unit(path: &str) -> Option<&str> {
    const UNIT_SUFFIXES: [&str; 5] = [".service", ".scope", ".socket", ".mount", ".swap"];
    components(path)
        .rev()
        .find(|c| UNIT_SUFFIXES.iter().any(|suffix| c.ends_with(suffix)))
}

/// Every `.slice` component, outermost first.
fn slices(path: &str) -> impl Iterator<Item = &str> {
    components(path).filter(|c| c.ends_with(".slice"))
}

/// A full container id: 64 lowercase hex digits (docker, containerd, cri-o and podman all use
/// them). Requiring it keeps `crio-conmon-<id>.scope` and the like from counting.
fn container_id(text: &str) -> Option<&str> {
    (text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then_some(text)
}

/// The innermost container id: `docker-<id>.scope`, `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `libpod-<id>.scope` (systemd cgroup driver), or a bare `<id>` under
/// `/docker/` or `/kubepods...` (cgroupfs driver).
fn container(path: &str) -> Option<&str> {
    const PREFIXES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];
    let parts: Vec<&str> = components(path).collect();
    parts.iter().enumerate().rev().find_map(|(i, part)| {
        let scoped = part.strip_suffix(".scope").and_then(|stem| {
            PREFIXES
                .iter()
                .find_map(|prefix| stem.strip_prefix(prefix))
                .and_then(container_id)
        });
        let bare = || {
            let under_runtime = parts[..i]
                .iter()
                .any(|p| *p == "docker" || p.starts_with("kubepods"));
            container_id(part).filter(|_| under_runtime)
        };
        scoped.or_else(bare)
    })
}

/// The Kubernetes pod uid: `kubepods-burstable-pod<uid with '_'>.slice` (systemd cgroup
/// driver, dashes escaped as '_') or `pod<uid>` under `/kubepods` (cgroupfs driver).
fn pod(path: &str) -> Option<String> {
    let uid_chars = |uid: &str, separator: u8| {
        !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == separator)
    };
    let parts: Vec<&str> = components(path).collect();
    parts.iter().enumerate().rev().find_map(|(i, part)| {
        if let Some(stem) = part.strip_suffix(".slice") {
            let (kind, uid) = stem.rsplit_once("-pod")?;
            return (kind.contains("kubepods") && uid_chars(uid, b'_'))
                .then(|| uid.replace('_', "-"));
        }
        let uid = part.strip_prefix("pod")?;
        let under_kubepods = parts[..i].iter().any(|p| p.starts_with("kubepods"));
        (under_kubepods && uid_chars(uid, b'-')).then(|| uid.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const ID: &str = "4c01db0b339c7a5a5f3e1b1f5c43a7d31e5e3f2c1b0a9d8e7f6a5b4c3d2e1f00";
    const POD: &str = "3f0e3bd0-8b5f-4c2a-9d4e-1a2b3c4d5e6f";
    const POD_ESCAPED: &str = "3f0e3bd0_8b5f_4c2a_9d4e_1a2b3c4d5e6f";

    /// unit, slices, container, pod of a path.
    fn parts(path: &str) -> (Option<&str>, Vec<&str>, Option<&str>, Option<String>) {
        (
            unit(path),
            slices(path).collect(),
            container(path),
            pod(path),
        )
    }

    #[test]
    fn systemd_system_manager() {
        assert_eq!(
            parts("/system.slice/app.service"),
            (Some("app.service"), vec!["system.slice"], None, None)
        );
        assert_eq!(
            unit("/system.slice/app.service/worker"),
            Some("app.service")
        );
        assert_eq!(unit("/system.slice/boot.mount"), Some("boot.mount"));
        assert_eq!(unit("/system.slice/dev-sda2.swap"), Some("dev-sda2.swap"));
        assert_eq!(unit("/system.slice/sshd.socket"), Some("sshd.socket"));
        assert_eq!(
            unit("/system.slice/system-getty.slice/getty@tty1.service"),
            Some("getty@tty1.service")
        );
        assert_eq!(
            parts("/init.scope"),
            (Some("init.scope"), vec![], None, None)
        );
        assert_eq!(parts("/"), (None, vec![], None, None));
        assert_eq!(parts(""), (None, vec![], None, None));
    }

    #[test]
    fn systemd_user_manager() {
        let path = "/user.slice/user-1000.slice/user@1000.service/app.slice/app.service";
        assert_eq!(
            parts(path),
            (
                Some("app.service"),
                vec!["user.slice", "user-1000.slice", "app.slice"],
                None,
                None
            )
        );
        assert_eq!(
            unit("/user.slice/user-1000.slice/session-3.scope"),
            Some("session-3.scope")
        );
        assert_eq!(
            unit("/user.slice/user-1000.slice/user@1000.service/init.scope"),
            Some("init.scope")
        );
        assert_eq!(unit("/user.slice/user-1000.slice"), None);
    }

    #[test]
    fn docker_systemd_and_cgroupfs_drivers() {
        let systemd = format!("/system.slice/docker-{ID}.scope");
        let unit_name = format!("docker-{ID}.scope");
        assert_eq!(
            parts(&systemd),
            (
                Some(unit_name.as_str()),
                vec!["system.slice"],
                Some(ID),
                None
            )
        );
        assert_eq!(
            parts(&format!("/docker/{ID}")),
            (None, vec![], Some(ID), None)
        );
        // Docker in docker: the innermost container is the caller.
        let other = ID.replace('4', "5");
        assert_eq!(
            container(&format!("/system.slice/docker-{other}.scope/docker/{ID}")),
            Some(ID)
        );
    }

    #[test]
    fn kubernetes_systemd_driver() {
        let containerd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_ESCAPED}.slice/\
             cri-containerd-{ID}.scope"
        );
        let (unit_name, slices, container_id, pod_uid) = parts(&containerd);
        assert_eq!(
            unit_name,
            Some(format!("cri-containerd-{ID}.scope").as_str())
        );
        assert_eq!(slices.len(), 3);
        assert_eq!((container_id, pod_uid.as_deref()), (Some(ID), Some(POD)));

        let crio_guaranteed =
            format!("/kubepods.slice/kubepods-pod{POD_ESCAPED}.slice/crio-{ID}.scope");
        assert_eq!(
            (
                container(&crio_guaranteed),
                pod(&crio_guaranteed).as_deref()
            ),
            (Some(ID), Some(POD))
        );

        let conmon =
            format!("/kubepods.slice/kubepods-pod{POD_ESCAPED}.slice/crio-conmon-{ID}.scope");
        assert_eq!(container(&conmon), None, "conmon is not the container");
        assert_eq!(pod(&conmon).as_deref(), Some(POD));

        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{POD_ESCAPED}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            (container(&kind), pod(&kind).as_deref()),
            (Some(ID), Some(POD))
        );

        let sandbox_slice_only = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_ESCAPED}.slice"
        );
        assert_eq!(pod(&sandbox_slice_only).as_deref(), Some(POD));
        assert_eq!(pod("/kubepods.slice/kubepods-besteffort.slice"), None);
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        let burstable = format!("/kubepods/burstable/pod{POD}/{ID}");
        assert_eq!(
            parts(&burstable),
            (None, vec![], Some(ID), Some(POD.to_owned()))
        );
        let guaranteed = format!("/kubepods/pod{POD}/{ID}");
        assert_eq!(
            (container(&guaranteed), pod(&guaranteed)),
            (Some(ID), Some(POD.to_owned()))
        );
        assert_eq!(
            pod(&format!("/system.slice/pod{POD}")),
            None,
            "pod<uid> counts only under kubepods"
        );
        assert_eq!(
            container(&format!("/system.slice/{ID}")),
            None,
            "a bare id counts only under a runtime"
        );
    }

    #[test]
    fn podman_rootful_and_rootless() {
        let rootful = format!("/machine.slice/libpod-{ID}.scope/container");
        let unit_name = format!("libpod-{ID}.scope");
        assert_eq!(
            parts(&rootful),
            (
                Some(unit_name.as_str()),
                vec!["machine.slice"],
                Some(ID),
                None
            )
        );
        let rootless = format!(
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
        );
        assert_eq!(
            parts(&rootless),
            (
                Some(unit_name.as_str()),
                vec!["user.slice", "user-1000.slice", "user.slice"],
                Some(ID),
                None
            )
        );
        let conmon = format!("/machine.slice/libpod-conmon-{ID}.scope");
        assert_eq!(container(&conmon), None);
    }

    #[test]
    fn container_ids_must_be_full_hex() {
        assert_eq!(container("/system.slice/docker-abc123.scope"), None);
        assert_eq!(
            container(&format!("/system.slice/docker-{}.scope", ID.to_uppercase())),
            None
        );
        assert_eq!(
            container(&format!("/system.slice/docker-{ID}.service")),
            None
        );
        assert_eq!(container(&format!("/system.slice/runc-{ID}.scope")), None);
    }

    #[test]
    fn comm_stops_at_nul_and_is_lossy() {
        assert_eq!(comm_string(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"), "curl");
        assert_eq!(comm_string(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(comm_string(b"a\xffb\0junk\0\0\0\0\0\0\0\0"), "a\u{fffd}b");
        assert_eq!(comm_string(&[0; 16]), "");
    }

    #[test]
    fn display() {
        let id = Identity {
            uid: 1000,
            gid: 1000,
            pid: 42,
            comm: "curl".into(),
            user: Some("alice".into()),
            group: Some("alice".into()),
            cgroup: Some("/a/b".into()),
            unit: Some("app.service".into()),
            ..Identity::default()
        };
        assert_eq!(
            id.to_string(),
            "uid=1000(alice) gid=1000(alice) pid=42 comm=curl cgroup=/a/b unit=app.service"
        );
        let id = Identity {
            uid: 7,
            gid: 8,
            pid: 9,
            comm: "evil uid=0\n".into(),
            cgroup_id: 1234,
            container: Some(ID.into()),
            pod: Some(POD.into()),
            ..Identity::default()
        };
        assert_eq!(
            id.to_string(),
            format!(
                "uid=7 gid=8 pid=9 comm=\"evil uid=0\\n\" cgroup_id=1234 container={ID} pod={POD}"
            )
        );
    }

    #[test]
    fn ttl_cache_expires_and_stays_bounded() {
        let t0 = Instant::now();
        let mut cache = TtlCache::new(ACCOUNT_TTL);
        cache.insert(1, "one", t0);
        assert_eq!(cache.get(&1, t0 + Duration::from_secs(59)), Some(&"one"));
        assert_eq!(cache.get(&1, t0 + ACCOUNT_TTL), None);
        assert_eq!(cache.get(&2, t0), None);
        for key in 0..CACHE_LIMIT {
            cache.insert(key, "many", t0);
        }
        assert_eq!(cache.entries.len(), CACHE_LIMIT);
        cache.insert(CACHE_LIMIT, "fresh", t0 + ACCOUNT_TTL);
        assert_eq!(cache.entries.len(), 1, "a full cache drops expired entries");
        for key in 0..2 * CACHE_LIMIT {
            cache.insert(key, "many", t0);
            assert!(
                cache.entries.len() <= CACHE_LIMIT,
                "a full cache of live entries is emptied"
            );
        }
    }

    #[test]
    fn resolves_root_and_unknown_users() {
        let resolver = Resolver::new(PathBuf::from("/nonexistent-cgroup-mount"));
        let root = resolver.resolve(0, 0, 1, b"init\0\0\0\0\0\0\0\0\0\0\0\0", 1, 7);
        assert_eq!(
            (root.user.as_deref(), root.group.as_deref()),
            (Some("root"), Some("root"))
        );
        assert_eq!(root.groups.first(), Some(&0));
        assert!(root.group_names.iter().any(|n| n == "root"), "{root:?}");
        assert_eq!(
            (root.comm.as_str(), root.netns_cookie, root.pid),
            ("init", 7, 1)
        );
        assert_eq!(root.cgroup, None, "no cgroup mount, no path");

        let nobody = resolver.resolve(3_999_999_999, 3_999_999_998, 2, &[0; 16], 1, 0);
        assert_eq!((nobody.user, nobody.group), (None, None));
        assert_eq!(nobody.groups, [3_999_999_998]);
        assert!(nobody.group_names.is_empty());
        assert_eq!(
            resolver.resolve(0, 0, 1, &[0; 16], 1, 0).groups,
            root.groups,
            "a cached answer is the same"
        );
    }

    /// A directory tree standing in for the cgroup2 mount, removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new() -> Tree {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let root = std::env::temp_dir().join(format!(
                "mds-agent-identity-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let tree = Tree(root);
            for dir in [
                "system.slice/app.service/worker",
                "user.slice/user-1000.slice/user@1000.service/app.slice/app.service",
            ] {
                let path = tree.0.join(dir);
                std::fs::create_dir_all(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            let file = tree.0.join("system.slice/cgroup.procs");
            std::fs::write(&file, "").unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let link = tree.0.join("link.service");
            std::os::unix::fs::symlink(tree.0.join("system.slice/app.service"), &link)
                .unwrap_or_else(|e| panic!("{}: {e}", link.display()));
            tree
        }

        fn id(&self, relative: &str) -> u64 {
            let path = self.0.join(relative.trim_start_matches('/'));
            std::fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .ino()
        }

        fn resolver(&self) -> Resolver {
            Resolver::new(self.0.clone())
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn path(resolver: &Resolver, id: u64) -> Option<String> {
        resolver.resolve(0, 0, 0, &[0; 16], id, 0).cgroup
    }

    #[test]
    fn walk_finds_every_directory_and_nothing_else() {
        let tree = Tree::new();
        let seen = walk(&tree.0);
        let mut paths: Vec<&str> = seen.values().map(String::as_str).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "/",
                "/system.slice",
                "/system.slice/app.service",
                "/system.slice/app.service/worker",
                "/user.slice",
                "/user.slice/user-1000.slice",
                "/user.slice/user-1000.slice/user@1000.service",
                "/user.slice/user-1000.slice/user@1000.service/app.slice",
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app.service",
            ],
            "no files, no symlinks"
        );
        assert_eq!(
            seen[&tree.id("/system.slice/app.service")],
            "/system.slice/app.service"
        );
    }

    #[test]
    fn resolves_cgroup_paths_and_their_parts() {
        let tree = Tree::new();
        let resolver = tree.resolver();
        let user_app = "/user.slice/user-1000.slice/user@1000.service/app.slice/app.service";
        let id = resolver.resolve(1000, 1000, 5, &[0; 16], tree.id(user_app), 0);
        assert_eq!(id.cgroup.as_deref(), Some(user_app));
        assert_eq!(id.unit.as_deref(), Some("app.service"));
        assert_eq!(id.slices, ["user.slice", "user-1000.slice", "app.slice"]);
        assert_eq!(path(&resolver, tree.id("/")).as_deref(), Some("/"));
        assert_eq!(
            path(&resolver, tree.id("/link.service")),
            None,
            "symlinks are not cgroups"
        );
        assert_eq!(path(&resolver, u64::MAX), None);
    }

    #[test]
    fn walk_caches_what_it_sees() {
        let tree = Tree::new();
        let resolver = tree.resolver();
        let worker = tree.id("/system.slice/app.service/worker");
        assert_eq!(
            path(&resolver, worker).as_deref(),
            Some("/system.slice/app.service/worker")
        );
        let user = tree.id("/user.slice");
        assert_eq!(
            read(&resolver.cgroups).get(&user).map(String::as_str),
            Some("/user.slice")
        );

        let later = tree.0.join("system.slice/later.service");
        std::fs::create_dir(&later).unwrap_or_else(|e| panic!("{}: {e}", later.display()));
        let later_id = tree.id("/system.slice/later.service");
        assert_eq!(path(&resolver, user).as_deref(), Some("/user.slice"));
        assert!(
            !read(&resolver.cgroups).contains_key(&later_id),
            "a verified hit does not walk"
        );
        assert_eq!(
            path(&resolver, later_id).as_deref(),
            Some("/system.slice/later.service")
        );
    }

    #[test]
    fn renamed_and_removed_cgroups_are_noticed() {
        let tree = Tree::new();
        let resolver = tree.resolver();
        let app = tree.id("/system.slice/app.service");
        assert_eq!(
            path(&resolver, app).as_deref(),
            Some("/system.slice/app.service")
        );

        let (old, new) = (
            tree.0.join("system.slice/app.service"),
            tree.0.join("system.slice/app2.service"),
        );
        std::fs::rename(&old, &new).unwrap_or_else(|e| panic!("{}: {e}", old.display()));
        assert_eq!(
            path(&resolver, app).as_deref(),
            Some("/system.slice/app2.service")
        );

        // A new directory at the old path has another inode: the cached path is not trusted.
        std::fs::create_dir(&old).unwrap_or_else(|e| panic!("{}: {e}", old.display()));
        assert_eq!(
            path(&resolver, app).as_deref(),
            Some("/system.slice/app2.service")
        );

        let worker = tree.id("/system.slice/app2.service/worker");
        std::fs::remove_dir(new.join("worker"))
            .unwrap_or_else(|e| panic!("{}: {e}", new.display()));
        assert_eq!(path(&resolver, worker), None);
        assert!(
            lock(&resolver.missing)
                .get(&worker, Instant::now())
                .is_some(),
            "remembered as missing"
        );
    }

    #[test]
    fn the_cached_path_answers_only_what_it_can_vouch_for() {
        let tree = Tree::new();
        let resolver = tree.resolver();
        let app = tree.id("/system.slice/app.service");
        let cached =
            |r: &Resolver| r.resolve_cached(0, 0, 1, b"curl\0\0\0\0\0\0\0\0\0\0\0\0", app, 7);
        assert_eq!(
            cached(&resolver),
            None,
            "cold caches need the blocking path"
        );
        let full = resolver.resolve(0, 0, 1, b"curl\0\0\0\0\0\0\0\0\0\0\0\0", app, 7);
        assert_eq!(cached(&resolver), Some(full), "warm caches answer the same");
        let (old, new) = (
            tree.0.join("system.slice/app.service"),
            tree.0.join("system.slice/app2.service"),
        );
        std::fs::rename(&old, &new).unwrap_or_else(|e| panic!("{}: {e}", old.display()));
        assert_eq!(
            cached(&resolver),
            None,
            "a renamed cgroup is not vouched for from the cache"
        );
    }
}
