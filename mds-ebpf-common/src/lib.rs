//! The `#[repr(C)]` types that mds-agent's kernel programs and the agent share.
//!
//! Byte orders follow the kernel's own context structs, so the programs copy fields without
//! converting: IPv4 addresses are in network order (as `bpf_sock_addr.user_ip4`), ports are in
//! host order.
#![no_std]

/// Name of the `Array` map (one entry) holding [`Config`].
pub const MAP_CONFIG: &str = "CONFIG";
/// Name of the `LruHashMap<u64, Caller>` keyed by socket cookie, written at `connect()`.
pub const MAP_PENDING: &str = "PENDING";
/// Name of the `LruHashMap<ClientKey, Caller>` the agent reads on `accept()`.
pub const MAP_CALLERS: &str = "CALLERS";
/// Name of the `HashMap<u16, u8>` of metadata-address ports reachable without interception.
pub const MAP_OPEN_PORTS: &str = "OPEN_PORTS";
/// Name of the `HashMap<u32, u8>` of uids the kernel programs leave alone.
pub const MAP_EXEMPT_UIDS: &str = "EXEMPT_UIDS";
/// Name of the `HashMap<u64, u8>` of cgroup ids whose whole subtree the programs leave alone.
pub const MAP_EXEMPT_CGROUPS: &str = "EXEMPT_CGROUPS";

/// Deepest cgroup level the exemption check walks (cgroup v2 nesting beyond this is not exempt).
pub const MAX_CGROUP_DEPTH: i32 = 32;

/// [`Config::flags`]: interception is active (otherwise every program passes everything).
pub const FLAG_ENABLED: u32 = 1;
/// [`Config::flags`]: [`Config::intercept_addr6`] is intercepted too.
pub const FLAG_INTERCEPT6: u32 = 2;

/// What the agent tells the kernel programs at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The metadata address (network order), `169.254.169.254`.
    pub intercept_addr: u32,
    /// The agent's listen address (network order); connects are rewritten to it.
    pub agent_addr: u32,
    /// The metadata HTTP port (host order), 80.
    pub intercept_port: u16,
    /// The agent's listen port (host order).
    pub agent_port: u16,
    /// Sockets carrying this `SO_MARK` are the agent's own upstream connections and pass
    /// untouched. Setting a mark needs `CAP_NET_ADMIN`, which unprivileged workloads lack.
    pub upstream_mark: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    pub _pad: u32,
    /// Network-namespace cookie of the agent's listening socket: records are only written for
    /// connections in this namespace, where the agent can receive them.
    pub agent_netns: u64,
    /// The metadata server's IPv6 address, as the four network-order words of `user_ip6`.
    pub intercept_addr6: [u32; 4],
}

/// Who connected, as the kernel saw it at `connect()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Thread-group id (the process id as userspace knows it).
    pub pid: u32,
    /// Original destination port (host order).
    pub orig_port: u16,
    /// Address family of the socket (`AF_INET` or `AF_INET6`).
    pub family: u16,
    /// cgroup v2 id (the inode number of the cgroup's directory).
    pub cgroup_id: u64,
    /// Network-namespace cookie of the socket.
    pub netns_cookie: u64,
    /// Socket cookie of the client socket; unique per boot.
    pub socket_cookie: u64,
    /// Original destination address as IPv6 (IPv4 as `::ffff:a.b.c.d`), network order.
    pub orig_addr: [u8; 16],
    /// `comm` of the calling thread, NUL-padded.
    pub comm: [u8; 16],
}

/// The client end of a connection to the agent, as both the kernel and `accept()` see it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// Network-namespace cookie of the client socket.
    pub netns_cookie: u64,
    /// Client IPv4 address, network order.
    pub addr: u32,
    /// Client port, host order.
    pub port: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and byte arrays with explicit padding fields.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Caller {}
    unsafe impl aya::Pod for super::ClientKey {}
}
