"""CEL: calls rebuilt from real Asterisk CEL rows, recovery with a checkpoint,
detection of the CEL store on fake /etc trees, health."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

import bx24ast
from b24_emulator import Bitrix24Emulator
from conftest import FIXTURES, ROOT, load_expected, scenario_dirs, scenario_id
from test_calls import expected_row, replay
from test_crm import Harness, check_scenario

PJSIP = os.path.join(FIXTURES, "asterisk-22.10.1-pjsip")
SCRIPT = os.path.join(ROOT, "bx24ast.py")


def cel_rows(path):
    return list(bx24ast.SqliteCel(os.path.join(path, "cel.sqlite3")).rows())


@pytest.mark.parametrize("path", scenario_dirs(), ids=scenario_id)
def test_every_call_rebuilt_from_cel_alone(path):
    rules = bx24ast.PbxRules.defaults()
    recordings = bx24ast.RecordingFiles(os.path.join(path, "recordings"))
    rows = cel_rows(path)
    calls = dict((c.linkedid, c) for c in bx24ast.rebuild_calls(rows, rules))
    # An originate the phone never answered ran no dialplan: the number it was for is
    # only in the AMI OriginateResponse, CEL never holds it (nothing to report).
    expected = [c for c in load_expected(path)["calls"]
                if not (c.get("click_to_call") and not c["answered_by"])]
    assert sorted(calls) == sorted(c["linkedid"] for c in expected)
    live = dict((c["linkedid"], c) for c in replay(path))
    for call in expected:
        rebuilt = calls[call["linkedid"]]
        rebuilt.recording = recordings.find_for_call(list(rebuilt.channels), rebuilt.started_at)
        row = rebuilt.as_dict(rules.number_plan)
        for key, value in expected_row(call, rules.number_plan).items():
            if key == "billsec":
                assert abs(row["billsec"] - (value or 0)) <= 1, (call["linkedid"], row["billsec"], value)
            else:
                assert row[key] == value, (call["linkedid"], key, row[key], value)
        # the same call as the live engine saw it (CEL has 1-second times)
        assert abs(rebuilt.started_at - bx24ast.parse_iso_time(live[call["linkedid"]]["started_at"])) < 1.5


def _combined_cel(tmp_path, names):
    """One CEL database holding the rows of several scenarios, as on a real PBX."""
    dst = str(tmp_path / "master.db")
    con = sqlite3.connect(dst)
    schema = sqlite3.connect(os.path.join(PJSIP, names[0], "cel.sqlite3")).execute(
        "SELECT sql FROM sqlite_master WHERE name = 'cel'").fetchone()[0]
    con.execute(schema)
    for name in names:
        src = sqlite3.connect(os.path.join(PJSIP, name, "cel.sqlite3"))
        rows = src.execute("SELECT * FROM cel ORDER BY AcctId").fetchall()
        con.executemany("INSERT INTO cel VALUES (%s)" % ",".join("?" * len(rows[0])), rows)
    con.commit()
    con.close()
    return dst


def _recordings_dir(tmp_path, names):
    d = tmp_path / "monitor"
    d.mkdir(exist_ok=True)
    for name in names:
        rec = os.path.join(PJSIP, name, "recordings")
        for f in os.listdir(rec):
            shutil.copy(os.path.join(rec, f), str(d / f))
    return str(d)


NAMES = ["inbound_answered", "inbound_missed", "outbound_answered", "inbound_queue", "blind_transfer",
         "internal_call", "concurrent_burst", "click2call_originate"]


def test_recovery_reports_exactly_the_calls_missed_while_down(tmp_path):
    db = _combined_cel(tmp_path, NAMES[:7])
    recs = _recordings_dir(tmp_path, NAMES[:7])
    live, down = ["inbound_answered", "blind_transfer", "concurrent_burst"], \
        ["inbound_missed", "outbound_answered", "inbound_queue"]
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, {"cel": {"backend": "off"}, "crm": {"callback_window_minutes": 0}},
                     recordings=recs) as h:
            for name in live:
                h.replay(os.path.join(PJSIP, name))
            h.wait_idle()
            assert len(emu.stats) == 22
            recovery = bx24ast.CelRecovery(bx24ast.SqliteCel(db), h.bridge.store, h.rules, h.bridge.crm,
                                           h.bridge.recordings)
            found = recovery.run_once()
            h.wait_idle()
            assert found == 25  # every external call in CEL; live ones are recognised
            for name in live + down:
                check_scenario(h, emu, os.path.join(PJSIP, name))
            assert len(emu.stats) == 25
            # late calls carry their real start time and no card popped up
            for name in down:
                for call in load_expected(os.path.join(PJSIP, name))["calls"]:
                    reg = [e for e in emu.journal if e["method"] == "telephony.externalcall.register"
                           and e["params"]["EXTERNAL_CALL_ID"] == call["linkedid"]][0]
                    assert str(reg["params"]["SHOW"]) == "0"
                    assert reg["params"]["CALL_START_DATE"].startswith(call["cdr_legs"][0]["start"].replace(" ", "T"))
            checkpoint = recovery.checkpoint()
            assert checkpoint == max(r.id for r in bx24ast.SqliteCel(db).rows())
            # a second pass finds nothing new; a lost checkpoint duplicates nothing either
            assert recovery.run_once() == 0
            h.bridge.store.set_setting(recovery.checkpoint_key, 0)
            recovery.run_once()
            h.wait_idle()
            assert len(emu.stats) == 25 and not emu.active_calls
            registers = [e for e in emu.journal if e["method"] == "telephony.externalcall.register"]
            assert len(registers) == 25


def test_calls_in_progress_wait_for_the_next_pass(tmp_path):
    db = _combined_cel(tmp_path, ["inbound_answered", "outbound_answered"])
    con = sqlite3.connect(db)
    rows = con.execute("SELECT AcctId, eventtype, linkedid FROM cel ORDER BY AcctId").fetchall()
    cut = [r[0] for r in rows if r[2] == "1795667032.8"][5]  # the outbound call is half written
    held = con.execute("SELECT * FROM cel WHERE AcctId > ?", (cut,)).fetchall()
    con.execute("DELETE FROM cel WHERE AcctId > ?", (cut,))
    con.commit()
    store = bx24ast.StateStore(str(tmp_path / "state.db"))
    reported = []

    class Crm(object):
        def report_finished(self, call):
            reported.append(call.linkedid)
            return True
    recovery = bx24ast.CelRecovery(bx24ast.SqliteCel(db), store, bx24ast.PbxRules.defaults(), Crm())
    recovery.run_once()
    assert reported == ["1795667003.0"]
    first_of_open = [r[0] for r in rows if r[2] == "1795667032.8"][0]
    assert recovery.checkpoint() == first_of_open - 1
    con.executemany("INSERT INTO cel VALUES (%s)" % ",".join("?" * len(held[0])), held)
    con.commit()
    recovery.run_once()
    assert reported == ["1795667003.0", "1795667032.8"]


def test_the_tail_of_a_call_read_before_is_not_a_call_again(tmp_path):
    """Two calls overlapping: the first closes while the second is open, so the
    checkpoint stays before the second's first row and the first's last rows are read
    again. Those are no call of their own (it was rebuilt whole the first time)."""
    first = [r[1:] for r in sqlite3.connect(os.path.join(PJSIP, "inbound_answered", "cel.sqlite3")).execute(
        "SELECT * FROM cel ORDER BY AcctId")]
    second = [r[1:] for r in sqlite3.connect(os.path.join(PJSIP, "outbound_answered", "cel.sqlite3")).execute(
        "SELECT * FROM cel ORDER BY AcctId")]
    db = _combined_cel(tmp_path, ["inbound_answered"])
    con = sqlite3.connect(db)
    con.execute("DELETE FROM cel")
    cols = [r[1] for r in con.execute("PRAGMA table_info(cel)")][1:]

    def write(rows):
        con.executemany("INSERT INTO cel (%s) VALUES (%s)" % (",".join(cols), ",".join("?" * len(cols))), rows)
        con.commit()
    write(first[:5] + second[:3] + first[5:])
    reported = []

    class Crm(object):
        def report_finished(self, call):
            reported.append((call.linkedid, call.disposition))
            return "late"
    recovery = bx24ast.CelRecovery(bx24ast.SqliteCel(db), bx24ast.StateStore(":memory:"),
                                   bx24ast.PbxRules.defaults(), Crm())
    recovery.run_once()
    assert reported == [("1795667003.0", "ANSWERED")] and recovery.checkpoint() == 5
    write(second[3:])
    recovery.run_once()
    assert reported == [("1795667003.0", "ANSWERED"), ("1795667032.8", "ANSWERED")]


def test_without_state_cel_is_read_from_the_last_hours(tmp_path):
    """A new or lost state database: the calls of the last N hours come back from CEL
    (a deleted database must not skip the calls made while bx24ast was stopped)."""
    db = _combined_cel(tmp_path, ["inbound_answered"])
    source = bx24ast.SqliteCel(db)
    call_time = bx24ast.cel_time("2026-11-26 04:23:23")

    def passes(hours, now):
        recovery = bx24ast.CelRecovery(source, bx24ast.StateStore(":memory:"), bx24ast.PbxRules.defaults())
        recovery.start_from_now(hours, now)
        return recovery.run_once()
    assert passes(0, call_time + 3600) == 0                # 0: history is not read
    assert passes(24, call_time + 3600) == 1
    assert passes(24, call_time + 2 * 86400) == 0          # older than 24 h
    assert source.first_since(call_time - 10) == 2172 and source.first_since(call_time + 86400) is None


def test_sqlite_cel_is_opened_read_only_and_errors_are_clear(tmp_path):
    db = _combined_cel(tmp_path, ["inbound_answered"])
    source = bx24ast.SqliteCel(db)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # Asterisk writing
    try:
        used = sqlite3.connect(db).execute("SELECT COUNT(*) FROM cel WHERE eventtype IN (%s)" % ",".join(
            "'%s'" % e for e in bx24ast.CEL_USED_EVENTS)).fetchone()[0]
        assert len(list(source.rows())) == used == 13  # CHAN_END rows are left in the database
    finally:
        lock.execute("ROLLBACK")
    with pytest.raises(bx24ast.CelError) as err:
        list(bx24ast.SqliteCel(str(tmp_path / "none.db")).rows())
    assert "does not exist" in str(err.value)
    with pytest.raises(bx24ast.CelError) as err:
        list(bx24ast.SqliteCel(db, table="cel2").rows())
    assert "no table 'cel2'" in str(err.value)


def test_health_warns_when_no_event_in_the_last_hour(tmp_path):
    db = _combined_cel(tmp_path, ["inbound_answered"])
    source = bx24ast.SqliteCel(db)
    _, newest = source.newest()
    assert bx24ast.cel_health(source, now=newest + 60)[0][0] == "OK"
    level, message = bx24ast.cel_health(source, now=newest + 7200)[0]
    assert level == "WARNING" and "last 1 hour" in message
    assert bx24ast.cel_health(bx24ast.SqliteCel(str(tmp_path / "x.db")))[0][0] == "CRITICAL"


# -- detection ---------------------------------------------------------------------------------

def _write(root, rel, text):
    path = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_detect_freepbx(tmp_path):
    _write(tmp_path, "etc/freepbx.conf", "<?php\n$amp_conf['AMPDBUSER'] = 'freepbxuser';\n"
                                         "$amp_conf['AMPDBPASS'] = 's3cretpass';\n$amp_conf['AMPDBHOST'] = 'localhost';\n")
    _write(tmp_path, "etc/amportal.conf", "CDRDBNAME=asteriskcdrdb\n")
    _write(tmp_path, "etc/asterisk/cel.conf", "[general]\nenable=yes\napps=all\nevents=ALL\n")
    found, warnings = bx24ast.detect_cel(str(tmp_path))
    assert found[0]["backend"] == "mysql" and found[0]["confidence"] == "high"
    assert found[0]["settings"]["mysql_user"] == "freepbxuser"
    assert found[0]["settings"]["mysql_password"] == "s3cretpass"
    assert found[0]["settings"]["mysql_database"] == "asteriskcdrdb" and not warnings
    out = subprocess.run([sys.executable, SCRIPT, "detect", "--root", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert "mysql via FreePBX" in out.stdout and "mysql_password=***" in out.stdout
    assert "s3cretpass" not in out.stdout + out.stderr


def test_detect_odbc(tmp_path):
    _write(tmp_path, "etc/asterisk/cel_odbc.conf", "[first]\nconnection=asteriskcdrdb\ntable=cel\n")
    _write(tmp_path, "etc/asterisk/res_odbc.conf", "[asteriskcdrdb]\nenabled=>yes\ndsn=>MySQL-asteriskcdrdb\n"
                                                   "username=>cdruser\npassword=>pw\n")
    _write(tmp_path, "etc/odbc.ini", "[MySQL-asteriskcdrdb]\nDriver=MySQL\nServer=db.local\nDatabase=asteriskcdrdb\n"
                                     "Port=3307\n")
    _write(tmp_path, "etc/asterisk/cel.conf", "[general]\nenable=yes\nevents=CHAN_START,HANGUP\n")
    found, warnings = bx24ast.detect_cel(str(tmp_path))
    assert found[0]["source"].startswith("cel_odbc.conf")
    assert found[0]["settings"]["mysql_host"] == "db.local" and found[0]["settings"]["mysql_port"] == "3307"
    assert found[0]["settings"]["mysql_user"] == "cdruser"
    assert any("ANSWER" in w and "LINKEDID_END" in w for w in warnings)


def test_detect_plain_asterisk_with_sqlite(tmp_path):
    _write(tmp_path, "etc/asterisk/cel_sqlite3_custom.conf", "[master]\ntable=cel\ncolumns=eventtype\n")
    _write(tmp_path, "etc/asterisk/asterisk.conf", "[directories]\nastlogdir => /var/log/asterisk\n")
    _write(tmp_path, "etc/asterisk/cel.conf", "[general]\nenable=no\n")
    os.makedirs(str(tmp_path / "var/log/asterisk"))
    shutil.copy(os.path.join(PJSIP, "inbound_answered", "cel.sqlite3"), str(tmp_path / "var/log/asterisk/master.db"))
    found, warnings = bx24ast.detect_cel(str(tmp_path))
    assert found[0]["backend"] == "sqlite" and found[0]["confidence"] == "high"
    assert found[0]["settings"]["sqlite_path"] == str(tmp_path / "var/log/asterisk/master.db")
    assert any("enable is not 'yes'" in w for w in warnings)
    out = subprocess.run([sys.executable, SCRIPT, "detect", "--root", str(tmp_path)],
                         stdout=subprocess.PIPE, universal_newlines=True)
    assert "WARNING: no CEL event written in the last 1 hour" in out.stdout


def test_detect_nothing(tmp_path):
    found, warnings = bx24ast.detect_cel(str(tmp_path))
    assert found == [] and any("CEL is not configured" in w for w in warnings)
    out = subprocess.run([sys.executable, SCRIPT, "detect", "--root", str(tmp_path)],
                         stdout=subprocess.PIPE, universal_newlines=True)
    assert out.returncode == 1 and "none found" in out.stdout


def test_recover_command_dry_run(tmp_path):
    db = _combined_cel(tmp_path, ["inbound_missed", "outbound_answered"])
    conf = tmp_path / "c.conf"
    conf.write_text("[cel]\nbackend = sqlite\nsqlite_path = %s\n[storage]\nstate_dir = %s\n" % (db, tmp_path))
    out = subprocess.run([sys.executable, SCRIPT, "-c", str(conf), "recover", "--since", "2026-01-01 00:00",
                          "--dry-run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(l) for l in out.stdout.splitlines()]
    assert [r["linkedid"] for r in rows] == ["1795667015.3", "1795667032.8"]
    assert rows[0]["disposition"] == "NO ANSWER" and rows[1]["direction"] == "outbound"
    assert "dry run" in out.stderr
    # seconds and ISO 8601: a time between the two calls keeps only the second
    env = dict(os.environ, TZ="UTC")
    for since in ("2026-11-26 04:23:47", "2026-11-26T04:23:47", "2026-11-26T07:23:47+03:00",
                  "2026-11-26T04:23:47.5Z"):
        out = subprocess.run([sys.executable, SCRIPT, "-c", str(conf), "recover", "--since", since, "--dry-run"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env)
        assert out.returncode == 0, (since, out.stderr)
        assert [json.loads(l)["linkedid"] for l in out.stdout.splitlines()] == ["1795667032.8"], since
    bad = subprocess.run([sys.executable, SCRIPT, "-c", str(conf), "recover", "--since", "yesterday"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert bad.returncode == 2 and "--since" in bad.stderr


# -- MySQL / MariaDB through the mysql command-line client ---------------------------------------

def _load_mariadb(db, names, table="cel"):
    from mariadb import FREEPBX_CEL_SCHEMA
    db.sql("CREATE DATABASE IF NOT EXISTS asteriskcdrdb")
    db.sql("DROP TABLE IF EXISTS `%s`" % table, "asteriskcdrdb")
    db.sql(FREEPBX_CEL_SCHEMA % table, "asteriskcdrdb")
    db.sql("CREATE USER IF NOT EXISTS 'celreader'@'127.0.0.1' IDENTIFIED BY 'pa$$ w#o\"rd';"
           "GRANT SELECT ON asteriskcdrdb.* TO 'celreader'@'127.0.0.1'")
    rows = []
    for name in names:
        src = sqlite3.connect(os.path.join(PJSIP, name, "cel.sqlite3"))
        rows.extend(src.execute("SELECT AcctId, eventtype, eventtime, cid_name, cid_num, cid_ani, cid_rdnis, "
                                "cid_dnid, exten, context, channame, appname, appdata, amaflags, accountcode, "
                                "uniqueid, linkedid, peer, userdeftype, extra FROM cel ORDER BY AcctId").fetchall())
    values = []
    for row in rows:
        values.append("(%s)" % ",".join("'%s'" % str(v if v is not None else "").replace("\\", "\\\\")
                                        .replace("'", "\\'") for v in row))
    for i in range(0, len(values), 200):
        db.sql("INSERT INTO `%s` VALUES %s" % (table, ",".join(values[i:i + 200])), "asteriskcdrdb")
    return len(rows)


def _mysql_source(db, **kw):
    args = dict(user="celreader", password='pa$$ w#o"rd', host="127.0.0.1", port=db.port)
    args.update(kw)
    return bx24ast.MysqlCel("asteriskcdrdb", kw.pop("table", "cel"), **{k: v for k, v in args.items()
                                                                          if k != "table"})


def test_mysql_back_end_gives_the_same_calls_as_sqlite(mariadb, tmp_path):
    _load_mariadb(mariadb, NAMES)
    source = _mysql_source(mariadb)
    rows = list(source.rows())
    lite_rows = []
    for name in NAMES:
        lite_rows.extend(cel_rows(os.path.join(PJSIP, name)))
    assert rows == lite_rows
    rules = bx24ast.PbxRules.defaults()
    from_mysql = dict((c.linkedid, c.as_dict(rules.number_plan)) for c in bx24ast.rebuild_calls(rows, rules))
    lite = []
    for name in NAMES:
        lite.extend(cel_rows(os.path.join(PJSIP, name)))
    from_sqlite = dict((c.linkedid, c.as_dict(rules.number_plan)) for c in bx24ast.rebuild_calls(lite, rules))
    assert from_mysql == from_sqlite and len(from_mysql) == 27
    newest_id, newest_time = source.newest()
    assert newest_id == rows[-1].id and newest_time == bx24ast.cel_time(rows[-1].eventtime)
    assert source.first_since(bx24ast.cel_time(rows[0].eventtime)) == rows[0].id
    assert source.first_since(newest_time + 1) is None
    # the password never appears on a command line
    assert "pa$$" not in " ".join(source.describe().split())


def test_mysql_values_with_tabs_quotes_newlines_and_nulls(mariadb):
    _load_mariadb(mariadb, ["inbound_answered"], table="cel_odd")
    mariadb.sql("ALTER TABLE cel_odd MODIFY cid_num varchar(80) NULL, MODIFY exten varchar(80) NULL",
                "asteriskcdrdb")
    mariadb.sql("INSERT INTO cel_odd (eventtype, eventtime, cid_name, cid_num, cid_ani, cid_rdnis, cid_dnid, exten, "
                "context, channame, appname, appdata, amaflags, accountcode, uniqueid, linkedid, peer, userdeftype, "
                "extra) VALUES ('CHAN_START', '2026-11-26 05:00:00', '', NULL, '', '', '', NULL, "
                "CONCAT('from-int', CHAR(10), 'ernal', CHAR(9), 'x'), "
                "'PJSIP/1\\t0\\\\1-\\'00ff', 'App', 'a\\nb', 3, '', '9.9', '9.9', '', '', "
                "'{\\\"x\\\": \\\"it''s \\\\\\\\ \\\\t\\\"}')", "asteriskcdrdb")
    rows = list(_mysql_source(mariadb, table="cel_odd").rows())
    odd = rows[-1]
    assert odd.cid_num == "" and odd.exten == ""  # NULL reads as empty, as the engine treats it
    assert odd.channame == "PJSIP/1\t0\\1-'00ff"
    assert odd.context == "from-int\nernal\tx"
    assert odd.extra == '{"x": "it\'s \\\\ \\t"}'
    assert len(rows) == 14 and rows[0].eventtype == "CHAN_START" and odd.uniqueid == odd.linkedid == "9.9"


def test_mysql_wrong_password_missing_table_missing_client(mariadb):
    _load_mariadb(mariadb, ["inbound_answered"])
    with pytest.raises(bx24ast.CelError) as err:
        list(_mysql_source(mariadb, password="wrong").rows())
    assert "refused [cel] mysql_user/mysql_password" in str(err.value) and "wrong" not in str(err.value)
    with pytest.raises(bx24ast.CelError) as err:
        list(_mysql_source(mariadb, table="nosuch").rows())
    assert "no table asteriskcdrdb.nosuch" in str(err.value)
    with pytest.raises(bx24ast.CelError) as err:
        list(_mysql_source(mariadb, client="/nonexistent/mysql").rows())
    assert "install mariadb-client" in str(err.value)


def test_mysql_server_stopped_mid_read_keeps_the_checkpoint(tmp_path):
    from mariadb import MariaDB, binaries
    if not all(binaries()):
        pytest.skip("MariaDB not installed")
    db = MariaDB().start()
    try:
        _load_mariadb(db, ["inbound_answered", "outbound_answered"])
        source = _mysql_source(db)
        store = bx24ast.StateStore(str(tmp_path / "s.db"))
        reported = []

        class Crm(object):
            def report_finished(self, call):
                reported.append(call.linkedid)
                if len(reported) == 1:
                    db.proc.kill()  # the server dies while the next rows are still to come
                    db.proc.wait()
                return True
        recovery = bx24ast.CelRecovery(source, store, bx24ast.PbxRules.defaults(), Crm())
        original_rows = source.rows
        source.rows = lambda after_id=0, since=None: original_rows(after_id, since, batch=5)
        with pytest.raises(bx24ast.CelError):
            recovery.run_once()
        assert reported == ["1795667003.0"] and recovery.checkpoint() is None
    finally:
        db.stop()


def test_each_pbx_recovers_its_own_cel_under_its_own_name(tmp_path):
    """[cel:branch]: the branch's calls are read from its CEL, with a checkpoint of their
    own, and stored under the branch's name (the same linkedids as the office's)."""
    db = _combined_cel(tmp_path, ["inbound_answered", "outbound_answered"])
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, {"cel": {"backend": "off"}, "crm": {"callback_window_minutes": 0}},
                     recordings=_recordings_dir(tmp_path, ["inbound_answered", "outbound_answered"])) as h:
            office = bx24ast.CelRecovery(bx24ast.SqliteCel(db), h.bridge.store, h.rules, h.bridge.crm)
            branch_crm, _cel = h.bridge.attach("branch", h.rules)
            branch = bx24ast.CelRecovery(bx24ast.SqliteCel(db), h.bridge.store, h.rules, branch_crm, pbx="branch")
            assert branch.run_once() == 2
            h.wait_idle()
            assert sorted(r["EXTERNAL_CALL_ID"] for r in emu.stats.values()) == [
                "branch:1795667003.0", "branch:1795667032.8"]
            assert office.checkpoint() is None and branch.checkpoint() == max(r.id for r in bx24ast.SqliteCel(db).rows())
            assert office.run_once() == 2 and branch.run_once() == 0
            h.wait_idle()
            assert len(emu.stats) == 4 and branch.recovered == {"late": 2} and office.recovered == {"late": 2}
            assert h.bridge.records.get("branch:1795667003.0")["call_id"] != h.bridge.records.get("1795667003.0")["call_id"]
