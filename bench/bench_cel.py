#!/usr/bin/env python3
"""Recovering calls from CEL: rows/s and memory, from sqlite and through the mysql client.

Builds a CEL table of N calls (default 100,000, about 2 million rows) by replicating
the real rows of the fixtures with new ids, uniqueids and linkedids, then runs one
CelRecovery pass over it (rebuild every call with the live rules; nothing is sent)
and prints rows/s and peak RSS. The MariaDB part runs when the server binaries are
installed (a private server in a temp dir, as the tests do).

Usage: python3 bench/bench_cel.py [--calls 100000] [--repeat 3] [--skip-mysql]
"""
import argparse
import glob
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import bx24ast  # noqa: E402

COLS = ("eventtype, eventtime, cid_name, cid_num, cid_ani, cid_rdnis, cid_dnid, exten, context, channame, "
        "appname, appdata, amaflags, accountcode, uniqueid, linkedid, peer, userdeftype, extra")


def template_calls():
    """Each fixture call's rows (pjsip set), as lists of tuples without the id."""
    calls = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "asterisk-22.10.1-pjsip", "*",
                                              "cel.sqlite3"))):
        db = sqlite3.connect(path)
        groups = {}
        for row in db.execute("SELECT %s FROM cel ORDER BY AcctId" % COLS):
            groups.setdefault(row[15], []).append(row)
        calls.extend(groups.values())
    return calls


def generate(n_calls):
    """Yield CEL rows (without id) for n_calls calls, new uniqueids per copy."""
    calls = template_calls()
    for i in range(n_calls):
        rows = calls[i % len(calls)]
        shift = 10 ** 6 * (i + 1)
        for row in rows:
            row = list(row)
            for col in (14, 15):
                head, _, tail = row[col].partition(".")
                row[col] = "%d.%s" % (int(head) + shift, tail)
            yield row


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_speed():
    """Seconds for a fixed pure-Python loop: this shared machine's speed swings ~2x
    from one minute to the next, so numbers are read against it."""
    t0 = time.perf_counter()
    x = 0
    for i in range(3000000):
        x += i
    return time.perf_counter() - t0


def sqlite_floor(path):
    """Only reading the rows: the same SELECT, nothing done with them."""
    def floor():
        db = sqlite3.connect(path)
        for _row in db.execute("SELECT AcctId, %s FROM cel ORDER BY AcctId" % COLS):
            pass
        db.close()
    return floor


def mysql_floor(server):
    """Only reading the rows: the mysql client's batch output, split into lines and fields."""
    def floor():
        proc = subprocess.Popen([server.client, "--no-defaults", "--batch", "--raw", "--skip-column-names",
                                 "--user=root", "--socket=" + server.socket, "--database=asteriskcdrdb",
                                 "--execute=SELECT id, %s FROM cel ORDER BY id" % COLS], stdout=subprocess.PIPE)
        for line in proc.stdout:
            line.rstrip(b"\n").split(b"\t")
        proc.wait()
    return floor


def run_recovery(source, label, rows_total, repeat, floor):
    rss_before = peak_mb()
    times, ratios = [], []
    for _ in range(repeat):
        store = bx24ast.StateStore(":memory:")
        recovery = bx24ast.CelRecovery(source, store, bx24ast.PbxRules.defaults())
        calibration = machine_speed()
        t0 = time.perf_counter()
        floor()
        floor_dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = recovery.run_once(dry_run=False, report=lambda call: None)
        dt = time.perf_counter() - t0
        times.append((dt, calibration, floor_dt))
        ratios.append(dt / floor_dt)
    # Where the time goes: the same pass with the call engine's event handling made a
    # no-op (rows read, grouped and turned into events, no call followed).
    store = bx24ast.StateStore(":memory:")
    recovery = bx24ast.CelRecovery(source, store, bx24ast.PbxRules.defaults())
    handle = bx24ast.CallTracker.handle
    bx24ast.CallTracker.handle = lambda self, msg: None
    try:
        t0 = time.perf_counter()
        recovery.run_once(dry_run=False, report=lambda call: None)
        untracked = time.perf_counter() - t0
    finally:
        bx24ast.CallTracker.handle = handle
    times.sort()
    ratios.sort()
    best, median = times[0], times[len(times) // 2]
    print("%-7s: %d rows, %d calls rebuilt; best %.1f s = %.0f rows/s, median %.0f rows/s over %d runs; "
          "peak RSS %.0f MB (was %.0f MB before)"
          % (label, rows_total, found, best[0], rows_total / best[0], rows_total / median[0], repeat,
             peak_mb(), rss_before))
    print("         floor (only reading the rows): %.0f rows/s in the best run; recovery / floor best %.1fx, "
          "median %.1fx (target <= 2x)" % (rows_total / best[2], ratios[0], ratios[len(ratios) // 2]))
    print("         without following the calls (read, group, rows -> events): %.1fx the floor; following them "
          "(CallTracker, as live) is the rest: %.1f s of the best run's %.1f s" % (untracked / best[2], best[0] - untracked,
                                                                                best[0]))
    print("         machine: a 3M-step Python loop took %.2f s before the best run (smaller = faster machine)"
          % best[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100000)
    ap.add_argument("--skip-mysql", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per back-end; best and median are printed")
    args = ap.parse_args()
    print("Python %s" % sys.version.split()[0])
    tmp = tempfile.mkdtemp(prefix="bench-cel-")
    path = os.path.join(tmp, "master.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE cel (AcctId INTEGER PRIMARY KEY, %s)" % COLS)
    db.executemany("INSERT INTO cel (%s) VALUES (%s)" % (COLS, ",".join("?" * 19)), generate(args.calls))
    db.commit()
    total = db.execute("SELECT COUNT(*) FROM cel").fetchone()[0]
    db.close()
    run_recovery(bx24ast.SqliteCel(path), "sqlite", total, args.repeat, sqlite_floor(path))
    if args.skip_mysql:
        return
    from mariadb import MariaDB, binaries, FREEPBX_CEL_SCHEMA
    if not all(binaries()):
        print("mysql  : skipped (MariaDB not installed)")
        return
    server = MariaDB().start()
    try:
        server.sql("CREATE DATABASE asteriskcdrdb")
        server.sql(FREEPBX_CEL_SCHEMA % "cel", "asteriskcdrdb")
        tsv = os.path.join(tmp, "cel.tsv")
        with open(tsv, "w", encoding="utf-8") as f:
            for row in sqlite3.connect(path).execute("SELECT %s FROM cel ORDER BY AcctId" % COLS):
                f.write("\t".join(str(v).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
                                  for v in row) + "\n")
        server.sql("SET GLOBAL local_infile = 1")
        subprocess.check_call([server.client, "--no-defaults", "--local-infile=1", "--user=root",
                               "--socket=" + server.socket, "--database=asteriskcdrdb", "--execute=LOAD DATA LOCAL "
                               "INFILE '%s' INTO TABLE cel (%s)" % (tsv, COLS)])
        source = bx24ast.MysqlCel("asteriskcdrdb", "cel", user="root", socket_path=server.socket)
        run_recovery(source, "mysql", total, args.repeat, mysql_floor(server))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
