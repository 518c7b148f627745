#!/usr/bin/env python3
"""Responsible routing over FastAGI: lookups per second and latency.

A FastAgiServer with its ResponsibleLookup runs against the test Bitrix24
emulator (and a fake AMI server answering ExtensionState); clients speak AGI
over real sockets as Asterisk does (environment block, then SET VARIABLE
answered with 200 result=1), one session per lookup.

- warm: every number was looked up before, so the answer comes from the cache
  (plus the ExtensionState round trip to AMI);
- cold: every number is new, so each session waits for searchCrmEntities.

Usage: python3 bench/bench_agi.py [--sessions 3000] [--clients 8] [--numbers 200]
"""
import argparse
import multiprocessing
import os
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import bx24ast  # noqa: E402
from b24_emulator import Bitrix24Emulator  # noqa: E402
from fake_ami import FakeAmiServer  # noqa: E402


def env(number):
    return ("agi_network: yes\nagi_network_script: responsible\nagi_request: agi://127.0.0.1/responsible\n"
            "agi_channel: PJSIP/trunk-00000001\nagi_callerid: %s\nagi_context: from-trunk\n"
            "agi_extension: s\nagi_priority: 1\n\n" % number).encode()


def session(port, number):
    started = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(env(number))
    f = sock.makefile("rb")
    ext = None
    while True:
        line = f.readline()
        if not line:
            break
        if line.startswith(b"SET VARIABLE BX24_RESPONSIBLE_EXT"):
            ext = line.split(b'"')[1].decode()
        sock.sendall(b"200 result=1\n")
    f.close()
    sock.close()
    return time.perf_counter() - started, ext


def _client(port, numbers, indexes, out):
    latencies, hits = [], 0
    for i in indexes:
        dt, ext = session(port, numbers[i % len(numbers)])
        latencies.append(dt)
        hits += 1 if ext else 0
    out.put((latencies, hits))


def run(port, numbers, sessions, clients):
    """clients processes (as Asterisk channels would be: not sharing our GIL), each
    running its share of sessions one after another."""
    out = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_client, args=(port, numbers, range(k, sessions, clients), out))
             for k in range(clients)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    latencies, found = [], 0
    for _ in procs:
        part, hits = out.get()
        latencies.extend(part)
        found += hits
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000
    return len(latencies) / wall, pct(0.5), pct(0.99), found


def _fake_asterisk(ports, stop):
    """The fake AMI server in its own process: Asterisk answers ExtensionState in C,
    not in our interpreter."""
    with FakeAmiServer(extension_states={"101": "0", "102": "0", "103": "0"}) as server:
        ports.put(server.port)
        stop.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=4, help="concurrent AGI sessions (Asterisk channels), "
                    "each a process")
    ap.add_argument("--numbers", type=int, default=200, help="distinct clients in the CRM")
    args = ap.parse_args()
    bx24ast.log.setLevel("WARNING")
    print("Python %s" % sys.version.split()[0])
    # A portal with generous limits: the cold run measures the lookup, not the bucket.
    ports, stop = multiprocessing.Queue(), multiprocessing.Event()
    asterisk = multiprocessing.Process(target=_fake_asterisk, args=(ports, stop))
    asterisk.start()
    ami_port = ports.get(timeout=10)
    with Bitrix24Emulator(rate=1000, burst=100000) as emu:
        numbers = []
        for i in range(args.numbers):
            numbers.append("8916%07d" % i)
            emu.add_contact("+7916%07d" % i, "Client %d" % i, assigned=(5, 7, 9)[i % 3])
        client = bx24ast.BitrixClient(webhook_url=emu.webhook_url, rate=1000, burst=100000)
        users = bx24ast.UserDirectory(client)
        users.refresh()
        ami = bx24ast.AmiConnection("127.0.0.1", ami_port, "bx24", "s3cret", lambda m: None)
        ami.start()
        ami.connected.wait(5)
        lookup = bx24ast.ResponsibleLookup(client, users, bx24ast.PbxRules.defaults(), ami, budget=0.5)
        server = bx24ast.FastAgiServer(lookup, "127.0.0.1", 0)
        server.start()
        try:
            port = server.address[1]
            rate, p50, p99, hits = run(port, numbers, len(numbers), args.clients)
            print("cold: %5d lookups (each a searchCrmEntities): %7.0f lookups/s, p50 %6.2f ms, p99 %6.2f ms, "
                  "%d routed (budget 500 ms)" % (len(numbers), rate, p50, p99, hits))
            rate, p50, p99, hits = run(port, numbers, args.sessions, args.clients)
            print("warm: %5d lookups (cache + ExtensionState):  %7.0f lookups/s, p50 %6.2f ms, p99 %6.2f ms, "
                  "%d routed" % (args.sessions, rate, p50, p99, hits))
            lookup.check_state = False
            rate, p50, p99, hits = run(port, numbers, args.sessions, args.clients)
            print("warm: %5d lookups (cache only):              %7.0f lookups/s, p50 %6.2f ms, p99 %6.2f ms, "
                  "%d routed" % (args.sessions, rate, p50, p99, hits))
        finally:
            server.stop()
            ami.stop()
            stop.set()
            asterisk.join(10)


if __name__ == "__main__":
    main()
