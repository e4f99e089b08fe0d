//! `cargo xtask bench`: latency through the real interception path, compared in the same run with
//! a bare hyper server (the fake metadata server, reached directly by a kernel-exempt uid) and with
//! the cost of the `/proc/net/tcp` scan that `/proc`-scanning proxies do per request.
//!
//! Everything runs in a sandbox (its own network namespace and cgroups); clients are this binary
//! re-executed as test users (`bench client ...`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use mds_agent::testkit::{
    fake_metadata::FakeMetadata,
    harness::Harness,
    sandbox::{RunAs, Sandbox},
};

const MDS: &str = "169.254.169.254:80";
const EMAIL: &str = "/computeMetadata/v1/instance/service-accounts/default/email";
const PROJECT: &str = "/computeMetadata/v1/project/project-id";
const MAPPED: u32 = 1000;
const EXEMPT: u32 = 1004;
/// Runs of each scenario; the table shows their medians.
const RUNS: usize = 5;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        return client(&args[2], &args[3], args[4].parse().expect("request count"));
    }
    let mut agent = None;
    let mut requests = 2000usize;
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--agent" => agent = it.next().map(PathBuf::from),
            "--requests" => {
                requests = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--requests N")
            }
            other => panic!("unknown argument {other}; usage: bench --agent PATH [--requests N]"),
        }
    }
    let agent = agent.expect("--agent PATH (cargo xtask bench passes the release binary)");
    run(&agent, requests);
}

fn run(agent: &std::path::Path, requests: usize) {
    // The agent logs at warn: per-request debug lines would dominate what is measured.
    std::env::set_var("MDS_AGENT_LOG", "warn");
    let sandbox = Sandbox::new("bench").expect("sandbox (run as root)");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = sandbox
        .std_listener(MDS.parse().expect("addr"))
        .expect("fake metadata listener");
    let _upstream = {
        let _entered = runtime.enter();
        FakeMetadata::start(listener)
    };
    let mut harness = Harness::new(sandbox);
    harness
        .write_config(&format!(
            "[exempt]\nuids = [{EXEMPT}]\n\n[[rule]]\nuid = {MAPPED}\nservice_account = \"bench@bench-project.iam.gserviceaccount.com\"\n"
        ))
        .expect("config");
    harness.start_agent(agent).expect("agent");
    let me = std::env::current_exe().expect("own path");

    println!("mds-agent benchmark: {requests} sequential requests per row, in a sandbox network namespace");
    println!(
        "{:<64} {:>9} {:>9} {:>9} {:>10}",
        "scenario (median of 5 runs)", "p50 µs", "p99 µs", "mean µs", "req/s"
    );
    let rows = [
        (
            "fake metadata server (hyper, direct), new connection each",
            EXEMPT,
            "connect",
            PROJECT,
        ),
        (
            "mds-agent, answered locally (email), new connection each",
            MAPPED,
            "connect",
            EMAIL,
        ),
        (
            "mds-agent, forwarded upstream (project-id), new connection each",
            MAPPED,
            "connect",
            PROJECT,
        ),
        (
            "fake metadata server (hyper, direct), keep-alive",
            EXEMPT,
            "keepalive",
            PROJECT,
        ),
        (
            "mds-agent, answered locally (email), keep-alive",
            MAPPED,
            "keepalive",
            EMAIL,
        ),
        (
            "mds-agent, forwarded upstream (project-id), keep-alive",
            MAPPED,
            "keepalive",
            PROJECT,
        ),
    ];
    // Rows interleave scenarios, and each figure is the median of RUNS runs, so that a burst of
    // other work on the machine moves one run, not the result.
    let mut results = vec![Vec::new(); rows.len()];
    for _ in 0..RUNS {
        for (i, (name, uid, mode, path)) in rows.iter().enumerate() {
            let cgroup = if *uid == EXEMPT { "exempt" } else { "mapped" };
            let out = harness
                .command(&me, RunAs::user(*uid, *uid, cgroup))
                .args(["client", mode, path, &requests.to_string()])
                .stdin(Stdio::null())
                .output()
                .expect("client");
            assert!(
                out.status.success(),
                "{name}: client failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let figures: Vec<f64> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(|f| f.parse().expect("client figures"))
                .collect();
            results[i].push(figures);
        }
    }
    for ((name, ..), runs) in rows.iter().zip(results) {
        let median = |col: usize| {
            let mut v: Vec<f64> = runs.iter().map(|r| r[col]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "{name:<64} {:>9.1} {:>9.1} {:>9.1} {:>10.0}",
            median(0),
            median(1),
            median(2),
            median(3)
        );
    }

    // What a /proc-scanning proxy pays per request before it can even decide: read and search the
    // TCP table. Measured on loopback with 1,000 other connections open, as on a busy host.
    let (scan, sockets) = proc_scan_cost(1000, 300);
    println!(
        "{:<64} {:>9.1} {:>9.1}",
        format!("/proc/net/tcp scan alone ({sockets} sockets open)"),
        scan.0,
        scan.1
    );
    harness.stop_agent();
}

/// Runs inside the sandbox as a test user: prints "p50 p99 mean req/s".
fn client(mode: &str, path: &str, n: usize) {
    let addr: SocketAddr = MDS.parse().expect("addr");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n"
    );
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    let mut conn: Option<TcpStream> = None;
    for _ in 0..n {
        let t = Instant::now();
        let stream = match (mode, conn.as_mut()) {
            ("keepalive", Some(s)) => s,
            _ => {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
                s.set_nodelay(true).expect("nodelay");
                conn.insert(s)
            }
        };
        stream.write_all(request.as_bytes()).expect("write");
        let status = read_response(stream);
        assert_eq!(status, 200, "{path}");
        samples.push(t.elapsed());
        if mode != "keepalive" {
            conn = None;
        }
    }
    let total = started.elapsed();
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = samples.iter().map(|d| us(*d)).sum::<f64>() / n as f64;
    println!(
        "{:>9.1} {:>9.1} {:>9.1} {:>10.0}",
        us(samples[n / 2]),
        us(samples[n * 99 / 100]),
        mean,
        n as f64 / total.as_secs_f64()
    );
}

/// Reads one response with a Content-Length body; returns the status.
fn read_response(stream: &mut TcpStream) -> u16 {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).expect("read body");
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    status
}

/// (p50 µs, p99 µs) of finding one connection's uid in /proc/net/tcp, and the sockets open.
fn proc_scan_cost(open: usize, rounds: usize) -> ((f64, f64), usize) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let addr = listener.local_addr().expect("addr");
    // Accept as we go: the backlog is far smaller than `open`.
    let (clients, accepted): (Vec<TcpStream>, Vec<TcpStream>) = (0..open)
        .map(|_| {
            let client = TcpStream::connect(addr).expect("connect");
            (client, listener.accept().expect("accept").0)
        })
        .unzip();
    let target = clients[open / 2].local_addr().expect("local").port();
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let table = std::fs::read_to_string("/proc/self/net/tcp").expect("tcp table");
        let uid = table.lines().skip(1).find_map(|row| {
            let cols: Vec<&str> = row.split_whitespace().collect();
            let port = cols.get(1)?.rsplit(':').next()?;
            (u16::from_str_radix(port, 16).ok()? == target)
                .then(|| cols.get(7).map(|u| u.to_string()))?
        });
        assert!(uid.is_some(), "the connection is in the table");
        samples.push(t.elapsed());
    }
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let sockets = clients.len() + accepted.len() + 1;
    (
        (us(samples[rounds / 2]), us(samples[rounds * 99 / 100])),
        sockets,
    )
}
