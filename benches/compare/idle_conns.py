#!/usr/bin/env python3
"""Memory per idle keep-alive connection, for benches/compare.sh.

Opens N connections to a proxy, sends one small GET on each and reads the answer (so the proxy
has set the connection up completely), leaves them all open and idle, and reports how much the
resident set of the proxy's processes grew, per connection. Prints one JSON object.
"""
import argparse
import json
import os
import resource
import socket
import sys
import time


def pid_tree(pid):
    """The process and its direct children (nginx: master + worker)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def status_kb(pids, field):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def read_response(s):
    """Reads one HTTP/1.1 response (Content-Length or chunked); returns the status code."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if b"content-length" in headers:
        want = int(headers[b"content-length"])
        while len(body) < want:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            body += chunk
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            body += chunk
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, action="append", required=True,
                    help="proxy process (its direct children are counted too)")
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds to wait before reading RSS")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    pids = [p for pid in args.pid for p in pid_tree(pid)]
    time.sleep(args.settle)
    before = status_kb(pids, "VmRSS")
    req = b"GET / HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: idle-conns\r\n\r\n"
    socks, errors, non2xx = [], 0, 0
    started = time.monotonic()
    for _ in range(args.conns):
        try:
            s = socket.create_connection((args.host, args.port), timeout=10)
            s.sendall(req)
            if not 200 <= read_response(s) < 300:
                non2xx += 1
            socks.append(s)
        except OSError as e:  # ConnectionError is an OSError
            errors += 1
            if errors == 1:
                print(f"idle_conns: first error: {e}", file=sys.stderr)
    opened_in = time.monotonic() - started
    time.sleep(args.settle)
    # Connections the proxy closed meanwhile would not be idle ones: count those still open.
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            alive += 0 if s.recv(1) == b"" else 1
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    after = status_kb(pids, "VmRSS")
    for s in socks:
        s.close()
    per_conn = (after - before) * 1024 / alive if alive else None
    print(json.dumps({
        "conns": args.conns, "alive": alive, "errors": errors, "non2xx": non2xx,
        "open_seconds": round(opened_in, 2), "rss_before_kb": before, "rss_after_kb": after,
        "bytes_per_conn": round(per_conn) if per_conn is not None else None,
    }))


if __name__ == "__main__":
    main()
