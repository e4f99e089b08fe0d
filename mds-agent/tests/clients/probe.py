"""Socket-level clients for the interception tests, run as test users inside the sandbox.

Standard library only (the sandbox runs /usr/bin/python3 as other uids). Every mode prints one
JSON object per result line, so the Rust side asserts on structured output.
"""
import json
import socket
import struct
import sys
import threading

MDS = "169.254.169.254"
EMAIL = "/computeMetadata/v1/instance/service-accounts/default/email"


def request(sock, path=EMAIL, host="169.254.169.254"):
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nMetadata-Flavor: Google\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head else 0
    return status, body.decode(errors="replace")


def result(**kw):
    print(json.dumps(kw), flush=True)


def connect(family=socket.AF_INET, addr=MDS, port=80, src_port=None):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    if src_port is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0" if family == socket.AF_INET else "::", src_port))
    target = (addr, port) if family == socket.AF_INET else (addr, port, 0, 0)
    s.connect(target)
    return s


def close_hard(s):
    # RST instead of FIN: no TIME_WAIT, so the same source port is free at once.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def mode_email():
    s = connect()
    status, body = request(s)
    s.close()
    result(status=status, body=body)


def mode_connect(family, addr, port):
    try:
        s = connect(socket.AF_INET6 if family == "6" else socket.AF_INET, addr, int(port))
        peer = s.getpeername()
        s.close()
        result(ok=True, peer=[peer[0], peer[1]])
    except OSError as e:
        result(ok=False, errno=e.errno, error=str(e))


def mode_v6mapped():
    s = connect(socket.AF_INET6, "::ffff:" + MDS, 80)
    status, body = request(s)
    s.close()
    result(status=status, body=body)


def mode_email6(addr):
    s = connect(socket.AF_INET6, addr, 80)
    peer = s.getpeername()
    status, body = request(s, host=f"[{addr}]")
    s.close()
    result(status=status, body=body, peer=[peer[0], peer[1]])


def mode_getpeername(family):
    if family == "6":
        s = connect(socket.AF_INET6, "::ffff:" + MDS, 80)
    else:
        s = connect()
    peer = s.getpeername()
    s.close()
    result(peer=[peer[0], peer[1]])


def mode_fastopen():
    # TCP fast open: the destination rides on sendto(MSG_FASTOPEN) without connect().
    # Blocking, so sendto() waits for the handshake instead of failing with EINPROGRESS.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    req = (
        f"GET {EMAIL} HTTP/1.1\r\nHost: {MDS}\r\nMetadata-Flavor: Google\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    try:
        s.sendto(req, socket.MSG_FASTOPEN, (MDS, 80))
    except OSError as e:
        result(ok=False, errno=e.errno, error=str(e))
        return
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    result(ok=True, status=int(head.split(b" ")[1]) if head else 0, body=body.decode(errors="replace"))


def mode_direct(addr, port, src_port=None):
    try:
        s = connect(socket.AF_INET, addr, int(port), None if src_port is None else int(src_port))
        status, body = request(s)
        s.close()
        result(ok=True, status=status, body=body)
    except OSError as e:
        result(ok=False, errno=e.errno, error=str(e))


def mode_mptcp():
    proto = getattr(socket, "IPPROTO_MPTCP", 262)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    except OSError as e:
        result(ok=False, supported=False, errno=e.errno, error=str(e))
        return
    try:
        s.settimeout(10)
        s.connect((MDS, 80))
        status, body = request(s)
        result(ok=True, supported=True, status=status, body=body)
    except OSError as e:
        result(ok=False, supported=True, errno=e.errno, error=str(e))


def mode_bind(family, addr, port):
    s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((addr, int(port)))
        s.listen()
        result(ok=True)
    except OSError as e:
        result(ok=False, errno=e.errno, error=str(e))
    finally:
        s.close()


def mode_pingpong(ports):
    """One request per line on stdin, from a source port cycling through `ports`."""
    ports = [int(p) for p in ports.split(",")]
    i = 0
    for _ in sys.stdin:
        port = ports[i % len(ports)]
        i += 1
        try:
            s = connect(src_port=port)
            status, body = request(s)
            close_hard(s)
            result(status=status, body=body, port=port)
        except OSError as e:
            result(status=0, body="", error=str(e), port=port)


def mode_concurrent(n):
    n = int(n)
    out = [None] * n
    barrier = threading.Barrier(n)

    def one(i):
        try:
            s = connect()
            barrier.wait(timeout=30)
            out[i] = request(s)
            s.close()
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            out[i] = (0, repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for status, body in out:
        result(status=status, body=body)


def http_request(spec):
    """One HTTP request to the metadata address, as `spec` says: method, path, headers (default
    just Metadata-Flavor: Google; given, exactly those), body, host, timeout. The response's
    headers come back as [name, value] pairs, so duplicates show."""
    import http.client
    import time

    host = spec.get("host", MDS)
    headers = spec.get("headers", {"Metadata-Flavor": "Google"})
    body = spec.get("body")
    start = time.monotonic()
    conn = http.client.HTTPConnection(MDS, 80, timeout=spec.get("timeout", 10))
    try:
        conn.putrequest(spec.get("method", "GET"), spec["path"], skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            body = body.encode()
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
        return dict(
            status=r.status,
            headers=[[k.lower(), v] for k, v in r.getheaders()],
            body=data.decode(errors="replace"),
            elapsed=time.monotonic() - start,
        )
    except OSError as e:
        return dict(status=0, headers=[], body="", errno=e.errno, error=repr(e), elapsed=time.monotonic() - start)
    finally:
        conn.close()


def mode_http(*specs):
    """One request per JSON spec argument (see http_request), one result line each."""
    for spec in specs:
        result(**http_request(json.loads(spec)))


def mode_concurrent_get(n, path):
    """`n` connections opened at once, then `n` GETs of `path` sent together."""
    n = int(n)
    out = [None] * n
    barrier = threading.Barrier(n)

    def one(i):
        try:
            s = connect()
            barrier.wait(timeout=30)
            out[i] = request(s, path)
            s.close()
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            out[i] = (0, repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for status, body in out:
        result(status=status, body=body)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    {
        "email": mode_email,
        "connect": mode_connect,
        "v6mapped": mode_v6mapped,
        "email6": mode_email6,
        "getpeername": mode_getpeername,
        "fastopen": mode_fastopen,
        "direct": mode_direct,
        "mptcp": mode_mptcp,
        "bind": mode_bind,
        "pingpong": mode_pingpong,
        "concurrent": mode_concurrent,
        "http": mode_http,
        "concurrent_get": mode_concurrent_get,
    }[mode](*args)
