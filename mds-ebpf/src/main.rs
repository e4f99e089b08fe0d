//! mds-agent's kernel programs.
//!
//! - `cgroup/connect4`, `cgroup/connect6`: a TCP connect to the metadata address and port (also
//!   its IPv6 address, when configured) is
//!   rewritten to the agent, and the caller (uid, gid, pid, comm, cgroup, netns) is recorded by
//!   socket cookie in `PENDING`. Other ports of the metadata address are refused with `EPERM`
//!   unless listed in `OPEN_PORTS`. IPv4-mapped IPv6 is handled like IPv4.
//! - `sock_ops` at `TCP_CONNECT_CB` (source port now bound, SYN not yet sent, so before the agent
//!   can `accept()`): moves the record to `CALLERS`, keyed by the client end the agent sees as the
//!   peer. A connect to the agent that was not rewritten clears that key, so a reused port never
//!   carries an old record; `STATE_CB` clears it when the connection closes.
//! - `cgroup/getpeername4/6`: an intercepted socket reports the address it dialled.
//! - `cgroup/bind4/6`: only the agent (its socket marked) may bind the agent's address.
//!
//! Requires Linux 5.15 (`bpf_get_netns_cookie` in sock_ops).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie,
        },
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use mds_ebpf_common::{Caller, ClientKey, Config, FLAG_ENABLED, FLAG_INTERCEPT6, MAX_CGROUP_DEPTH};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Sizes of the two record maps are set by the agent at load time.
#[map]
static PENDING: LruHashMap<u64, Caller> = LruHashMap::with_max_entries(65536, 0);
#[map]
static CALLERS: LruHashMap<ClientKey, Caller> = LruHashMap::with_max_entries(65536, 0);
#[map]
static OPEN_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(64, 0);
#[map]
static EXEMPT_UIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);
#[map]
static EXEMPT_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// `::ffff:0:0/96` prefix word, as the third `u32` of an IPv6 address in network order.
const V4_MAPPED: u32 = 0x0000_ffff_u32.to_be();

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    // SAFETY: the kernel hands a valid context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_ip4 != cfg.intercept_addr {
        return ALLOW;
    }
    let mut orig = [0u8; 16];
    orig[10] = 0xff;
    orig[11] = 0xff;
    orig[12..].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    match decide(&ctx, cfg, sa, port_of(sa.user_port), orig, AF_INET) {
        Verdict::Rewrite => {
            sa.user_ip4 = cfg.agent_addr;
            sa.user_port = u32::from(cfg.agent_port.to_be());
            ALLOW
        }
        Verdict::Allow => ALLOW,
        Verdict::Deny => DENY,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = sa.user_ip6;
    let mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED && ip6[3] == cfg.intercept_addr;
    let native = cfg.flags & FLAG_INTERCEPT6 != 0
        && ip6[0] == cfg.intercept_addr6[0]
        && ip6[1] == cfg.intercept_addr6[1]
        && ip6[2] == cfg.intercept_addr6[2]
        && ip6[3] == cfg.intercept_addr6[3];
    if !mapped && !native {
        return ALLOW;
    }
    let mut orig = [0u8; 16];
    orig[..4].copy_from_slice(&ip6[0].to_ne_bytes());
    orig[4..8].copy_from_slice(&ip6[1].to_ne_bytes());
    orig[8..12].copy_from_slice(&ip6[2].to_ne_bytes());
    orig[12..].copy_from_slice(&ip6[3].to_ne_bytes());
    match decide(&ctx, cfg, sa, port_of(sa.user_port), orig, AF_INET6) {
        // The agent listens on IPv4: an IPv6 socket reaches it at its v4-mapped address.
        Verdict::Rewrite => {
            sa.user_ip6[0] = 0;
            sa.user_ip6[1] = 0;
            sa.user_ip6[2] = V4_MAPPED;
            sa.user_ip6[3] = cfg.agent_addr;
            sa.user_port = u32::from(cfg.agent_port.to_be());
            ALLOW
        }
        Verdict::Allow => ALLOW,
        Verdict::Deny => DENY,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_ip4 == cfg.agent_addr && port_of(sa.user_port) == cfg.agent_port {
        sa.user_ip4 = cfg.intercept_addr;
        sa.user_port = u32::from(cfg.intercept_port.to_be());
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = sa.user_ip6;
    if ip6[0] != 0
        || ip6[1] != 0
        || ip6[2] != V4_MAPPED
        || ip6[3] != cfg.agent_addr
        || port_of(sa.user_port) != cfg.agent_port
    {
        return ALLOW;
    }
    // An IPv6 socket may have dialled either metadata address: its record says which.
    // SAFETY: `sk` is always a valid full socket in cgroup sock_addr programs.
    let (src_ip4, src_port) = unsafe {
        (
            (*sa.__bindgen_anon_1.sk).src_ip4,
            (*sa.__bindgen_anon_1.sk).src_port,
        )
    };
    let key = ClientKey {
        // SAFETY: helper that takes the program's own context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr: src_ip4,
        port: src_port as u16,
        _pad: 0,
    };
    // SAFETY: the record is copied field by field while the entry is looked up.
    match unsafe { CALLERS.get(&key) } {
        Some(caller) => {
            let o = caller.orig_addr;
            sa.user_ip6[0] = u32::from_ne_bytes([o[0], o[1], o[2], o[3]]);
            sa.user_ip6[1] = u32::from_ne_bytes([o[4], o[5], o[6], o[7]]);
            sa.user_ip6[2] = u32::from_ne_bytes([o[8], o[9], o[10], o[11]]);
            sa.user_ip6[3] = u32::from_ne_bytes([o[12], o[13], o[14], o[15]]);
            sa.user_port = u32::from(caller.orig_port.to_be());
        }
        None => {
            sa.user_ip6[3] = cfg.intercept_addr;
            sa.user_port = u32::from(cfg.intercept_port.to_be());
        }
    }
    ALLOW
}

/// Only the agent may listen on its address: otherwise, while it is down, anyone could bind it and
/// answer intercepted callers as the metadata server. The agent marks its socket before `bind()`.
#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    // SAFETY: as in connect4.
    let sa = unsafe { &*ctx.sock_addr };
    if port_of(sa.user_port) != cfg.agent_port
        || (sa.user_ip4 != cfg.agent_addr && sa.user_ip4 != 0)
    {
        return ALLOW;
    }
    agent_only(&ctx, cfg, sa)
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    // SAFETY: as in connect4.
    let sa = unsafe { &*ctx.sock_addr };
    let ip6 = sa.user_ip6;
    // `::` accepts IPv4 connections too, and `::ffff:a.b.c.d` is the agent's address.
    let any = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == 0;
    let mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED && ip6[3] == cfg.agent_addr;
    if port_of(sa.user_port) != cfg.agent_port || !(any || mapped) {
        return ALLOW;
    }
    agent_only(&ctx, cfg, sa)
}

#[sock_ops]
pub fn mds_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

enum Verdict {
    Allow,
    Deny,
    Rewrite,
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0).filter(|c| c.flags & FLAG_ENABLED != 0)
}

