#!/usr/bin/env python3
"""Large-message memory measurement: N clients send one M MiB message each at the same time to
the release relay running inside a memory cgroup of LIMIT MiB; a sink on 127.0.0.1:2526 (where
the standalone catch-all rule relays) counts what is delivered.

Reports the relay's peak resident size (VmHWM), the cgroup's peak usage and OOM kills, how many
messages were accepted and how many arrived. Exits 1 if the relay died, a message was refused or
lost. Needs root (cgroups) and a release build:

    cargo build --release -p mailrelay-relay
    sudo relay/tests/large_messages.py            # CLIENTS=100 SIZE_MIB=24 LIMIT_MIB=256

Not part of the CI suite (it moves several GiB); the figures are in relay/README.md.
"""

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENTS = int(os.environ.get("CLIENTS", "100"))
SIZE_MIB = int(os.environ.get("SIZE_MIB", "24"))
LIMIT_MIB = int(os.environ.get("LIMIT_MIB", "256"))
RELAY = os.environ.get("RELAY", os.path.join(ROOT, "target/release/relay"))


def message():
    line = (b"0123456789abcdefghij" * 4)[:76] + b"\r\n"
    body = bytearray(b"Subject: large\r\nFrom: s@example.test\r\n\r\n")
    while len(body) < SIZE_MIB * 1024 * 1024:
        body += line
    return bytes(body) + b".\r\n"


def reply(f):
    while True:
        line = f.readline()
        if not line:
            return 0, b""
        if line[3:4] != b"-":
            return int(line[:3]), line


def send(data, results, i):
    try:
        s = socket.create_connection(("127.0.0.1", 2525), timeout=600)
        f = s.makefile("rb")
        reply(f)
        for cmd in (b"EHLO load.test", b"MAIL FROM:<s@example.test>", b"RCPT TO:<r@far.example>"):
            s.sendall(cmd + b"\r\n")
            code, text = reply(f)
            if code != 250:
                results[i] = text
                return
        s.sendall(b"DATA\r\n")
        if reply(f)[0] != 354:
            results[i] = b"no 354"
            return
        s.sendall(memoryview(data))
        code, text = reply(f)
        results[i] = code if code == 250 else text
        s.sendall(b"QUIT\r\n")
        s.close()
    except OSError as e:
        results[i] = str(e).encode()


class Sink:
    """A minimal SMTP server that counts complete messages and keeps none of their bytes."""

    def __init__(self):
        self.delivered = 0

    async def session(self, reader, writer):
        writer.write(b"220 sink ESMTP\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000000000\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    tail = b""
                    while True:
                        chunk = await reader.read(1 << 16)
                        if not chunk:
                            return
                        tail = (tail + chunk)[-5:]
                        if tail == b"\r\n.\r\n":
                            break
                    self.delivered += 1
                    writer.write(b"250 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()


def cgroup(limit):
    """Creates a memory cgroup (v2 or v1) and returns (procs file, peak reader, oom reader)."""
    v2 = "/sys/fs/cgroup/cgroup.controllers"
    name = f"mailrelay-large-{os.getpid()}"
    if os.path.exists(v2) and "memory" in open(v2).read():
        d = f"/sys/fs/cgroup/{name}"
        os.makedirs(d)
        open(f"{d}/memory.max", "w").write(str(limit))
        peak = lambda: int(open(f"{d}/memory.peak").read()) if os.path.exists(f"{d}/memory.peak") else -1
        oom = lambda: int(dict(l.split() for l in open(f"{d}/memory.events"))["oom_kill"])
    else:
        d = f"/sys/fs/cgroup/memory/{name}"
        os.makedirs(d)
        open(f"{d}/memory.limit_in_bytes", "w").write(str(limit))
        peak = lambda: int(open(f"{d}/memory.max_usage_in_bytes").read())
        oom = lambda: int(dict(l.split() for l in open(f"{d}/memory.oom_control")).get("oom_kill", "0"))
    return d, f"{d}/cgroup.procs", peak, oom


def vm(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return -1


def main():
    if not os.path.exists(RELAY):
        sys.exit(f"{RELAY} missing: cargo build --release -p mailrelay-relay")
    work = tempfile.mkdtemp(prefix="mailrelay-large-")
    for f in ("relay.yaml", "credentials.yaml", "runtime.yaml"):
        shutil.copy(os.path.join(ROOT, "deploy/standalone", f), work)
    runtime = open(os.path.join(work, "runtime.yaml")).read().replace("127.0.0.1:9090", "127.0.0.1:19090")
    open(os.path.join(work, "runtime.yaml"), "w").write(runtime)

    sink = Sink()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(sink.session, "127.0.0.1", 2526))
    threading.Thread(target=loop.run_forever, daemon=True).start()

    cg_dir, procs, peak, oom = cgroup(LIMIT_MIB * 1024 * 1024)
    relay = subprocess.Popen(
        ["sh", "-c", f'echo $$ > {procs} && exec "$0" --config "$1"', RELAY, work],
        stderr=open(os.path.join(work, "relay.log"), "w"),
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", 2525), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    idle = vm(relay.pid, "VmRSS:")
    data = message()
    results = [None] * CLIENTS
    threads = [threading.Thread(target=send, args=(data, results, i)) for i in range(CLIENTS)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = sum(1 for r in results if r == 250)
    deadline = time.time() + 600
    while sink.delivered < accepted and time.time() < deadline and relay.poll() is None:
        time.sleep(0.5)
    alive = relay.poll() is None
    hwm = vm(relay.pid, "VmHWM:") if alive else -1
    print(f"clients={CLIENTS} size={SIZE_MIB}MiB cgroup_limit={LIMIT_MIB}MiB")
    print(f"relay idle RSS {idle / 1024:.1f} MiB, peak RSS (VmHWM) {hwm / 1024:.1f} MiB, "
          f"cgroup peak {peak() / 1048576:.1f} MiB (page cache included), oom kills {oom()}")
    print(f"accepted {accepted}/{CLIENTS}, delivered {sink.delivered}, "
          f"{time.time() - started:.1f} s, relay alive: {alive}")
    refused = [r for r in results if r != 250]
    if refused:
        print("refused:", refused[:3])
    relay.terminate()
    relay.wait()
    server.close()
    os.rmdir(cg_dir)
    shutil.rmtree(work)
    ok = alive and accepted == CLIENTS and sink.delivered == accepted
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
