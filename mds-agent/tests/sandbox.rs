//! Privileged: the test sandbox itself. Its children run in its network namespace, cgroup and /etc
//! view as the asked-for user, it leaves the host untouched, and it is gone after drop. No BPF here.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use mds_agent::testkit::fake_metadata::{blob, FakeMetadata, BLOB_PATH, PROJECT_ID};
use mds_agent::testkit::sandbox::{cgroup2_mount, require_privileged, RunAs, Sandbox};

const METADATA: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80);

fn run(sandbox: &Sandbox, who: &RunAs, program: &str, args: &[&str]) -> String {
    let output = sandbox
        .command(program, who.clone())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} as {who:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} as {who:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn host_lo() -> String {
    let output = Command::new("ip")
        .args(["-4", "addr", "show", "dev", "lo"])
        .output()
        .expect("ip on the host");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn children_run_inside_the_sandbox_and_drop_removes_it() {
    if !require_privileged() {
        return;
    }
    let host_hosts = fs::read("/etc/hosts").expect("the host's /etc/hosts");
    let host_had_metadata_ip = host_lo().contains("169.254.169.254");
    let mount = cgroup2_mount().expect("a cgroup2 mount");

    let sandbox = Sandbox::new("sandbox").unwrap_or_else(|e| panic!("{e}"));
    let cgroup_dir = sandbox.cgroup_dir().to_owned();
    let dir = sandbox.dir().to_owned();
    assert_eq!(
        cgroup_dir.parent(),
        Some(mount.as_path()),
        "the sandbox cgroup sits right under the mount"
    );
    assert!(fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .contains(" bpf "));

    let root = RunAs::root("root");
    let alice = RunAs::user(1000, 1000, "alice");
    for who in [&root, &alice] {
        let lo = run(&sandbox, who, "ip", &["-4", "addr", "show", "dev", "lo"]);
        assert!(
            lo.contains("inet 169.254.169.254/32") && lo.contains("UP"),
            "as {who:?}: {lo}"
        );
    }

    let cgroups = run(&sandbox, &alice, "cat", &["/proc/self/cgroup"]);
    let expected = format!("0::{}", sandbox.cgroup_rel("alice"));
    assert!(
        cgroups.lines().any(|l| l == expected),
        "want {expected:?} in:\n{cgroups}"
    );
    assert!(run(&sandbox, &root, "cat", &["/proc/self/cgroup"])
        .contains(&format!("0::{}\n", sandbox.cgroup_rel("root"))));
    assert_eq!(run(&sandbox, &alice, "id", &["-u"]).trim(), "1000");
    assert_eq!(
        run(&sandbox, &alice, "id", &["-G"]).trim(),
        "1000 2000",
        "alice's login groups include devs"
    );
    assert_eq!(run(&sandbox, &root, "id", &["-u"]).trim(), "0");

    let hosts = run(&sandbox, &alice, "cat", &["/etc/hosts"]);
    assert!(
        hosts.contains("169.254.169.254 metadata.google.internal metadata"),
        "{hosts}"
    );
    let resolved = run(
        &sandbox,
        &alice,
        "getent",
        &["hosts", "metadata.google.internal"],
    );
    assert!(resolved.starts_with("169.254.169.254 "), "{resolved}");
    let passwd = run(&sandbox, &alice, "getent", &["passwd", "alice"]);
    assert!(passwd.starts_with("alice:x:1000:1000:"), "{passwd}");
    assert!(
        run(&sandbox, &alice, "getent", &["group", "devs"]).starts_with("devs:x:2000:alice,carol")
    );
    let env = run(&sandbox, &alice, "env", &[]);
    assert!(env.lines().any(|l| l == "USER=alice"), "{env}");

    let escape = sandbox.command("true", RunAs::root("../escape")).status();
    assert!(
        escape.is_err(),
        "a sub-cgroup outside the sandbox must be refused: {escape:?}"
    );
    assert!(!mount.join("escape").exists());

    // The caller's namespaces and files are untouched.
    assert_eq!(
        fs::read("/etc/hosts").expect("the host's /etc/hosts"),
        host_hosts
    );
    assert_eq!(host_lo().contains("169.254.169.254"), host_had_metadata_ip);

    let mut sleeper = sandbox
        .command("sleep", RunAs::user(1001, 1001, "bob/nested"))
        .arg("600")
        .spawn()
        .expect("sleep in the sandbox");
    drop(sandbox);
    let status = sleeper.wait().expect("the sleeper's status");
    assert_eq!(
        status.signal(),
        Some(9),
        "drop kills what runs in the sandbox"
    );
    assert!(
        !cgroup_dir.exists(),
        "{} survived the drop",
        cgroup_dir.display()
    );
    assert!(!dir.exists(), "{} survived the drop", dir.display());
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mountinfo.contains(&dir.display().to_string()),
        "the bpffs survived the drop:\n{mountinfo}"
    );
}

#[test]
fn threads_started_in_the_netns_stay_there() {
    if !require_privileged() {
        return;
    }
    let sandbox = Sandbox::new("netns").unwrap_or_else(|e| panic!("{e}"));
    let sandbox_ns = nix::sys::stat::fstat(sandbox.netns_fd().as_raw_fd())
        .expect("fstat the netns")
        .st_ino;
    let ns_of_this_thread = || fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
    let host_ns = ns_of_this_thread().expect("the host netns");
    assert_ne!(sandbox_ns, host_ns);

    let inner = sandbox
        .spawn_in_netns(move || {
            let own = ns_of_this_thread();
            let child = std::thread::spawn(ns_of_this_thread)
                .join()
                .expect("a child thread");
            (own.ok(), child.ok())
        })
        .expect("a thread in the netns")
        .join()
        .expect("the thread's result");
    assert_eq!(inner, (Some(sandbox_ns), Some(sandbox_ns)));
    assert_eq!(
        sandbox
            .run_in_netns(ns_of_this_thread)
            .expect("run_in_netns"),
        sandbox_ns
    );
    assert_eq!(
        ns_of_this_thread().expect("the host netns"),
        host_ns,
        "the caller stays where it was"
    );
}

#[test]
fn fake_metadata_answers_by_name_inside_the_sandbox() {
    if !require_privileged() {
        return;
    }
    let sandbox = Sandbox::new("fakemd").unwrap_or_else(|e| panic!("{e}"));
    let listener = sandbox
        .std_listener(METADATA)
        .expect("listen on 169.254.169.254:80 in the sandbox");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let fake = {
        let _entered = runtime.enter();
        FakeMetadata::start(listener)
    };

    let alice = RunAs::user(1000, 1000, "alice");
    let url = "http://metadata.google.internal/computeMetadata/v1/project/project-id";
    let args = [
        "-sS",
        "--max-time",
        "10",
        "-H",
        "Metadata-Flavor: Google",
        url,
    ];
    assert_eq!(run(&sandbox, &alice, "curl", &args), PROJECT_ID);
    let seen = fake.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].path_and_query,
        "/computeMetadata/v1/project/project-id"
    );
    assert_eq!(seen[0].headers["host"], "metadata.google.internal");
    assert_eq!(
        seen[0].peer.ip(),
        METADATA.ip(),
        "a local connection on lo comes from the address itself"
    );

    // An in-process client in the namespace gets binary values byte for byte.
    let mut stream = sandbox
        .std_connect(METADATA)
        .expect("connect inside the sandbox");
    let request = format!(
        "GET /computeMetadata/v1/{BLOB_PATH} HTTP/1.1\r\nHost: metadata.google.internal\r\n\
         Metadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the response");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header/body separator");
    let head = String::from_utf8_lossy(&response[..split]);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(&response[split + 4..], &blob()[..]);
}