/// `user_port` holds a network-order port in its low 16 bits.
#[inline(always)]
fn port_of(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// What to do with a connect whose destination is the metadata address.
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    cfg: &Config,
    sa: &aya_ebpf::bindings::bpf_sock_addr,
    port: u16,
    orig_addr: [u8; 16],
    family: u16,
) -> Verdict {
    let uid_gid = bpf_get_current_uid_gid();
    if is_exempt(cfg, sa, uid_gid as u32) {
        return Verdict::Allow;
    }
    if port == cfg.intercept_port {
        // Only plain TCP can be handed to the agent; anything else (UDP, MPTCP) to the HTTP port
        // would bypass it, so it is refused.
        if sa.protocol != IPPROTO_TCP || sa.type_ != SOCK_STREAM {
            debug!(ctx, "refused non-TCP connect to metadata port {}", port);
            return Verdict::Deny;
        }
        return if record(ctx, uid_gid, port, orig_addr, family) {
            Verdict::Rewrite
        } else {
            Verdict::Deny
        };
    }
    // SAFETY: lookups in a map the agent fills; the value is not read.
    if unsafe { OPEN_PORTS.get(&port) }.is_some() {
        return Verdict::Allow;
    }
    debug!(ctx, "refused connect to metadata port {}", port);
    Verdict::Deny
}

/// Allows the bind only for the agent's own (marked) socket, in the agent's network namespace.
#[inline(always)]
fn agent_only(ctx: &SockAddrContext, cfg: &Config, sa: &aya_ebpf::bindings::bpf_sock_addr) -> i32 {
    // SAFETY: helper that takes the program's own context.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.agent_netns {
        return ALLOW;
    }
    // SAFETY: `sk` is always a valid full socket in cgroup sock_addr programs.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if cfg.upstream_mark != 0 && mark == cfg.upstream_mark {
        return ALLOW;
    }
    debug!(ctx, "refused bind to the agent's port {}", cfg.agent_port);
    DENY
}

#[inline(always)]
fn is_exempt(cfg: &Config, sa: &aya_ebpf::bindings::bpf_sock_addr, uid: u32) -> bool {
    // SAFETY: `sk` is always a valid full socket in cgroup sock_addr programs.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if cfg.upstream_mark != 0 && mark == cfg.upstream_mark {
        return true;
    }
    // SAFETY: as above, value unread.
    if unsafe { EXEMPT_UIDS.get(&uid) }.is_some() {
        return true;
    }
    for level in 0..MAX_CGROUP_DEPTH {
        // SAFETY: helper with no pointer arguments.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        // SAFETY: as above, value unread.
        if unsafe { EXEMPT_CGROUPS.get(&id) }.is_some() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn record(
    ctx: &SockAddrContext,
    uid_gid: u64,
    port: u16,
    orig_addr: [u8; 16],
    family: u16,
) -> bool {
    // SAFETY: helpers that take the program's own context.
    let (socket_cookie, netns_cookie, cgroup_id) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_current_cgroup_id(),
        )
    };
    let caller = Caller {
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        orig_port: port,
        family,
        cgroup_id,
        netns_cookie,
        socket_cookie,
        orig_addr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    PENDING.insert(&socket_cookie, &caller, 0).is_ok()
}

#[inline(always)]
fn client_key(ctx: &SockOpsContext) -> ClientKey {
    ClientKey {
        // SAFETY: helper that takes the program's own context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr: ctx.local_ip4(),
        port: ctx.local_port() as u16,
        _pad: 0,
    }
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let Some(cfg) = config() else { return };
    // `remote_port` is network order, in the high half on some kernels and the low on others.
    let rp = ctx.remote_port();
    let rp = if rp > 0xffff { rp >> 16 } else { rp } as u16;
    if ctx.remote_ip4() != cfg.agent_addr || rp != cfg.agent_port.to_be() {
        return;
    }
    let key = client_key(ctx);
    if key.netns_cookie != cfg.agent_netns {
        return;
    }
    // SAFETY: helper that takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    match unsafe { PENDING.get(&cookie) } {
        Some(caller) => {
            let caller = *caller;
            if CALLERS.insert(&key, &caller, 0).is_ok() {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
            let _ = PENDING.remove(&cookie);
        }
        // A direct connect to the agent: no record may stand for this client end.
        None => {
            let _ = CALLERS.remove(&key);
        }
    }
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let key = client_key(ctx);
    // SAFETY: helper that takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Only the socket that wrote the record removes it: the port may already be reused.
    // SAFETY: the value is read before removal.
    if let Some(caller) = unsafe { CALLERS.get(&key) } {
        if caller.socket_cookie == cookie {
            let _ = CALLERS.remove(&key);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
