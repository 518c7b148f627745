#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""bx24ast: report every external call of an Asterisk PBX into Bitrix24.

One self-contained program for Python 3.6+ with the standard library only, so that
it runs on old PBX hosts (CentOS 7, FreePBX SNG7) without installing anything.

Sections, in the order data flows:

    Compatibility    shims and small helpers for Python 3.6
    Configuration    the INI file: schema, validation, ConfigError
    Storage          sqlite state: StateStore, Outbox (durable requests), CallRecords
    AMI              wire format (build_action, AmiParser), AmiStream, AmiConnection
    Calls            phone numbers, channel names, CallTracker (events -> calls)
    PBX discovery    PbxDiscovery: trunks and phones as Asterisk lists them
    Bitrix24         BitrixClient: webhook/OAuth, LeakyBucket, batch, error classes
    Hooks            Hooks: the admin's hooks.py, called at fixed points with plain dicts
    CRM flows        UserDirectory, CrmFlows (calls -> requests), OutboxSender
    CEL              SqliteCel, MysqlCel, cel_events (CEL rows -> AMI events),
                     CelRecovery, detect_cel, cel_health
    Routing          ResponsibleLookup, FastAgiServer, LookupHttpServer, ClickToCall,
                     EventListener (port mode), OfflineEventPoller (no-port mode)
    Web wizard       hash_password, the setup wizard at /config/master
    Captures         record-ami / replay: AMI byte streams with their timing sidecar
    Metrics          GET /metrics (Prometheus text): calls, card latency, outbox, REST, AMI, CEL, hooks
    Service          the daemon: threads, signals, SIGHUP reload, heartbeat, lock
    Checks           run_checks: daemon, AMI, Bitrix24, outbox, CEL (`check`, wizard)
    Command line     main()

Importing this module runs nothing.
"""

import argparse
import collections
import configparser
import _thread
import fcntl
import importlib
import itertools
import json
import os
import re
import signal
import sqlite3
import stat
import sys
import time


class _OnFirstUse(object):
    """A standard module imported at its first use. Each command needs a few of them:
    `check` from cron, every minute, should not pay for the wizard's or the daemon's."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        module = importlib.import_module(self._name)
        globals()[self._name] = module   # later uses go to the module itself
        return getattr(module, attr)


class LazyPattern(object):
    """re.compile(pattern) at the first match: the ~30 patterns of the module cost
    `check` from cron a few milliseconds it never needed. Its methods are then the
    compiled pattern's own, kept on the instance."""

    METHODS = ("match", "fullmatch", "search", "sub", "subn", "findall", "finditer", "split", "pattern", "groups")

    def __init__(self, pattern, flags=0):
        self._source = (pattern, flags)

    def __getattr__(self, name):
        compiled = re.compile(*self._source)
        for method in self.METHODS:
            setattr(self, method, getattr(compiled, method))
        return getattr(compiled, name)


base64 = _OnFirstUse("base64")
logging = _OnFirstUse("logging")   # with traceback, linecache, tokenize: ~9 ms that cron's check need not pay
socket = _OnFirstUse("socket")
threading = _OnFirstUse("threading")


class _Urllib(object):
    """urllib.parse, imported at the first urllib.parse.something."""

    def __getattr__(self, attr):
        import urllib.parse
        globals()["urllib"] = urllib
        return getattr(urllib, attr)


urllib = _Urllib()
binascii = _OnFirstUse("binascii")
calendar = _OnFirstUse("calendar")
hashlib = _OnFirstUse("hashlib")
hmac = _OnFirstUse("hmac")
html = _OnFirstUse("html")
select = _OnFirstUse("select")
shlex = _OnFirstUse("shlex")
subprocess = _OnFirstUse("subprocess")

__version__ = "0.1.0"


class _Logger(object):
    """bx24ast's logger, made at its first use; until main() has set the log up, that
    first use sets it up as main() would have (`check` logs nothing at all)."""

    level = None   # what main() asked for, used at the first log line

    def __getattr__(self, attr):
        logger = logging.getLogger("bx24ast")
        globals()["log"] = logger
        if _Logger.level is not None and not logging.getLogger().handlers:
            setup_logging(_Logger.level)
        return getattr(logger, attr)


log = _Logger()


###############################################################################
# Compatibility ###############################################################
###############################################################################

if sys.version_info < (3, 6):  # pragma: no cover - refuses to run at all
    sys.stderr.write("bx24ast needs Python 3.6 or newer\n")
    sys.exit(3)

monotonic = time.monotonic


class SteadyClock(object):
    """Wall-clock seconds that never jump: the wall time at an anchor plus the monotonic
    time since. AMI events are stamped with it, so an NTP step or a `date -s` in the
    middle of a call does not change its talk time; the anchor follows the wall clock
    again (resync) only while no call is being timed."""

    def __init__(self, wall=time.time, mono=monotonic):
        self.wall, self.mono = wall, mono
        self.resync()

    def now(self):
        return self.wall0 + (self.mono() - self.mono0)

    def drift(self):
        """How far the wall clock is from this one (a step shows up here)."""
        return self.wall() - self.now()

    def resync(self):
        self.wall0, self.mono0 = self.wall(), self.mono()


class ClockWatch(object):
    """Notices the system clock stepping, by comparing it to the monotonic clock."""

    def __init__(self, threshold=2.0, wall=None, mono=None):
        self.threshold = threshold
        self.wall, self.mono = wall or (lambda: time.time()), mono or monotonic
        self.offset = self.wall() - self.mono()

    def step(self):
        """Seconds the wall clock jumped since the last look (0.0 for none)."""
        offset = self.wall() - self.mono()
        delta = offset - self.offset
        self.offset = offset
        return delta if abs(delta) >= self.threshold else 0.0


STEADY = SteadyClock()

_ASCII_DIGITS = LazyPattern(r"[0-9]+\Z")


def is_digits(text):
    """ASCII digits only: str.isdigit() and int() also take '１' or '٣', which no PBX
    dials and no Bitrix24 id is made of."""
    return isinstance(text, str) and bool(_ASCII_DIGITS.match(text))


def iso_time(ts):
    """ISO 8601 in UTC with milliseconds, or None; Bitrix24 and humans both read it."""
    if ts is None:
        return None
    whole = int(ts)
    ms = int(round((ts - whole) * 1000))
    if ms == 1000:
        whole, ms = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + ".%03dZ" % ms


def _duration(seconds):
    """A span for people: 3m05s, 2h10m, 1d4h."""
    seconds = int(max(0, seconds))
    if seconds >= 86400:
        return "%dd%dh" % (seconds // 86400, seconds % 86400 // 3600)
    if seconds >= 3600:
        return "%dh%dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dm%ds" % (seconds // 60, seconds % 60)


class Said(str):
    """A message for people, in English, that remembers how it was made (its template
    and values) so that the wizard can say it in the admin's language; `check`, the
    log and Nagios print it as it is. Only the template is translated: the values
    (paths, numbers, what Asterisk or the portal answered) are shown as they are."""

    def __new__(cls, template, *args):
        self = str.__new__(cls, template % args if args else template)
        self.template = template
        self.args = args
        return self


def say(template, *args):
    return Said(template, *args)


def said_join(separator, parts):
    """Messages joined into one that stays translatable part by part."""
    parts = list(parts)
    return Said(separator.join(["%s"] * len(parts)), *parts)


def said_of(exc):
    """An exception's message as it was raised (a Said keeps its template)."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], Said) else str(exc)


class Span(float):
    """A length of time that reads as words (2 days 4 hours, 3 minutes 5 seconds),
    in the wizard in the admin's language, instead of '8576 minutes'."""

    UNITS = ((86400, "day", "days"), (3600, "hour", "hours"), (60, "minute", "minutes"), (1, "second", "seconds"))

    def parts(self):
        """[(count, unit index)]: the two largest units that are not zero."""
        left, out = int(max(0, round(self))), []
        for i, (size, _one, _many) in enumerate(self.UNITS):
            if left >= size or (size == 1 and not out):
                out.append((left // size, i))
                left %= size
            if len(out) == 2 or (out and left == 0):
                break
        return out

    def __str__(self):
        return " ".join("%d %s" % (n, self.UNITS[i][1] if n == 1 else self.UNITS[i][2]) for n, i in self.parts())

    __repr__ = __str__

    def __format__(self, spec):
        return str(self) if not spec else float.__format__(self, spec)


def parse_iso_time(text):
    """Seconds since the epoch from Asterisk's EventTV (2026-11-26T04:23:23.109+0000)."""
    m = re.match(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(\.\d+)?\s*(Z|[+-]\d\d:?\d\d)?$",
                 text.strip())
    if not m:
        raise ValueError("not an ISO 8601 time: %r" % text)
    fields = [int(x) for x in m.groups()[:6]]
    ts = calendar.timegm(tuple(fields) + (0, 0, 0))
    if m.group(7):
        ts += float(m.group(7))
    zone = m.group(8)
    if zone and zone != "Z":
        sign = -1 if zone[0] == "+" else 1
        digits = zone[1:].replace(":", "")
        ts += sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return ts


class BoundedCache(object):
    """A dict that forgets its oldest entries past size."""

    def __init__(self, size):
        self.size = size
        self._items = collections.OrderedDict()

    def get(self, key, default=None):
        return self._items.get(key, default)

    def __setitem__(self, key, value):
        self._items[key] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self):
        return len(self._items)


class Worker(object):
    """A loop in a thread of its own that stop() ends (CEL watcher, offline-event poller,
    PBX discovery); kick() wakes it early from a wait on self._wake."""

    thread_name = "worker"

    def __init__(self):
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()

    def kick(self):
        self._wake.set()

    def stop(self):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def run(self):
        raise NotImplementedError


###############################################################################
# Configuration ###############################################################
###############################################################################

DEFAULT_CONFIG_PATH = "/etc/bx24ast/bx24ast.conf"


class ConfigError(Exception):
    """A configuration value that bx24ast cannot use; names section, key and value."""

    def __init__(self, message, section=None, key=None, value=None):
        Exception.__init__(self, message)
        self.section = section
        self.key = key
        self.value = value


def _as_int(lo, hi):
    def convert(text):
        try:
            text = text.strip()
            if not is_digits(text.lstrip("-")):
                raise ValueError(text)
            value = int(text)
        except ValueError:
            raise ValueError(say("a whole number from %d to %d", lo, hi))
        if not lo <= value <= hi:
            raise ValueError(say("a whole number from %d to %d", lo, hi))
        return value
    return convert


def _as_float(lo, hi):
    def convert(text):
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(say("a number from %g to %g", lo, hi))
        if not lo <= value <= hi:
            raise ValueError(say("a number from %g to %g", lo, hi))
        return value
    return convert


_TRUE = {"1", "yes", "true", "on"}

# Every line separator of str.splitlines(), not only CR and LF.
_LINE_BREAKS = ("\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def has_line_break(text):
    return any(c in text for c in _LINE_BREAKS)


def is_regular_file(path):
    """A path given in a form or the config that bx24ast opens must be a plain file:
    a FIFO or a device (/dev/zero) would hang or flood the reader."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
_FALSE = {"0", "no", "false", "off"}


def _as_bool(text):
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(say("yes or no"))


def _as_str(text):
    return text.strip()


def _as_regex(text):
    """A regular expression matched against the whole value; empty means 'never'."""
    text = text.strip()
    if not text:
        return None
    try:
        return re.compile(r"(?:%s)\Z" % text)
    except re.error as exc:
        raise ValueError(say("a valid regular expression (%s)", exc))


def _as_pattern_text(text):
    """A regular expression kept as text, for callers that anchor it themselves."""
    text = text.strip()
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(say("a valid regular expression (%s)", exc))
    return text


def _as_choice(*choices):
    def convert(text):
        low = text.strip().lower()
        if low not in choices:
            raise ValueError(say("one of: %s", ", ".join(choices)))
        return low
    return convert


def _as_host(text):
    text = text.strip()
    if not text or not re.match(r"^[A-Za-z0-9.:\-\[\]_]+$", text):
        raise ValueError(say("a host name or IP address"))
    return text.strip("[]")


def _as_matching(pattern, expected, allow_empty=False, finish=None):
    """A converter that accepts text matching pattern (and, if allowed, nothing)."""
    compiled = LazyPattern(pattern)

    def convert(text):
        text = text.strip()
        if not text and allow_empty:
            return ""
        if not compiled.match(text):
            raise ValueError(expected if isinstance(expected, Said) else say(expected))
        return finish(text) if finish else text
    return convert


_as_webhook_url = _as_matching(
    r"^https?://[^/\s]+/rest/\d+/[^/\s]+/?$",
    "empty, or an inbound webhook URL like https://<portal>/rest/<user>/<token>/",
    allow_empty=True, finish=lambda t: t if t.endswith("/") else t + "/")
_as_url = _as_matching(r"^https?://[^/\s]+(/\S*)?$", "an http(s) URL")
_as_portal_url = _as_matching(r"^https?://[^/\s]+/?$",
                              "empty, or the portal address like https://<portal>.bitrix24.ru/",
                              allow_empty=True, finish=lambda t: t.rstrip("/") + "/")
_as_identifier_dash = _as_matching(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,79}$", "a dialplan context name (letters, digits, _ and -)")
_as_optional_url = _as_matching(r"^https?://[^/\s]+(/\S*)?$", "empty, or an http(s) URL", allow_empty=True)
_as_identifier = _as_matching(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", "a plain SQL name (letters, digits, _)")


def _as_template(text):
    text = text.strip()
    try:
        text.format(number="", did="", line="", time="", linkedid="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(say("text with only {number}, {did}, {line}, {time}, {linkedid} (%s)", exc))
    return text


def _as_listen(text):
    """host:port to listen on; empty turns the listener off."""
    text = text.strip()
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not is_digits(port) or not 0 <= int(port) < 65536 or not re.match(r"^[A-Za-z0-9.:\-_]*$", host):
        raise ValueError(say("empty, or address:port like 127.0.0.1:4573 or 0.0.0.0:8077"))
    return host or "0.0.0.0", int(port)


def _as_channel_template(text):
    text = text.strip()
    if "{extension}" not in text or not re.match(r"^[A-Za-z0-9/@_.\-{}]+$", text):
        raise ValueError(say("a channel with {extension}, like Local/{extension}@from-internal or PJSIP/{extension}"))
    try:
        text.format(extension="101")
    except (KeyError, IndexError, ValueError):
        raise ValueError(say("a channel with only {extension} in braces"))
    return text


def _as_dir(text):
    text = text.strip()
    if not text or "\0" in text:
        raise ValueError(say("a directory path"))
    return text


def _as_hours(text):
    text = text.strip()
    if not text:
        return None
    try:
        return WorkingHours.parse(text)
    except ValueError as exc:
        raise ValueError(say("working hours like mon-fri 09:00-18:00; sat 10:00-15:00 (%s)", str(exc)))


def _as_user_id(text):
    return _as_int(0, 2 ** 31)(text)


# (section, key, default, converter, documentation). bx24ast.conf.example is
# written from the same facts; tests check that the two agree.
CONFIG_SCHEMA = [
    ("ami", "host", "127.0.0.1", _as_host, "Asterisk Manager Interface address."),
    ("ami", "port", "5038", _as_int(1, 65535), "AMI TCP port (manager.conf [general] port)."),
    ("ami", "username", "", _as_str, "AMI user from manager.conf; needs read = system,call,agent,dialplan,reporting and write = system,call,originate,reporting (what the wizard's Create the user bx24 gives)."),
    ("ami", "secret", "", _as_str, "That user's secret."),
    ("ami", "auth", "plain", _as_choice("plain", "md5"), "plain sends the secret; md5 answers a Challenge instead."),
    ("ami", "connect_timeout", "5", _as_float(0.5, 120), "Seconds to wait for the TCP connection and the login answer."),
    ("ami", "ping_interval", "20", _as_float(1, 3600), "Seconds of silence after which a Ping checks that Asterisk is alive."),
    ("ami", "reconnect_max_delay", "30", _as_float(1, 3600), "Upper bound of the reconnect back-off, seconds."),
    ("ami", "max_message_bytes", "1048576", _as_int(4096, 64 * 1024 * 1024), "Larger AMI messages are logged and skipped."),
    ("bitrix24", "webhook_url", "", _as_webhook_url, "Inbound webhook, https://<portal>/rest/<user>/<token>/ (scopes telephony, crm, user, task)."),
    ("bitrix24", "verify_tls", "yes", _as_bool, "Check the portal's TLS certificate."),
    ("bitrix24", "timeout", "15", _as_float(1, 300), "Seconds before a REST request is abandoned and retried."),
    ("bitrix24", "unanswered_retry_seconds", "65", _as_float(0, 3600), "A register, finish, attachRecord or task that got no answer is sent again only after this long (the cloud portal finishes or drops a request within 60 s), so a slow portal never gets it twice."),
    ("bitrix24", "portal_url", "", _as_portal_url, "Local application: the portal, https://<portal>.bitrix24.ru/ (webhook_url empty)."),
    ("bitrix24", "client_id", "", _as_str, "Local application: client_id (application ID) from the local application form."),
    ("bitrix24", "client_secret", "", _as_str, "Local application: client_secret (application key)."),
    ("bitrix24", "oauth_url", "https://oauth.bitrix.info/oauth/token/", _as_url, "OAuth server that refreshes the application's tokens."),
    ("bitrix24", "rate", "2", _as_float(0.1, 100), "Requests per second the portal allows (2; 5 on Enterprise)."),
    ("bitrix24", "burst", "50", _as_int(1, 1000), "Leaky-bucket size of the portal (50; 250 on Enterprise)."),
    ("bitrix24", "users_refresh_minutes", "10", _as_float(0.1, 1440), "How often the extension -> user map is re-read with user.get."),
    ("crm", "create", "yes", _as_bool, "Unknown numbers create a lead (or contact and deal in a portal without leads): CRM_CREATE."),
    ("crm", "mode", "leads", _as_choice("leads", "contacts"), "leads, or contacts for a portal that runs CRM without leads."),
    ("crm", "default_user_id", "1", _as_int(0, 2 ** 31), "Bitrix24 user for calls no mapped extension handled (0: none)."),
    ("crm", "add_to_chat", "no", _as_bool, "Post each finished call into the employee's chat (ADD_TO_CHAT)."),
    ("crm", "show_card", "yes", _as_bool, "Pop up the call card for the employees whose phones ring."),
    ("crm", "missed_task", "yes", _as_bool, "Create a task for the responsible employee after a missed inbound call."),
    ("crm", "missed_task_title", "Missed call from {number}", _as_template, "Task title; {number}, {did}, {line}, {time}, {linkedid} are filled in."),
    ("crm", "missed_task_description", "Call back {number}: missed call to {line} at {time}.", _as_template, "Task description, same fields."),
    ("crm", "withheld_number", "0000000000", _as_matching(r"^[0-9#*+]{1,20}$", "digits (Bitrix24 keeps only 0-9 # * +)"),
     "Registered instead of a withheld caller ID (anonymous, empty, <unknown>); no lead is created for it."),
    ("crm", "withheld_label", "withheld number", _as_template, "What {number} says in a missed-call task when the caller withheld the number."),
    ("crm", "missed_task_deadline_minutes", "60", _as_int(1, 60 * 24 * 30), "Task deadline after the missed call."),
    ("crm", "callback_window_minutes", "5", _as_float(0, 24 * 60), "No task when the client gets through (either way) within this time."),
    ("recordings", "path", "/var/spool/asterisk/monitor", _as_dir, "Where MixMonitor writes (searched recursively by file name)."),
    ("recordings", "attach", "yes", _as_bool, "Upload call recordings to Bitrix24 (attachRecord)."),
    ("recordings", "settle_seconds", "3", _as_float(0, 600), "A recording is sent once it has not changed for this long."),
    ("recordings", "inline_max_mb", "8", _as_float(0.1, 1024), "Larger files go through the two-step upload URL instead of base64."),
    ("pbx", "inbound_contexts", "from-trunk.*|from-pstn.*|from-did.*|ext-did.*|from-external.*|incoming.*|inbound.*",
     _as_regex, "Regex: dialplan contexts in which calls from trunks start (the channel's first context)."),
    ("pbx", "internal_contexts", "from-internal.*|from-phones?.*|internal.*|ext-local|from-extensions?|default",
     _as_regex, "Regex: dialplan contexts in which calls placed by phones start."),
    ("pbx", "trunk_channels", "", _as_regex, "Regex: channel names of trunks (e.g. PJSIP/trunk-.*); such channels are never extensions."),
    ("pbx", "extension_pattern", "[0-9]{2,5}", _as_regex, "Regex: what an internal extension number looks like."),
    ("pbx", "external_min_length", "6", _as_int(3, 20), "A dialled number with at least this many digits is external."),
    ("pbx", "extension_variables", "AMPUSER", _as_str, "Comma list of channel variables that name the extension placing a call (FreePBX sets AMPUSER)."),
    ("pbx", "did_variables", "FROM_DID", _as_str, "Comma list of channel variables that hold the called line when the trunk leg's extension is 's'."),
    ("pbx", "recording_variables", "MIXMONITOR_FILENAME, CALLFILENAME", _as_str, "Comma list of variables naming the call recording, first found wins."),
    ("pbx", "recording_format", "wav", _as_choice("wav", "mp3", "gsm", "wav49", "ogg"), "Extension added when a recording variable has none (CALLFILENAME)."),
    ("pbx", "country_code", "7", _as_str, "Country calling code used to write numbers as +<country><number>."),
    ("pbx", "national_prefix", "8", _as_str, "Trunk prefix of national numbers (8 in Russia, 0 in most of Europe, 1 in NANP)."),
    ("pbx", "national_number_length", "10", _as_int(4, 15), "Digits of a national number without prefix and country code."),
    ("pbx", "international_prefix", "810|00", _as_pattern_text, "Regex: prefix dialled before a country code (810 and 00 in Russia)."),
    ("pbx", "ignore_numbers", "", _as_regex, "Regex: external numbers never reported (voicemail, feature codes, test lines)."),
    ("pbx", "discovery_minutes", "5", _as_float(0, 24 * 60), "How often Asterisk is asked which endpoints are trunks and phones (PJSIPShowEndpoints, SIPpeers, IAXpeerlist); 0 turns it off."),
    ("pbx", "mobile_dial_out", "outbound", _as_choice("outbound", "internal"), "A call from an employee's mobile ([users]) that the PBX puts "
                                                                                 "through to an outside number: outbound (that employee's call to the client) or internal (not reported)."),
    ("pbx", "call_max_hours", "12", _as_float(0.1, 24 * 30), "A call with no AMI event for this long is closed (its Hangup was lost)."),
    ("cel", "backend", "auto", _as_choice("auto", "sqlite", "mysql", "off"), "Where CEL is: auto (found as bx24ast.py detect does), sqlite, mysql, or off (no recovery)."),
    ("cel", "sqlite_path", "/var/log/asterisk/master.db", _as_dir, "cel_sqlite3_custom database."),
    ("cel", "table", "cel", _as_identifier, "CEL table name."),
    ("cel", "mysql_host", "localhost", _as_host, "MySQL/MariaDB host of the CEL table (FreePBX: asteriskcdrdb.cel)."),
    ("cel", "mysql_port", "3306", _as_int(1, 65535), "MySQL port."),
    ("cel", "mysql_socket", "", _as_str, "MySQL unix socket (instead of host/port when set)."),
    ("cel", "mysql_user", "", _as_str, "MySQL user with SELECT on the CEL table."),
    ("cel", "mysql_password", "", _as_str, "Its password (passed to the mysql client in a 0600 file, never on the command line)."),
    ("cel", "mysql_database", "asteriskcdrdb", _as_identifier, "Database holding the CEL table."),
    ("cel", "recover_interval_minutes", "5", _as_float(0.1, 24 * 60), "How often CEL is read for calls the live path missed."),
    ("cel", "recover_hours_without_state", "24", _as_float(0, 24 * 90), "With no state database (a new install, or it was lost), CEL is read from this many hours back; 0 starts at the newest row."),
    ("cel", "asterisk_etc", "/etc/asterisk", _as_dir, "Asterisk configuration directory (for detection)."),
    ("routing", "agi_listen", "127.0.0.1:4573", _as_listen, "FastAGI server for AGI(agi://127.0.0.1:4573/responsible); empty turns it off."),
    ("routing", "fallback", "", _as_matching(r"^[A-Za-z0-9_\-]+,[^,\s]{1,40},[A-Za-z0-9_]+$", "empty, or context,extension,priority like ext-group,600,1", allow_empty=True), "Where the wizard's routing dialplan sends a caller with no responsible: context,extension,priority of your usual route."),
    ("routing", "http_listen", "127.0.0.1:4574", _as_listen, "Local HTTP lookup GET /responsible?number=... (JSON) for CURL() dialplans; empty turns it off."),
    ("routing", "budget_ms", "500", _as_int(50, 10000), "Longest a caller waits for the lookup; a slower Bitrix24 answers empty (and fills the cache)."),
    ("routing", "cache_minutes", "10", _as_float(0, 24 * 60), "How long a found responsible is remembered (an unknown caller: at most 1 minute)."),
    ("routing", "check_extension_state", "yes", _as_bool, "Ask Asterisk (ExtensionState) and skip a responsible whose phone is unavailable."),
    ("routing", "hint_context", "from-internal", _as_identifier_dash, "Context where the extensions' hints are found (ExtensionState)."),
    ("routing", "set_callerid_name", "no", _as_bool, "Also put the client's CRM name into CALLERID(name)."),
    ("routing", "sticky_days", "0", _as_float(0, 3650), "When the CRM names no owner of the caller, route to the employee who last talked with "
                                                        "the number within this many days (0: off)."),
    ("routing", "hours", "", _as_hours, "Working hours (like mon-fri 09:00-18:00; sat 10:00-15:00) for lines without their own "
                                        "([line:DID] hours): outside them routing answers CLOSED; empty: always open."),
    ("click_to_call", "mode", "off", _as_choice("off", "port", "offline"), "port: Bitrix24 POSTs OnExternalCallStart to [click_to_call] listen; offline: poll the portal's offline events (no inbound port, local application with an admin's token)."),
    ("click_to_call", "listen", "0.0.0.0:8077", _as_listen, "Where port mode listens for Bitrix24's event POSTs."),
    ("click_to_call", "tls_cert", "", _as_str, "Certificate (PEM) for HTTPS in port mode; empty serves plain HTTP (put a TLS proxy in front)."),
    ("click_to_call", "tls_key", "", _as_str, "Private key (PEM) of tls_cert."),
    ("click_to_call", "application_token", "", _as_str, "auth[application_token] of the outbound webhook or application; events without it are refused (403)."),
    ("click_to_call", "public_url", "", _as_optional_url, "The handler URL Bitrix24 should POST to (bind-events in port mode), e.g. https://pbx.example.com:8077/bitrix24."),
    ("click_to_call", "phone_channel", "Local/{extension}@from-internal", _as_channel_template, "How the employee's phone is rung first: a channel with {extension}, e.g. Local/{extension}@from-internal or PJSIP/{extension}."),
    ("click_to_call", "outbound_context", "from-internal", _as_identifier_dash, "Context that dials the client once the employee answers (your outbound routes)."),
    ("click_to_call", "number_format", "national", _as_choice("national", "e164", "digits"), "How the client's number is dialled: national (8916..., 00<cc>... abroad), e164 (+7916...), digits (7916...)."),
    ("click_to_call", "international_dial_prefix", "00", _as_matching(r"^\d{0,4}$", "digits, like 00 or 810"), "Dialled before a foreign number in national format."),
    ("click_to_call", "ring_timeout", "30", _as_int(5, 300), "Seconds the employee's phone rings before the click is given up."),
    ("click_to_call", "user_interval_seconds", "10", _as_float(0, 3600), "A user's clicks closer together than this are refused (a stuck button must not dial ten times)."),
    ("click_to_call", "poll_interval", "2", _as_float(0.5, 300), "Offline mode: seconds between polls of event.offline.get (longer when the rate limit is tight)."),
    ("click_to_call", "callback_extension", "", _as_matching(r"^[0-9*#]{1,20}$", "empty, or the extension or ring group number to ring", allow_empty=True), "CRM callback form (OnExternalCallBackStart): ring this extension or group first, then the client; empty refuses callbacks."),
    ("wizard", "listen", "", _as_listen, "The setup wizard (https://<pbx>:8078/config/master); empty turns it off. The installer sets 0.0.0.0:8078 with a certificate, 127.0.0.1:8078 without."),
    ("wizard", "tls_cert", "", _as_str, "Certificate (PEM) of the wizard; empty serves plain HTTP (then listen on 127.0.0.1 and use an SSH tunnel)."),
    ("wizard", "tls_key", "", _as_str, "Private key (PEM) of the wizard's certificate."),
    ("wizard", "user", "admin", _as_matching(r"^[A-Za-z0-9_.@\-]{1,64}$", "a login of letters, digits, _ . @ -"), "Wizard login."),
    ("wizard", "password_hash", "", _as_str, "Salted PBKDF2 hash of the wizard password (bx24ast.py set-password writes it; the password itself is never stored)."),
    ("wizard", "language", "en", _as_choice("en", "ru"), "Language of the wizard (en, ru)."),
    ("wizard", "status_token", "", _as_str, "A token for GET /status (Authorization: Bearer <token>) from monitoring; empty: only the wizard login."),
    ("wizard", "pbx_root", "/", _as_str, "Where the PBX's files are for the wizard (/etc/asterisk, the CEL database, the AMI user it creates): / on a PBX; install.sh --root sets its tree."),
    ("hooks", "file", "", _as_str, "Your Python file of hook functions (standard library only), loaded at start and on SIGHUP: "
                                   "need_registration, process_client_phone, ... (hooks.example.py and the README); empty: none."),
    ("hooks", "timeout_ms", "500", _as_int(10, 60000), "The longest a hook may run; a slower one is logged and the call goes on as if it were absent."),
    ("metrics", "listen", "", _as_listen, "GET /metrics (Prometheus text) on its own port, loopback clients only, like 127.0.0.1:9178; "
                                          "empty: only on the wizard's listener, with the token."),
    ("metrics", "token", "", _as_str, "A token for GET /metrics on the wizard's listener (Authorization: Bearer <token>); empty: not served there."),
    ("storage", "state_dir", "/var/lib/bx24ast", _as_dir, "Directory for the state database (outbox, tokens, checkpoints)."),
    ("storage", "reserve_mb", "4", _as_float(0, 1024), "Space kept in a reserve file next to the state database: given back when the disk fills (check turns CRITICAL) so that no call is lost; 0 turns it off."),
    ("log", "level", "info", _as_choice("debug", "info", "warning", "error"), "Log verbosity."),
    ("log", "file", "", _as_str, "Log file (the service: /var/log/bx24ast/bx24ast.log), or syslog; empty logs to stderr."),
]


class Employee(collections.namedtuple("Employee", "user_id mobiles")):
    """An [users] entry: the Bitrix24 user behind an extension, and the employee's own
    mobile numbers (as written: the number plan makes them comparable later)."""

    def __str__(self):
        return ", ".join([str(self.user_id)] + list(self.mobiles))

    @staticmethod
    def user_id_of(entry):
        return entry.user_id if isinstance(entry, Employee) else int(entry)


def _users_entry(key, value):
    if not re.match(r"^[0-9A-Za-z*#+_\-]{1,20}$", key):
        raise ValueError("an extension (digits) as the key")
    parts = [p.strip() for p in value.split(",")]
    try:
        user_id = _as_int(1, 2 ** 31)(parts[0])
    except ValueError:
        raise ValueError("a Bitrix24 user ID, then the employee's mobile numbers if any (7, +79161234567)")
    mobiles = []
    for part in parts[1:]:
        number = clean_phone_number(part)
        if number is None or len(number.lstrip("+")) < 6:
            raise ValueError("a mobile number of 6 to 20 digits, not %r (7, +79161234567, 89031112233)" % part)
        mobiles.append(number)
    return Employee(user_id, tuple(mobiles))


def _number_rule_entry(key, value):
    """PATTERN => REPLACEMENT, the pattern matched against the whole number as the trunk
    wrote it (spaces, dashes and brackets dropped), the replacement with \\1 groups."""
    pattern, sep, replacement = value.partition("=>")
    pattern, replacement = pattern.strip(), replacement.strip()
    if not sep or not pattern or not replacement:
        raise ValueError("PATTERN => REPLACEMENT, like ^9(\\d{10})$ => \\1")
    if not re.match(r"^(?:[0-9+]|\\\d{1,2}|\\g<\w+>)+$", replacement):
        raise ValueError("a replacement of digits, + and groups (\\1, \\g<1>), not %r" % replacement)
    try:
        compiled = re.compile(pattern)
        compiled.sub(replacement, "")   # a group the pattern does not have is refused here
    except re.error as exc:
        raise ValueError("a valid pattern and replacement (%s)" % exc)
    return "%s => %s" % (pattern, replacement)


def _lines_entry(key, value):
    if not re.match(r"^\+?[0-9A-Za-z_\-]{1,50}$", key):
        raise ValueError("a line number (DID) as the key")
    value = value.strip()
    if not re.match(r"^[A-Za-z0-9_|:\-]{1,50}$", value):
        raise ValueError("a lead source STATUS_ID from crm.status.list (e.g. CALL, ADVERTISING, 1|2)")
    return value


# Sections that are maps: [users] extension = Bitrix24 user ID, [lines] DID = lead source,
# [numbers] name = rewrite rule (in the order written).
FREEFORM_SECTIONS = collections.OrderedDict([
    ("users", (_users_entry, "Extension = Bitrix24 user ID, then the employee's mobile numbers if any (101 = 7, +79161234567); "
                             "overrides the UF_PHONE_INNER map from user.get. A call forwarded to a mobile is that employee's call, "
                             "a call from it is the employee's.")),
    ("lines", (_lines_entry, "Called line (DID) = lead source STATUS_ID (crm.status.list ENTITY_ID=SOURCE).")),
    ("numbers", (_number_rule_entry, "Rewrite rules for client numbers, tried in order before the CRM search and the "
                                     "registration, the first that matches wins: name = PATTERN => REPLACEMENT, matched "
                                     "against the number without spaces, dashes and brackets; the result is then written "
                                     "as +<country><number> as usual.")),
])


# [line:<DID>]: what differs for calls to one line (the number the client dialled).
LINE_SCHEMA = [
    ("source", "", _as_matching(r"^[A-Za-z0-9_|:\-]{1,50}$", "empty, or a lead source STATUS_ID (CALL, ADVERTISING, 1|2)",
                                allow_empty=True), "Lead source (crm.status.list ENTITY_ID=SOURCE) of what calls to this line create; [lines] says the same."),
    ("responsible", "0", _as_user_id, "Bitrix24 user ID who answers for this line: routing sends a caller the CRM knows no owner of to them, "
                                      "and their missed calls and new leads go to them (0: the one whose phone rang, then [crm] default_user_id)."),
    ("create", "lead", _as_choice("lead", "deal", "none"), "What an unknown number creates: lead (as the portal does: a lead, or a contact and a deal "
                                                            "in a portal without leads), deal (a contact and a deal in deal_category at deal_stage), none."),
    ("deal_category", "0", _as_int(0, 2 ** 31), "create = deal: the pipeline (crm.dealcategory ID; 0 is the general one)."),
    ("deal_stage", "", _as_matching(r"^[A-Za-z0-9_:\-]{1,50}$", "empty, or a deal STAGE_ID like NEW or C2:NEW", allow_empty=True),
     "create = deal: the stage (STAGE_ID, e.g. C2:NEW); empty: the pipeline's first."),
    ("hours", "", _as_hours, "Working hours of the line (days and times, the PBX's clock): outside them routing answers CLOSED and "
                             "a missed-call task is due after the next opening; empty: [routing] hours."),
]

# Several PBXs in one daemon: [ami:NAME] (and [pbx:NAME], [cel:NAME]) describe one more
# PBX each. [pbx:NAME] keys left out are those of [pbx]; [cel:NAME] is off unless set.
PBX_SECTIONS = ("ami", "pbx", "cel")
_SECTION_NAME = LazyPattern(r"^[A-Za-z0-9_\-]{1,32}$")


class Config(object):
    """Validated settings: config.get('ami', 'port') -> 5038; a named section as
    config.get('ami:branch', 'host'); lines as config.line_settings()."""

    def __init__(self, values, path=None, maps=None, names=None, lines=None, pbx_lines=None):
        self._values = values
        self.path = path
        self.maps = maps or dict((name, collections.OrderedDict()) for name in FREEFORM_SECTIONS)
        self._names = names or {}
        self._lines = lines or collections.OrderedDict()      # (PBX or "", DID) -> (settings, keys written)
        self._pbx_lines = pbx_lines or {}                       # PBX -> its [lines:NAME]

    def get(self, section, key):
        return self._values[(section, key)]

    def section(self, section):
        return dict((k, v) for (s, k), v in self._values.items() if s == section)

    def names(self, kind):
        """The NAMEs of [kind:NAME] sections, in the file's order."""
        return list(self._names.get(kind, ()))

    def line_settings(self, pbx=""):
        """{DID: {source, responsible, create, deal_category, deal_stage, hours}} of one
        PBX's lines: [lines] (a source only) and [line:DID] sections, then for a named PBX
        its own [lines:NAME] and [line:NAME:DID] over them (those come last, so that a
        DID written another way still ends up with the PBX's own settings)."""
        out = collections.OrderedDict()
        layers = [("", self.maps.get("lines", {}))] + ([(pbx, self._pbx_lines.get(pbx, {}))] if pbx else [])
        for whose, sources in layers:
            for did, source in sources.items():
                settings = out.pop(did, None) or dict(
                    (key, convert(default)) for key, default, convert, _doc in LINE_SCHEMA)
                out[did] = dict(settings, source=source)
            for (owner, did), (settings, written) in self._lines.items():
                if owner != whose:
                    continue
                # a [line:NAME:DID] key left out is the [line:DID] one, as [pbx:NAME] is [pbx]'s
                merged = out.pop(did, None) or {}
                source = settings["source"] or merged.get("source") or ""
                merged.update((k, v) for k, v in settings.items() if k in written or k not in merged)
                merged["source"] = source
                out[did] = merged
        return out

    @classmethod
    def defaults(cls):
        return cls.from_text("")

    @staticmethod
    def _convert(path, section, key, raw, convert):
        try:
            return convert(raw)
        except ValueError as exc:
            raise ConfigError("%s: [%s] %s = %r is not allowed: expected %s"
                              % (path, section, key, raw, exc), section=section, key=key, value=raw)

    @classmethod
    def from_text(cls, text, path="<text>", overrides=None):
        parser = configparser.ConfigParser(interpolation=None, strict=True,
                                           inline_comment_prefixes=None)
        parser.optionxform = str.lower
        try:
            parser.read_string(text, source=path)
        except configparser.Error as exc:
            raise ConfigError("%s: cannot be read as an INI file: %s"
                              % (path, " ".join(str(exc).split())))
        known = collections.OrderedDict()
        for section, key, default, convert, _doc in CONFIG_SCHEMA:
            known.setdefault(section, collections.OrderedDict())[key] = (default, convert)
        known_line = collections.OrderedDict((key, (default, convert)) for key, default, convert, _d in LINE_SCHEMA)
        maps = dict((name, collections.OrderedDict()) for name in FREEFORM_SECTIONS)
        names = collections.OrderedDict((kind, []) for kind in PBX_SECTIONS)
        lines = collections.OrderedDict()
        pbx_lines = {}
        line_owners = []    # (section, PBX) of [lines:NAME] and [line:NAME:DID], checked once PBXs are known
        for section in parser.sections():
            kind, colon, name = section.partition(":")
            if section in FREEFORM_SECTIONS or (colon and kind == "lines"):
                if colon:
                    if not _SECTION_NAME.match(name):
                        raise ConfigError("%s: [%s]: a PBX's own lines are [lines:NAME], NAME as in [ami:NAME]"
                                          % (path, section), section=section)
                    line_owners.append((section, name))
                target = pbx_lines.setdefault(name, collections.OrderedDict()) if colon else maps[section]
                convert = FREEFORM_SECTIONS[kind][0]
                for key in parser.options(section):
                    raw = parser.get(section, key)
                    try:
                        target[key] = convert(key, raw)
                    except ValueError as exc:
                        raise ConfigError("%s: [%s] %s = %r is not allowed: expected %s"
                                          % (path, section, key, raw, exc),
                                          section=section, key=key, value=raw)
                continue
            if colon and kind == "line":
                owner, colon2, did = name.rpartition(":")
                if not re.match(r"^\+?[0-9A-Za-z_\-]{1,50}$", did) or (colon2 and not _SECTION_NAME.match(owner)):
                    raise ConfigError("%s: [%s]: a line section is [line:<the number clients dial>], like [line:74951234567], "
                                      "or [line:NAME:<number>] for the lines of the PBX [ami:NAME]"
                                      % (path, section), section=section)
                if owner:
                    line_owners.append((section, owner))
                schema = known_line
            elif colon and kind in PBX_SECTIONS:
                if not _SECTION_NAME.match(name):
                    raise ConfigError("%s: [%s]: a PBX is named with letters, digits, _ and - (up to 32), like [%s:branch]"
                                      % (path, section, kind), section=section)
                schema = known[kind]
                names[kind].append(name)
            elif section in known:
                schema = known[section]
            else:
                raise ConfigError("%s: unknown section [%s]; known sections: %s"
                                  % (path, section, ", ".join(["[%s]" % s for s in list(known) + list(FREEFORM_SECTIONS)]
                                                              + ["[ami:NAME]", "[pbx:NAME]", "[cel:NAME]", "[line:DID]",
                                                                 "[lines:NAME]", "[line:NAME:DID]"])),
                                  section=section)
            for key in parser.options(section):
                if key not in schema:
                    raise ConfigError("%s: unknown key '%s' in [%s]; known keys: %s"
                                      % (path, key, section, ", ".join(sorted(schema))),
                                      section=section, key=key)
        values = {}
        overrides = overrides or {}
        for section, key, default, convert, _doc in CONFIG_SCHEMA:
            raw = default
            if parser.has_option(section, key):
                raw = parser.get(section, key)
            raw = overrides.get((section, key), raw)
            values[(section, key)] = cls._convert(path, section, key, raw, convert)
        for name in names["ami"]:
            for kind in PBX_SECTIONS:   # every PBX has all three, written out or not
                section = "%s:%s" % (kind, name)
                for key, (default, convert) in known[kind].items():
                    if parser.has_option(section, key):
                        values[(section, key)] = cls._convert(path, section, key, parser.get(section, key), convert)
                    elif kind == "pbx":
                        values[(section, key)] = values[("pbx", key)]
                    elif kind == "cel" and key == "backend":
                        values[(section, key)] = "off"   # another host's CEL is never found by looking here
                    else:
                        values[(section, key)] = cls._convert(path, section, key, default, convert)
        for name in names["pbx"] + names["cel"]:
            if name not in names["ami"]:
                raise ConfigError("%s: [pbx:%s] or [cel:%s] has no [ami:%s]: name the PBX's AMI connection first"
                                  % (path, name, name, name), section="ami:" + name)
        for section, owner in line_owners:
            if owner not in names["ami"]:
                raise ConfigError("%s: [%s] names the PBX %s, which has no [ami:%s]"
                                  % (path, section, owner, owner), section=section)
        for section in parser.sections():
            kind, colon, name = section.partition(":")
            if colon and kind == "line":
                owner, _colon, did = name.rpartition(":")
                lines[(owner, did)] = (dict((key, cls._convert(path, section, key, parser.get(section, key)
                                                               if parser.has_option(section, key) else default, convert))
                                            for key, (default, convert) in known_line.items()),
                                       frozenset(parser.options(section)))
        return cls(values, path, maps, names, lines, pbx_lines)

    @classmethod
    def load(cls, path, overrides=None):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (IOError, OSError) as exc:
            raise ConfigError("%s: cannot read the configuration file: %s"
                              % (path, exc.strerror or exc))
        except UnicodeDecodeError:
            raise ConfigError("%s: the configuration file is not UTF-8 text" % path)
        return cls.from_text(text, path, overrides)

    def require(self, section, key, why):
        if not self.get(section, key):
            raise ConfigError("%s: [%s] %s is empty; %s" % (self.path, section, key, why),
                              section=section, key=key, value="")


def comma_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def _ini_value(value, section=None, key=None):
    text = str(value)
    if has_line_break(text):
        raise ConfigError("%sa configuration value cannot hold a line break: %r"
                          % ("[%s] %s: " % (section, key) if key else "", text[:40]),
                          section=section, key=key, value=text)
    return text


def update_config_file(path, updates=None, maps=None):
    """Set keys ({(section, key): value}) and replace whole map sections
    ({"lines": {did: source}}) in the file, keeping its comments and order. The
    result is validated first and written atomically (mode 0600): a bad value
    leaves the file as it was."""
    updates = updates or {}
    maps = maps or {}
    try:
        with open(path, encoding="utf-8") as f:
            # lines as configparser reads them (CR, LF, CRLF), not str.splitlines(),
            # which also breaks at U+2028 and friends
            lines = re.split(r"\r\n|\r|\n", f.read())
            if lines and lines[-1] == "":
                lines.pop()
    except FileNotFoundError:
        lines = []
    pending = collections.OrderedDict(((sec, key), _ini_value(v, sec, key)) for (sec, key), v in updates.items())
    out, section = [], None

    def flush(sec):
        # Keys of sec not found in the file go at the end of its section.
        for (s_, key), value in list(pending.items()):
            if s_ == sec:
                out.append("%s = %s" % (key, value) if value != "" else "%s =" % key)
                del pending[(s_, key)]
        if sec in maps:
            out.extend("%s = %s" % (_ini_value(k, sec, k), _ini_value(v, sec, k)) for k, v in maps[sec].items())

    for line in lines:
        m = re.match(r"^\s*\[([^\]]+)\]\s*$", line)
        if m:
            if section is not None:
                while out and not out[-1].strip():
                    out.pop()
                flush(section)
                out.append("")
            section = m.group(1).strip()
            out.append(line)
            continue
        if section in maps and re.match(r"^\s*[^#;\s][^=]*=", line):
            continue  # the map is written anew
        m = re.match(r"^(\s*)([A-Za-z0-9_]+)\s*=", line)
        if m and (section, m.group(2)) in pending:
            value = pending.pop((section, m.group(2)))
            out.append("%s = %s" % (m.group(2), value) if value != "" else "%s =" % m.group(2))
            continue
        out.append(line)
    if section is not None:
        while out and not out[-1].strip():
            out.pop()
        flush(section)
    for sec in list(dict.fromkeys([k[0] for k in pending] + [m for m in maps if m not in _sections_in(lines)])):
        out.extend(["", "[%s]" % sec])
        flush(sec)
    text = "\n".join(out).lstrip("\n") + "\n"
    Config.from_text(text, path)  # raises ConfigError naming the bad key; nothing is written
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, ".%s.tmp" % os.path.basename(path))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return text


def _sections_in(lines):
    return set(m.group(1).strip() for m in (re.match(r"^\s*\[([^\]]+)\]\s*$", l) for l in lines) if m)


def example_config_text():
    """The documented example configuration, every key with its default."""
    out = ["# bx24ast configuration. Every key is shown with its default value.",
           "# Lines starting with '#' are comments; a key left out takes its default.", ""]
    current = None
    for section, key, default, _convert, doc in CONFIG_SCHEMA:
        if section != current:
            if current is not None:
                out.append("")
            out.append("[%s]" % section)
            current = section
        out.append("# %s" % doc)
        out.append("%s = %s" % (key, default) if default else "%s =" % key)
    examples = {"users": ["# 101 = 5", "# 102 = 7, +79161234567"],
                "lines": ["# 74951234567 = ADVERTISING", "# 74957654321 = 2"],
                "numbers": ["# outside_line = ^9(\\d{10,11})$ => \\1", "# city = ^(\\d{7})$ => 8495\\1"]}
    for name, (_convert, doc) in FREEFORM_SECTIONS.items():
        out.extend(["", "[%s]" % name, "# %s" % doc] + examples[name])
    out.extend(["", "# One section per line (the number clients dial) that needs settings of its own:",
                "# [line:74951234567]"])
    for key, default, _convert, doc in LINE_SCHEMA:
        out.extend(["# %s" % doc, "# %s = %s" % (key, default) if default else "# %s =" % key])
    out.extend(["", "# Another PBX reported by this daemon: [ami:NAME] with the keys of [ami]; [pbx:NAME] with",
                "# those of [pbx] where it differs (the rest are [pbx]'s); [cel:NAME] with those of [cel]",
                "# (off unless backend is set). Its calls share the outbox and the portal's rate limit.",
                "# Its own lines: [lines:NAME] and [line:NAME:DID] over [lines] and [line:DID] (a key",
                "# left out is [line:DID]'s).",
                "# [ami:branch]", "# host = 10.0.2.5", "# username = bx24", "# secret = ...",
                "# [cel:branch]", "# backend = mysql", "# mysql_host = 10.0.2.5",
                "# [line:branch:78123334455]", "# responsible = 11"])
    return "\n".join(out) + "\n"


###############################################################################
# Storage #####################################################################
###############################################################################
# One sqlite database in [storage] state_dir, in WAL mode so that the sender,
# the AMI thread and the check command never wait long for each other. Every
# Bitrix24 request is written here before it is sent: a restart or kill -9
# resumes exactly where the daemon stopped.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    linkedid TEXT NOT NULL,
    kind TEXT NOT NULL,
    method TEXT NOT NULL,
    params TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    done_at REAL,
    last_error TEXT,
    result TEXT);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, linkedid, id);
CREATE TABLE IF NOT EXISTS calls (
    linkedid TEXT PRIMARY KEY,
    direction TEXT,
    external_number TEXT,
    call_id TEXT,
    crm_entity_type TEXT,
    crm_entity_id INTEGER,
    crm_owner_id INTEGER,
    created_entities TEXT,
    answered INTEGER,
    answered_at REAL,
    talker TEXT,
    last_rang TEXT,
    started_at REAL,
    ended_at REAL,
    finished_at REAL,
    task_id INTEGER,
    source TEXT,
    updated_at REAL,
    did TEXT,
    awaiting_since REAL,
    uncertain TEXT);
CREATE INDEX IF NOT EXISTS calls_number ON calls (external_number, ended_at);
CREATE TABLE IF NOT EXISTS clicks (
    key TEXT PRIMARY KEY,
    user_id INTEGER,
    number TEXT,
    at REAL NOT NULL,
    outcome TEXT);
"""


def sqlite_uri_path(path):
    """A path as the file: URI of sqlite takes it: only %, ? and # mean something there."""
    return path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")


class StorageError(Exception):
    """The state database cannot be opened or written."""


class StateStore(object):
    """The sqlite state database: settings (tokens, checkpoints), outbox, calls."""

    def __init__(self, path):
        self.path = path
        if path != ":memory:":
            directory = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StorageError("cannot create the state directory %s ([storage] state_dir): %s"
                                   % (directory, exc.strerror))
            self._make_private(path)
        try:
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            if path != ":memory:":
                self._incremental_vacuum()   # before WAL mode, which writes the header
                self.db.execute("PRAGMA journal_mode=WAL")
                # NORMAL is durable against a crash of this process (kill -9); only a
                # power cut can lose the last commits, and fsync per call is costly.
                self.db.execute("PRAGMA synchronous=NORMAL")
                # 128 kB of page cache, not 2 MB: the sender reads the heads of the
                # outbox and a call's row, which stay cached; RSS is what a PBX host counts
                self.db.execute("PRAGMA cache_size=-128")
                # The WAL is folded back every ~400 kB (not the default 4 MB) and
                # truncated after that, not kept at its largest: on a small disk it
                # grew to fill it and every write failed from then on.
                self.db.execute("PRAGMA wal_autocheckpoint=100")
                self.db.execute("PRAGMA journal_size_limit=%d" % (512 * 1024))
            self.db.executescript(_SCHEMA)
            self._add_new_columns()
        except sqlite3.Error as exc:
            raise StorageError("cannot open the state database %s: %s" % (path, exc))
        # the C lock threading.RLock is: `check` reads the state without importing threading
        self.lock = _thread.RLock()
        self.depth = 0
        self.error = None          # the last failed write, until one succeeds
        self.error_since = None
        self.failed_writes = 0

    @staticmethod
    def _make_private(path):
        """0600 for the database and its WAL: it holds the portal's OAuth tokens and
        every caller's number, whatever the directory's mode or the umask."""
        if not os.path.exists(path):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError:
                return   # sqlite3.connect says why, naming the file
        for name in (path, path + "-wal", path + "-shm"):
            try:
                if stat.S_IMODE(os.stat(name).st_mode) & 0o077:
                    os.chmod(name, 0o600)
            except OSError:
                pass

    def _incremental_vacuum(self):
        """Pages freed by the hourly purge go back to the filesystem (reclaim), so the file
        stays the size of what is kept. A new database gets the mode before its first
        table; one made by an older version is rewritten once (VACUUM) to take it."""
        if self.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return
        self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if self.db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            log.info("state database %s: rewriting it once so that freed space goes back to the disk",
                     self.path)
            self.db.execute("VACUUM")

    def reclaim(self):
        """Give the pages freed by a purge back to the filesystem and truncate the WAL."""
        if self.path == ":memory:":
            return
        with self.lock:
            try:
                # it frees one page per step: execute() would stop after the first,
                # executescript() steps it to the end
                self.db.executescript("PRAGMA incremental_vacuum;")
            except sqlite3.Error as exc:
                log.warning("state database %s: reclaiming free pages failed: %s", self.path, exc)
                return
        self.checkpoint()

    # Columns added since the first release: a database from an older version gets
    # them on open (CREATE TABLE IF NOT EXISTS leaves an existing table as it was).
    ADDED_COLUMNS = (("calls", "did", "TEXT"), ("calls", "awaiting_since", "REAL"),
                     ("calls", "uncertain", "TEXT"))

    def _add_new_columns(self):
        for table, column, kind in self.ADDED_COLUMNS:
            have = [r[1] for r in self.db.execute("PRAGMA table_info(%s)" % table)]
            if column not in have:
                self.db.execute("ALTER TABLE %s ADD COLUMN %s %s" % (table, column, kind))

    @classmethod
    def open_dir(cls, state_dir):
        return cls(os.path.join(state_dir, "bx24ast.db"))

    def execute(self, sql, args=()):
        with self.lock:
            try:
                cur = self.db.execute(sql, args)
            except sqlite3.Error as exc:
                self.write_failed(exc)
                raise
            if self.depth == 0 and self.error is not None and not sql.lstrip().upper().startswith("SELECT"):
                self.write_worked()
            return cur

    def write_failed(self, exc):
        if self.error is None:
            self.error_since = time.time()
            log.error("state database %s: a write failed: %s; what could not be saved is kept in "
                      "memory and written again", self.path, exc)
        self.error = str(exc)
        self.failed_writes += 1

    def write_worked(self):
        if self.error is not None:
            log.info("state database %s: writes work again (%d failed)", self.path, self.failed_writes)
        self.error = self.error_since = None
        self.failed_writes = 0

    def checkpoint(self):
        """Fold the WAL into the database and truncate it (also done at every stop)."""
        with self.lock:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("state database %s: WAL checkpoint failed: %s", self.path, exc)

    def health(self):
        return {"error": self.error, "since": self.error_since, "failed_writes": self.failed_writes}

    def query(self, sql, args=()):
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def transaction(self):
        return _Transaction(self)

    def get_setting(self, key, default=None):
        rows = self.query("SELECT value FROM settings WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_setting(self, key, value):
        self.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                     (key, json.dumps(value)))

    def close(self):
        with self.lock:
            if self.path != ":memory:":
                self.checkpoint()
            self.db.close()


class _Transaction(object):
    """BEGIN IMMEDIATE ... COMMIT; nested uses join the outer transaction, so that
    everything one call event writes (call record and its requests) lands at once."""

    def __init__(self, store):
        self.store = store
        self.outer = False

    def __enter__(self):
        self.store.lock.acquire()
        self.outer = self.store.depth == 0
        if self.outer:
            try:
                self.store.db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self.store.lock.release()
                self.store.write_failed(exc)
                raise
        self.store.depth += 1
        return self.store.db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.store.depth -= 1
            if self.outer:
                if exc_type is None:
                    try:
                        self.store.db.execute("COMMIT")
                    except sqlite3.Error as err:
                        self._rollback()
                        self.store.write_failed(err)
                        raise
                    self.store.write_worked()
                else:
                    self._rollback()
                    if isinstance(exc, sqlite3.Error):
                        self.store.write_failed(exc)
        finally:
            self.store.lock.release()

    def _rollback(self):
        try:
            self.store.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # a failed COMMIT may have rolled back already


class DiskReserve(object):
    """A file of [storage] reserve_mb zeros next to the state database. When the disk
    fills up it is deleted, which gives the database room to go on writing while
    `check` turns CRITICAL; it comes back once the disk has room again."""

    NAME = "reserve.bin"

    def __init__(self, state_dir, megabytes):
        self.directory = state_dir
        self.path = os.path.join(state_dir, self.NAME)
        self.size = int(megabytes * 1024 * 1024)
        self.released_at = None
        self.free = None

    def free_bytes(self):
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def check(self):
        """Every few seconds: give the reserve back, or take it again."""
        if not self.size:
            return
        try:
            self.free = free = self.free_bytes()
            present = os.path.exists(self.path)
            if present and free < self.size:
                os.remove(self.path)
                self.released_at = time.time()
                log.error("the disk of %s is almost full (%d kB free): the %d kB reserve was given back to "
                          "the state database; free some space", self.directory, free // 1024, self.size // 1024)
            elif not present and free > 3 * self.size:
                self._fill()
                if self.released_at is not None:
                    log.info("the disk of %s has room again; the reserve is kept again", self.directory)
                self.released_at = None
            elif not present and self.released_at is None:
                self.released_at = time.time()   # never had room for it
        except OSError as exc:
            log.warning("disk reserve %s: %s", self.path, exc.strerror or exc)

    def _fill(self):
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                block = b"\0" * 65536
                for _ in range(0, self.size, len(block)):
                    f.write(block)
            os.replace(tmp, self.path)
        except OSError:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise

    def status(self):
        return {"free_mb": None if self.free is None else round(self.free / 1048576.0, 1),
                "reserve_mb": round(self.size / 1048576.0, 1),
                "low_since": self.released_at if self.size else None}


class OutboxRequest(object):
    __slots__ = ("id", "linkedid", "kind", "method", "params", "priority", "attempts", "next_at",
                 "state", "last_error", "created_at")

    def __init__(self, row):
        for name in self.__slots__:
            setattr(self, name, row[name])
        self.params = json.loads(self.params)

    def __repr__(self):
        return "<%s #%d %s %s>" % (self.kind, self.id, self.linkedid, self.method)


# Lower runs first: the card must not wait behind other calls' activities.
PRIORITY_CARD, PRIORITY_FINISH, PRIORITY_LATER = 0, 1, 2


class Outbox(object):
    """Durable queue of Bitrix24 requests, strictly ordered within one call.

    A call's requests leave in the order they were added (register, show/hide,
    finish, record, task); different calls are independent, so one call stuck
    on a bad parameter does not hold up the others. Each request is pending,
    done or parked (given up, with the reason, until `outbox retry`).
    """

    def __init__(self, store):
        self.store = store
        self._wakeup = None
        self._wakeup_made = _thread.allocate_lock()
        self.done_count = 0      # requests this process marked done (housekeeping runs by it too)

    @property
    def wakeup(self):
        """The condition the sender sleeps on, made at its first use (`check` reads the
        outbox without importing threading)."""
        if self._wakeup is None:
            with self._wakeup_made:
                if self._wakeup is None:
                    self._wakeup = threading.Condition()
        return self._wakeup

    def add(self, linkedid, kind, method, params, priority, not_before=0.0):
        now = time.time()
        with self.store.transaction() as db:
            if kind in ("show", "hide"):
                merged = self._merge_card(db, linkedid, kind, params)
                if merged:
                    return merged
            cur = db.execute(
                "INSERT INTO outbox (linkedid, kind, method, params, priority, next_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (linkedid, kind, method, json.dumps(params), priority, not_before, now))
            request_id = cur.lastrowid
        with self.wakeup:
            self.wakeup.notify_all()
        return request_id

    @staticmethod
    def _merge_card(db, linkedid, kind, params):
        """show/hide for more users while the last one is still unsent: one request."""
        row = db.execute("SELECT id, kind, params, attempts FROM outbox WHERE linkedid = ? "
                         "AND state = 'pending' ORDER BY id DESC LIMIT 1", (linkedid,)).fetchone()
        if row is None or row["kind"] != kind or row["attempts"]:
            return None
        old = json.loads(row["params"])
        users = old.get("USER_ID")
        if not isinstance(users, list) or not isinstance(params.get("USER_ID"), list):
            return None
        for user in params["USER_ID"]:
            if user not in users:
                users.append(user)
        db.execute("UPDATE outbox SET params = ? WHERE id = ?", (json.dumps(old), row["id"]))
        return row["id"]

    # Under a load that fills every request with cards and finishes, a missed-call task
    # would never go: those due for AGED_SECONDS get a share of each batch.
    AGED_SECONDS = 30.0
    AGED_SHARE = 5

    def ready(self, now, limit=50):
        """The next request of every call that may go now, most urgent first, and among
        them (up to AGED_SHARE) the less urgent ones that have waited long."""
        first = ("SELECT o.* FROM outbox o WHERE o.state = 'pending' AND o.id = "
                 "(SELECT MIN(id) FROM outbox i WHERE i.linkedid = o.linkedid AND i.state = 'pending') "
                 "AND o.next_at <= ? ")
        rows = self.store.query(first + "ORDER BY o.priority, o.id LIMIT ?", (now, limit))
        if len(rows) == limit and rows[-1]["priority"] < PRIORITY_LATER:
            taken = set(r["id"] for r in rows)
            aged = [r for r in self.store.query(first + "AND o.priority > ? AND o.next_at <= ? ORDER BY o.id LIMIT ?",
                                                (now, rows[-1]["priority"], now - self.AGED_SECONDS,
                                                 self.AGED_SHARE)) if r["id"] not in taken]
            if aged:
                rows = rows[:limit - len(aged)] + aged
        return [OutboxRequest(r) for r in rows]

    def followers(self, request, limit=3):
        """Requests right after request in the same call (for a chained batch)."""
        rows = self.store.query(
            "SELECT * FROM outbox WHERE linkedid = ? AND state = 'pending' AND id > ? "
            "ORDER BY id LIMIT ?", (request.linkedid, request.id, limit))
        return [OutboxRequest(r) for r in rows]

    def next_due(self):
        """When the next request may go: only the first pending request of each call can
        (the others wait behind it however old they are), so a backlog behind a request
        that backs off lets the sender sleep instead of spinning."""
        rows = self.store.query(
            "SELECT MIN(o.next_at) AS t FROM outbox o WHERE o.state = 'pending' AND o.id = "
            "(SELECT MIN(id) FROM outbox i WHERE i.linkedid = o.linkedid AND i.state = 'pending')")
        return rows[0]["t"] if rows and rows[0]["t"] is not None else None

    # Not idempotent: once one of these has left, the portal may carry it out however
    # the answer fares, so it is not sent again before the first could still be running.
    UNCERTAIN_KINDS = frozenset(("register", "finish", "record", "task", "contact", "deal"))

    def mark_sending(self, requests, settle=0.0):
        """Counted before the bytes leave: after a crash, attempts > 0 says the
        portal may already have done it. A non-idempotent request is also held back
        for settle seconds from now, in the database: a daemon killed while it waits
        for the answer does not send it again while the portal may still be working."""
        now = time.time()
        with self.store.transaction() as db:
            for req in requests:
                if settle and req.kind in self.UNCERTAIN_KINDS:
                    req.next_at = now + settle
                    db.execute("UPDATE outbox SET attempts = attempts + 1, next_at = ? WHERE id = ?",
                               (req.next_at, req.id))
                else:
                    db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", (req.id,))
                req.attempts += 1

    # A done request keeps what `outbox list` and exactly-once need (id, call, kind,
    # method, attempts, times, the note); its body and the portal's answer are dropped,
    # they made up most of the database.
    DONE_BODY = "{}"

    def done(self, request, note=None):
        self.done_count += 1
        self.store.execute("UPDATE outbox SET state = 'done', done_at = ?, params = ?, result = NULL, "
                           "last_error = ? WHERE id = ?", (time.time(), self.DONE_BODY, note, request.id))

    def retry(self, request, delay, error):
        request.next_at = time.time() + delay
        self.store.execute("UPDATE outbox SET next_at = ?, last_error = ? WHERE id = ?",
                           (request.next_at, error[:1000], request.id))

    def park(self, request, reason):
        self.store.execute("UPDATE outbox SET state = 'parked', last_error = ? WHERE id = ?",
                           (reason[:1000], request.id))

    def parked_reason(self, linkedid, kind):
        rows = self.store.query("SELECT last_error FROM outbox WHERE linkedid = ? AND kind = ? AND "
                                "state = 'parked' ORDER BY id DESC LIMIT 1", (linkedid, kind))
        return rows[0]["last_error"] if rows else None

    def close_call(self, linkedid, note):
        """Every pending request of a call done without sending (it needs none)."""
        closed = self.store.execute("UPDATE outbox SET state = 'done', done_at = ?, params = ?, last_error = ? "
                                    "WHERE linkedid = ? AND state = 'pending'",
                                    (time.time(), self.DONE_BODY, note[:1000], linkedid)).rowcount
        self.done_count += closed
        return closed

    def park_call(self, linkedid, reason):
        self.store.execute("UPDATE outbox SET state = 'parked', last_error = ? WHERE linkedid = ? "
                           "AND state = 'pending'", (reason[:1000], linkedid))

    def retry_parked(self, request_id=None):
        sql = "UPDATE outbox SET state = 'pending', next_at = 0 WHERE state = 'parked'"
        args = ()
        if request_id is not None:
            sql += " AND id = ?"
            args = (request_id,)
        count = self.store.execute(sql, args).rowcount
        with self.wakeup:
            self.wakeup.notify_all()
        return count

    def counts(self):
        rows = self.store.query("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
        return dict((r["state"], r["n"]) for r in rows)

    def oldest_pending(self):
        """When the oldest request still waiting was added (wall time), or None."""
        rows = self.store.query("SELECT MIN(created_at) AS t FROM outbox WHERE state = 'pending'")
        return rows[0]["t"] if rows else None

    def listing(self, states=("pending", "parked")):
        marks = ",".join("?" for _ in states)
        rows = self.store.query("SELECT * FROM outbox WHERE state IN (%s) ORDER BY id" % marks, states)
        return [OutboxRequest(r) for r in rows]

    def requests_of(self, linkedid):
        return [OutboxRequest(r) for r in self.store.query(
            "SELECT * FROM outbox WHERE linkedid = ? ORDER BY id", (linkedid,))]

    def shift(self, seconds):
        """Move every waiting request's time by seconds (the wall clock stepped)."""
        self.store.execute("UPDATE outbox SET next_at = next_at + ? WHERE state = 'pending' AND next_at > 0",
                           (seconds,))
        with self.wakeup:
            self.wakeup.notify_all()

    def purge_done(self, older_than, keep):
        """Done requests older than older_than, and all but the newest keep of them."""
        self.store.execute("DELETE FROM outbox WHERE state = 'done' AND done_at < ?", (older_than,))
        self.store.execute("DELETE FROM outbox WHERE state = 'done' AND id <= (SELECT id FROM outbox "
                           "WHERE state = 'done' ORDER BY id DESC LIMIT 1 OFFSET ?)", (keep,))


class CallRecords(object):
    """What Bitrix24 told us about each call (CALL_ID, CRM entity) and its outcome."""

    FIELDS = ("direction", "external_number", "call_id", "crm_entity_type", "crm_entity_id",
              "crm_owner_id", "created_entities", "answered", "answered_at", "talker", "last_rang",
              "started_at", "ended_at", "finished_at", "task_id", "source", "did", "awaiting_since",
              "uncertain")

    def __init__(self, store):
        self.store = store

    def get(self, linkedid):
        rows = self.store.query("SELECT * FROM calls WHERE linkedid = ?", (linkedid,))
        return dict(rows[0]) if rows else None

    def update(self, linkedid, **fields):
        for key in fields:
            if key not in self.FIELDS:
                raise KeyError(key)
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO calls (linkedid, updated_at) VALUES (?, ?)",
                       (linkedid, time.time()))
            if fields:
                db.execute("UPDATE calls SET %s, updated_at = ? WHERE linkedid = ?"
                           % ", ".join("%s = ?" % k for k in fields),
                           list(fields.values()) + [time.time(), linkedid])

    def registered(self, linkedid):
        """Whether this call was already reported (register queued, or click-to-call)."""
        return bool(self.store.query("SELECT 1 FROM calls WHERE linkedid = ? AND source IS NOT NULL",
                                     (linkedid,)))

    def unended(self, pbx=None):
        """Calls reported to Bitrix24 whose end was never reported: in progress, or
        lost in a gap of the live view (a restart, an AMI disconnect); of one PBX
        ("" for [ami], whose linkedids have no name in front) when pbx is given."""
        where = ""
        args = ()
        if pbx == "":
            where = " AND linkedid NOT LIKE '%:%'"
        elif pbx:
            where, args = " AND linkedid LIKE ?", (pbx.replace("%", "").replace("_", "") + ":%",)
        return [dict(r) for r in self.store.query(
            "SELECT * FROM calls WHERE source IS NOT NULL AND ended_at IS NULL%s ORDER BY started_at" % where, args)]

    def uncertain_since(self, since):
        return [dict(r) for r in self.store.query(
            "SELECT * FROM calls WHERE uncertain IS NOT NULL AND updated_at >= ? ORDER BY ended_at", (since,))]

    def last_talker(self, number, since):
        """The extension that last talked with number, in a call ended since then."""
        rows = self.store.query("SELECT talker FROM calls WHERE external_number = ? AND answered = 1 "
                                "AND talker IS NOT NULL AND ended_at >= ? ORDER BY ended_at DESC LIMIT 1",
                                (number, since))
        return rows[0]["talker"] if rows else None

    def answered_since(self, number, since, exclude):
        """Whether the client got through (either way) after a missed call."""
        rows = self.store.query("SELECT 1 FROM calls WHERE external_number = ? AND answered = 1 "
                                "AND ended_at >= ? AND linkedid != ? LIMIT 1", (number, since, exclude))
        return bool(rows)

    def purge(self, older_than, keep):
        """Calls not touched since older_than, and all but the newest keep calls. Calls
        still waiting for their end are kept however many there are."""
        self.store.execute("DELETE FROM calls WHERE updated_at < ?", (older_than,))
        self.store.execute("DELETE FROM calls WHERE rowid <= (SELECT rowid FROM calls ORDER BY rowid DESC "
                           "LIMIT 1 OFFSET ?) AND NOT (source IS NOT NULL AND ended_at IS NULL)", (keep,))


###############################################################################
# AMI #########################################################################
###############################################################################
# The Asterisk Manager Interface is a line protocol: "Key: Value\r\n" headers, a
# blank line ends a message. Only build_action() writes it and only AmiParser
# reads it.

class AmiError(Exception):
    """Anything that went wrong talking to Asterisk."""


class AmiDisconnected(AmiError):
    """The socket is closed or the connection never came up."""


class AmiLoginFailed(AmiError):
    """Asterisk refused the username/secret, or the banner was not AMI."""


class AmiActionFailed(AmiError):
    """An action was answered with Response: Error (the Message header says why)."""

    def __init__(self, message, response=None):
        AmiError.__init__(self, message)
        self.response = response


class AmiInjectionError(AmiError, ValueError):
    """A header name or value would break the AMI framing (CR, LF, or a bad name)."""


_HEADER_NAME = LazyPattern(r"^[A-Za-z][A-Za-z0-9_()\-]*\Z")


def build_action(action, action_id, headers=()):
    """The bytes of one AMI action. The only place that writes AMI.

    headers is a list of (name, value) pairs or a dict; a list value repeats the
    header (Variable: a=1, Variable: b=2). Any CR or LF in a name or value is
    refused before anything is written: a value from Bitrix24 or a web form
    containing "\\r\\nAction: Command" would otherwise become a second action.
    """
    if isinstance(headers, dict):
        headers = list(headers.items())
    pairs = [("Action", action), ("ActionID", action_id)]
    for name, value in headers:
        if isinstance(value, (list, tuple)):
            pairs.extend((name, v) for v in value)
        else:
            pairs.append((name, value))
    lines = []
    for name, value in pairs:
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise AmiInjectionError("AMI action %r: header name %r is not allowed" % (action, name))
        if value is None:
            value = ""
        if not isinstance(value, str):
            value = str(value)
        if "\r" in value or "\n" in value or "\0" in value:
            raise AmiInjectionError("AMI action %r: value of header '%s' contains CR, LF or NUL"
                                    % (action, name))
        lines.append("%s: %s\r\n" % (name, value))
    lines.append("\r\n")
    return "".join(lines).encode("utf-8")


class Message(dict):
    """One AMI message: headers by name; a repeated header (ChanVariable, Output) is a list.

    name is the event name for events and the Response value for responses;
    time is when it arrived (or the event's own time in a replay).
    """

    __slots__ = ("is_event", "name", "time", "output")

    def __init__(self, headers, is_event, name, when=None):
        dict.__init__(self, headers)
        self.is_event = is_event
        self.name = name
        self.time = when
        self.output = None

    @property
    def success(self):
        return not self.is_event and self.name in ("Success", "Follows", "Goodbye")

    # get() stays dict.get (C speed: the call engine reads ~8 headers an event);
    # header() also finds a header whose case differs (Asterisk writes both
    # Uniqueid and UniqueID).
    def header(self, key, default=None):
        value = dict.get(self, key, None)
        if value is not None:
            return value
        low = key.lower()
        for k, v in self.items():
            if k.lower() == low:
                return v
        return default

    def all(self, key):
        value = self.header(key)
        if value is None:
            return []
        return value if isinstance(value, list) else [value]


_SEP = b"\r\n\r\n"
# The headers Asterisk itself repeats in one message; every other one has one value.
_LIST_HEADERS = frozenset(["ChanVariable", "Output", "Variable", "ListItem"])


class AmiParser(object):
    """Cuts an AMI byte stream into Messages, whatever the read boundaries.

    Robust against hostile or broken input: a message larger than
    max_message_bytes is skipped whole (memory stays bounded), lines that are
    not "Key: Value" are dropped, and two messages glued together without the
    blank line are split at the second Event:/Response: header.

    wanted_events / wanted_variables (sets of bytes) let a consumer skip the
    events it ignores before they are decoded: a live PBX sends mostly
    Newexten, VarSet, RTCP and device state events.
    """

    def __init__(self, max_message_bytes=1048576, wanted_events=None, wanted_variables=None,
                 accept_actions=False):
        self.max_message_bytes = max_message_bytes
        self.accept_actions = accept_actions
        self.wanted_events = wanted_events
        self.wanted_variables = wanted_variables
        self.banner = None
        self._expect_banner = True
        self._buf = b""
        self._skipping = False
        self.skipped_oversize = 0
        self.skipped_garbage = 0
        self.filtered = 0

    def reset(self, expect_banner=True):
        self.banner = None
        self._expect_banner = expect_banner
        self._buf = b""
        self._skipping = False

    def feed(self, data, when=None):
        """Messages completed by data, in order."""
        if self._skipping:
            end = data.find(_SEP)
            if end < 0:
                return []
            data = data[end + 4:]
            self._skipping = False
        if self._buf:
            data = self._buf + data
        if self._expect_banner:
            eol = data.find(b"\r\n")
            if eol < 0:
                self._buf = data[-self.max_message_bytes:]
                return []
            self.banner = data[:eol].decode("utf-8", "replace")
            self._expect_banner = False
            data = data[eol + 2:]
        parts = data.split(_SEP)
        tail = parts.pop()
        if len(tail) > self.max_message_bytes:
            log.warning("AMI: dropped a message over %d bytes (max_message_bytes)",
                        self.max_message_bytes)
            self.skipped_oversize += 1
            tail = b""
            self._skipping = True
        self._buf = tail
        out = []
        # The hot loop of the whole program: most messages are events nobody reads,
        # so decide from the Event: line (and a VarSet's Variable:) before decoding.
        wanted = self.wanted_events
        variables = self.wanted_variables
        limit = self.max_message_bytes
        for raw in parts:
            if raw[:7] == b"Event: ":
                eol = raw.find(b"\r\n")
                name = raw[7:eol] if eol > 0 else raw[7:]
                if wanted is not None and name not in wanted:
                    self.filtered += 1
                    continue
                if name == b"VarSet" and variables is not None:
                    at = raw.find(b"\r\nVariable: ")
                    if at > 0:
                        end = raw.find(b"\r\n", at + 12)
                        if (raw[at + 12:end] if end > 0 else raw[at + 12:]) not in variables:
                            self.filtered += 1
                            continue
                is_event = True
            elif raw[:10] == b"Response: ":
                is_event = False
            elif not raw or raw == b"\r\n":
                continue
            elif raw[:8] == b"Action: " and self.accept_actions:
                # The server's side of the protocol (test doubles, sent-action logs).
                headers, output = self._slow_headers(
                    [line.split(": ", 1) for line in raw.decode("utf-8", "replace").split("\r\n")])
                out.append(Message(headers, False, headers["Action"], when))
                continue
            else:
                raw = raw.lstrip(b"\r\n")
                if raw[:7] == b"Event: " or raw[:10] == b"Response: ":
                    self._parse_glued(raw, when, out)
                    continue
                self.skipped_garbage += 1
                log.warning("AMI: skipped %d bytes that are not an AMI message: %r",
                            len(raw), raw[:60])
                continue
            if len(raw) > limit:
                self.skipped_oversize += 1
                log.warning("AMI: dropped a message of %d bytes (max_message_bytes = %d)",
                            len(raw), limit)
                continue
            pairs = [line.split(": ", 1) for line in raw.decode("utf-8", "replace").split("\r\n")]
            # the Message is built from the pairs at once: a dict built first and copied
            # into it cost a tenth of the whole engine
            try:
                msg = Message(pairs, is_event, None, when)
            except ValueError:
                msg = None
            if msg is None or len(msg) != len(pairs):
                if self._is_glued(pairs):
                    self._parse_glued(raw, when, out)
                    continue
                headers, output = self._slow_headers(pairs)
                msg = Message(headers, is_event, None, when)
                msg.output = output
            if is_event:
                msg.name = msg["Event"]
            else:
                msg.name = msg["Response"]
                if msg.output is None and "Output" in msg:
                    msg.output = msg.all("Output")
            out.append(msg)
        return out

    @staticmethod
    def _is_glued(pairs):
        """Two messages without the blank line between them (a broken proxy or stream)."""
        for pair in pairs[1:]:
            if len(pair) == 2 and pair[0] in ("Event", "Response"):
                return True
        return False

    def _parse_glued(self, raw, when, out):
        pieces = re.split(b"\r\n(?=Event: |Response: )", raw)
        log.warning("AMI: %d messages arrived without the blank line between them", len(pieces))
        saved, self._buf, self._skipping = self._buf, b"", False
        expect, self._expect_banner = self._expect_banner, False
        try:
            for piece in pieces:
                out.extend(self.feed(piece + _SEP, when))
        finally:
            self._buf, self._expect_banner = saved, expect

    def _slow_headers(self, pairs):
        """Repeated headers become lists; lines without ': ' are command output or junk."""
        headers = {}
        output = None
        for pair in pairs:
            if len(pair) != 2:
                line = pair[0]
                if line.endswith(":") and _HEADER_NAME.match(line[:-1]):
                    pair = [line[:-1], ""]
                else:
                    # Asterisk <= 13 answers Command with "Response: Follows" and raw
                    # output lines ending in "--END COMMAND--".
                    if line and line != "--END COMMAND--":
                        if output is None:
                            output = []
                        output.append(line)
                    continue
            key, value = pair
            if key in headers and key in _LIST_HEADERS:
                old = headers[key]
                if isinstance(old, list):
                    old.append(value)
                else:
                    headers[key] = [old, value]
            else:
                # A header repeated where Asterisk sends one (a torn or spliced message):
                # the last value wins, so no handler ever meets a list it did not expect.
                headers[key] = value
        if "Output" in headers:
            lines = headers["Output"] if isinstance(headers["Output"], list) else [headers["Output"]]
            output = (output or []) + lines
        return headers, output


class PendingAction(object):
    """An action sent and waiting for its response (and, for lists, its events)."""

    def __init__(self, action, action_id, callback=None):
        self.action = action
        self.action_id = action_id
        self.callback = callback
        self.response = None
        self.events = []
        self.collecting = False
        self.error = None
        self.done = threading.Event()
        self.sent_at = monotonic()

    def finish(self, error=None):
        self.error = error
        self.done.set()
        if self.callback is not None:
            try:
                self.callback(self)
            except Exception:
                log.exception("AMI: callback of %s failed", self.action)


class AmiStream(object):
    """Messages in, events out: responses are matched back to their actions.

    The same object serves a live socket (AmiConnection feeds what recv()
    returns) and a capture file (replay feeds the recorded reads), so a
    customer's capture exercises exactly the code a live PBX does.
    """

    def __init__(self, on_event, parser=None):
        self.on_event = on_event
        self.parser = parser or AmiParser()
        self._pending = {}
        self._lock = threading.Lock()
        self.last_received = None

    def expect(self, pending):
        with self._lock:
            self._pending[pending.action_id] = pending

    def forget(self, action_id):
        with self._lock:
            return self._pending.pop(action_id, None)

    def fail_all(self, error):
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.finish(error)

    def feed(self, data, when):
        self.last_received = when
        for msg in self.parser.feed(data, when):
            self.dispatch(msg)

    def dispatch(self, msg):
        action_id = dict.get(msg, "ActionID")
        if action_id is not None and self._pending:
            if isinstance(action_id, list):
                action_id = action_id[0]
            with self._lock:
                pending = self._pending.get(action_id)
            if pending is not None:
                if not msg.is_event:
                    pending.response = msg
                    if (msg.get("EventList") or "").lower() == "start" and msg.success:
                        pending.collecting = True
                        return
                    self.forget(action_id)
                    pending.finish()
                    return
                if pending.collecting:
                    if (msg.get("EventList") or "").lower() == "complete" or msg.name.endswith("Complete"):
                        self.forget(action_id)
                        pending.finish()
                    else:
                        pending.events.append(msg)
                    return
        if msg.is_event:
            try:
                self.on_event(msg)
            except Exception:
                # A bug in one handler must not take the AMI connection down.
                log.exception("AMI: handling event %s failed", msg.name)


class AmiConnection(object):
    """A logged-in AMI session that stays up: reconnects with capped back-off.

    Verbs are named after AMI actions (login, ping, command, originate, setvar,
    core_show_channels). Blocking verbs must not be called from the reader
    thread (the one that runs on_event); use send() with a callback there.
    """

    BANNER_PREFIX = "Asterisk Call Manager/"
    # Events the connection itself needs whatever the consumer filters: the items of
    # list actions, and the PBX's own state.
    CONNECTION_EVENTS = frozenset([b"CoreShowChannel", b"CoreShowChannelsComplete",
                                   b"OriginateResponse", b"FullyBooted", b"Shutdown",
                                   # the lists PBX discovery asks for
                                   b"EndpointList", b"EndpointListComplete",
                                   b"OutboundRegistrationDetail", b"OutboundRegistrationDetailComplete",
                                   b"PeerEntry", b"PeerlistComplete", b"RegistryEntry",
                                   b"RegistrationsComplete"])

    def __init__(self, host, port, username, secret, on_event, auth="plain",
                 connect_timeout=5.0, ping_interval=20.0, reconnect_max_delay=30.0,
                 max_message_bytes=1048576, wanted_events=None, wanted_variables=None,
                 events=True, on_connect=None, on_disconnect=None, raw_tap=None):
        self.host = host
        self.port = port
        self.username = username
        self.secret = secret
        self.auth = auth
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.reconnect_max_delay = reconnect_max_delay
        self.events = events
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.raw_tap = raw_tap
        if wanted_events is not None:
            wanted_events = frozenset(wanted_events) | self.CONNECTION_EVENTS
        self.parser = AmiParser(max_message_bytes, wanted_events, wanted_variables)
        self.stream = AmiStream(on_event, self.parser)
        self._sock = None
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._reader_ident = None
        self.connected = threading.Event()
        self.banner = None
        self.connects = 0
        self.disconnected_at = None
        self.fully_booted_uptime = None
        self.last_error = None

    # -- actions ------------------------------------------------------------
    # One count for every connection of the process: the ActionIDs of two PBXs' connections
    # never meet (click-to-call matches OriginateResponse by it).
    # (next() of an itertools.count is atomic: no lock.)
    _action_ids = itertools.count(1)

    def next_action_id(self):
        return "bx24ast-%d-%d" % (os.getpid(), next(self._action_ids))

    def send(self, action, headers=(), callback=None, action_id=None):
        """Send without waiting; callback(pending) runs in the reader thread. A caller
        that files what the answer is about before it can arrive takes action_id from
        next_action_id() first."""
        action_id = action_id or self.next_action_id()
        data = build_action(action, action_id, headers)
        pending = PendingAction(action, action_id, callback)
        sock = self._sock
        if sock is None:
            raise AmiDisconnected("AMI: not connected to %s:%s" % (self.host, self.port))
        self.stream.expect(pending)
        try:
            with self._send_lock:
                sock.sendall(data)
        except (OSError, socket.error) as exc:
            self.stream.forget(action_id)
            raise AmiDisconnected("AMI: sending %s failed: %s" % (action, exc))
        return pending

    def action(self, action, headers=(), timeout=10.0):
        """Send and wait for the response; AmiActionFailed on Response: Error."""
        if threading.get_ident() == self._reader_ident:
            raise AmiError(say("AMI: %s would wait for itself in the reader thread", action))
        pending = self.send(action, headers)
        if not pending.done.wait(timeout):
            self.stream.forget(pending.action_id)
            raise AmiError(say("AMI: no answer to %s within %.0f s", action, timeout))
        if pending.error is not None:
            raise pending.error
        if not pending.response.success:
            raise AmiActionFailed("AMI: %s failed: %s"
                                  % (action, pending.response.get("Message", "no reason given")),
                                  pending.response)
        return pending

    def ping(self, timeout=10.0):
        return self.action("Ping", timeout=timeout)

    def command(self, cli, timeout=10.0):
        """Run a CLI command; returns its output lines."""
        pending = self.action("Command", [("Command", cli)], timeout)
        return pending.response.output or []

    def setvar(self, channel, variable, value, timeout=10.0):
        return self.action("Setvar", [("Channel", channel), ("Variable", variable),
                                      ("Value", value)], timeout)

    def originate(self, channel, context, exten, priority=1, caller_id=None,
                  variables=None, timeout_ms=30000, callback=None, action_id=None):
        headers = [("Channel", channel), ("Context", context), ("Exten", exten),
                   ("Priority", priority), ("Timeout", timeout_ms), ("Async", "true")]
        if caller_id:
            headers.append(("CallerID", caller_id))
        if variables:
            headers.append(("Variable", ["%s=%s" % (k, v) for k, v in sorted(variables.items())]))
        return self.send("Originate", headers, callback, action_id)

    def core_show_channels(self, callback):
        return self.send("CoreShowChannels", (), callback)

    # -- connection -----------------------------------------------------------
    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ami", daemon=True)
        self._thread.start()

    def stop(self, timeout=5.0):
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                with self._send_lock:
                    sock.sendall(build_action("Logoff", self.next_action_id()))
            except (OSError, socket.error):
                pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except (OSError, socket.error):
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self):
        self._reader_ident = threading.get_ident()
        delay = 1.0
        while not self._stop.is_set():
            try:
                self._connect_and_login()
            except AmiLoginFailed as exc:
                log.error("%s", exc)
                self.last_error = str(exc)
                delay = self.reconnect_max_delay
            except (AmiError, OSError, socket.error) as exc:
                log.warning("AMI: cannot connect to %s:%s: %s; next try in %.0f s",
                            self.host, self.port, exc, delay)
                self.last_error = "cannot connect to %s:%s: %s" % (self.host, self.port, exc)
            else:
                self.last_error = None
                delay = 1.0
                self._read_loop()
                if self._stop.is_set():
                    break
                log.warning("AMI: connection to %s:%s lost; reconnecting", self.host, self.port)
            self._close()
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.reconnect_max_delay)
        self._close()

    def _close(self):
        was_connected = self.connected.is_set()
        self.connected.clear()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except (OSError, socket.error):
                pass
        self.stream.fail_all(AmiDisconnected("AMI: connection closed"))
        if was_connected:
            self.disconnected_at = STEADY.now()
            if self.on_disconnect is not None:
                try:
                    self.on_disconnect()
                except Exception:
                    log.exception("AMI: on_disconnect failed")

    def _recv(self, sock):
        data = sock.recv(65536)
        if not data:
            raise AmiDisconnected("AMI: Asterisk closed the connection")
        if self.raw_tap is not None:
            self.raw_tap(data)
        return data

    def try_login(self):
        """Connect, log in and leave (the wizard's Check): AmiError says why it failed."""
        try:
            self._connect_and_login()
        finally:
            self._close()

    def _connect_and_login(self):
        sock = socket.create_connection((self.host, self.port), self.connect_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._sock = sock
        self.parser.reset(expect_banner=True)
        deadline = monotonic() + self.connect_timeout
        early = []  # events that arrive before the login answer, kept in order

        def wait_for(action_id):
            while True:
                left = deadline - monotonic()
                if left <= 0:
                    raise AmiError(say("no answer from Asterisk within %.0f s", self.connect_timeout))
                sock.settimeout(left)
                try:
                    data = self._recv(sock)
                except socket.timeout:
                    continue
                if self.parser.banner is None:
                    msgs = self.parser.feed(data, STEADY.now())
                    if self.parser.banner is not None:
                        self.banner = self.parser.banner
                        if not self.banner.startswith(self.BANNER_PREFIX):
                            raise AmiLoginFailed(say("AMI: %s:%s is not an Asterisk Manager Interface "
                                                 "(banner %r)", self.host, self.port, self.banner[:60]))
                else:
                    msgs = self.parser.feed(data, STEADY.now())
                answer = None
                for msg in msgs:
                    if answer is None and not msg.is_event and dict.get(msg, "ActionID") == action_id:
                        answer = msg
                    else:
                        early.append(msg)  # including what came in the same read after it
                if answer is not None:
                    return answer

        def login_action(action, headers):
            action_id = self.next_action_id()
            with self._send_lock:
                sock.sendall(build_action(action, action_id, headers))
            return wait_for(action_id)

        events = "on" if self.events else "off"
        if self.auth == "md5":
            challenge = login_action("Challenge", [("AuthType", "MD5")])
            if not challenge.success or not challenge.get("Challenge"):
                raise AmiLoginFailed(say("AMI: %s:%s refused the MD5 challenge: %s", self.host, self.port,
                                         challenge.get("Message", "")))
            key = hashlib.md5((challenge.get("Challenge") + self.secret).encode("utf-8")).hexdigest()
            answer = login_action("Login", [("AuthType", "MD5"), ("Username", self.username),
                                            ("Key", key), ("Events", events)])
        else:
            answer = login_action("Login", [("Username", self.username), ("Secret", self.secret),
                                            ("Events", events)])
        if not answer.success:
            raise AmiLoginFailed(say("AMI: login as '%s' to %s:%s refused: %s (check [ami] username "
                                 "and secret against manager.conf)", self.username, self.host, self.port,
                                    answer.get("Message", "no reason given")))
        sock.settimeout(None)
        self.connects += 1
        self.connected.set()
        log.info("AMI: logged in to %s:%s as %s (%s)", self.host, self.port, self.username,
                 self.banner)
        for msg in early:
            self.stream.dispatch(msg)
        if self.on_connect is not None:
            self.on_connect(self)

    def _read_loop(self):
        sock = self._sock
        last_rx = monotonic()
        ping = None
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([sock], [], [], 1.0)
            except (OSError, ValueError, select.error):
                return
            now = monotonic()
            if ready:
                try:
                    data = self._recv(sock)
                except (AmiDisconnected, OSError, socket.error):
                    return
                last_rx = now
                ping = None
                self.stream.feed(data, STEADY.now())
                continue
            if ping is not None:
                if now - ping > self.ping_interval:
                    log.warning("AMI: no answer to Ping for %.0f s; the connection is dead",
                                self.ping_interval)
                    return
            elif now - last_rx > self.ping_interval:
                try:
                    self.send("Ping")
                except AmiError:
                    return
                ping = now


###############################################################################
# Calls #######################################################################
###############################################################################
# Pure logic, no I/O: AMI events in, calls and their lifecycle out. The rules
# that classify channels and numbers live in PbxRules so that the CEL recovery
# reads calls exactly as the live engine does.

class NumberPlan(object):
    """Writes a client's number one way: +79161234567 for 89161234567 and 79161234567."""

    _FORMATTING = LazyPattern(r"[\s\-().]")

    def __init__(self, country_code="7", national_prefix="8", national_number_length=10,
                 international_prefix="810|00", rewrites=()):
        self.country_code = country_code
        self.national_prefix = national_prefix
        self.national_number_length = national_number_length
        self._intl = re.compile(r"^(?:%s)(\d{8,})$" % international_prefix) if international_prefix else None
        # [numbers]: what a trunk or an office writes its own way (an outside-line 9,
        # 7-digit city numbers, +8...), made a number the rest of the plan understands
        self.rewrites = []
        for rule in rewrites:
            pattern, _, replacement = rule.partition("=>")
            self.rewrites.append((re.compile(pattern.strip()), replacement.strip()))

    def rewrite(self, text):
        """text after the first [numbers] rule that matches all of it (or as it is)."""
        for pattern, replacement in self.rewrites:
            m = pattern.fullmatch(text)
            if m is not None:
                return m.expand(replacement)
        return text

    def normalize(self, number):
        """The client's number in international form, or the digits as dialled when the
        number is not a full national one (short numbers, unknown formats)."""
        if number is None:
            return None
        text = self._FORMATTING.sub("", number)
        if self.rewrites and text:
            text = self.rewrite(text)
        if not text:
            return None
        if text.startswith("+"):
            return "+" + text[1:] if is_digits(text[1:]) else None
        if not is_digits(text):
            return None  # "anonymous", "<unknown>", SIP URIs: no number to report
        if self._intl is not None:
            m = self._intl.match(text)
            if m:
                return "+" + m.group(1)
        n = self.national_number_length
        cc, np = self.country_code, self.national_prefix
        if np and len(text) == len(np) + n and text.startswith(np):
            return "+" + cc + text[len(np):]
        if cc and len(text) == len(cc) + n and text.startswith(cc):
            return "+" + text
        if len(text) == n:
            return "+" + cc + text
        return text


_CHANNEL_SUFFIX = LazyPattern(r"-[0-9a-fA-F]+$")
_NUMBER_RUN = LazyPattern(r"\+?\d+")
_RECORDING_EXT = LazyPattern(r"\.(wav|WAV|mp3|MP3|gsm|GSM|ogg|wav49|WAV49|g722|sln\d*)$")


def local_channel_parts(name):
    """('101', 'from-internal', ';1') for Local/101@from-internal-0000001a;1, else None."""
    if not name.startswith("Local/"):
        return None
    rest = name[6:]
    at = rest.find("@")
    if at < 0:
        return None
    exten = rest[:at]
    context, _, half = rest[at + 1:].rpartition(";")
    context = _CHANNEL_SUFFIX.sub("", context)
    return exten, context, half


def channel_endpoint(name):
    """The device part of a channel name: '101' for PJSIP/101-0000001a, 'trunk-x' for
    PJSIP/trunk-x-00000003; for Local channels the extension they dial."""
    local = local_channel_parts(name)
    if local is not None:
        return local[0].rstrip("#")
    slash = name.find("/")
    if slash < 0:
        return None
    resource = name[slash + 1:]
    return _CHANNEL_SUFFIX.sub("", resource) if "-" in resource else resource


def channel_device(name):
    """'SIP/trunk-x' for SIP/trunk-x-00000003, 'PJSIP/101' for PJSIP/101-0000001a: the
    device as Asterisk's peer lists name it; None for Local channels."""
    if not name or name.startswith("Local/"):
        return None
    endpoint = channel_endpoint(name)
    if endpoint is None:
        return None
    return name[:name.find("/") + 1] + endpoint


class PbxRules(object):
    """How this PBX's dialplan is laid out: which contexts are trunks and phones, what
    an extension looks like, which variables carry the DID, the recording and so on."""

    def __init__(self, inbound_contexts=None, internal_contexts=None, trunk_channels=None,
                 extension_pattern=None, external_min_length=6, extension_variables=("AMPUSER",),
                 did_variables=("FROM_DID",), recording_variables=("MIXMONITOR_FILENAME", "CALLFILENAME"),
                 recording_format="wav", number_plan=None, ignore_numbers=None,
                 call_max_seconds=12 * 3600, call_id_variable="BX24_CALL_ID", mobiles=None,
                 mobile_dial_out="outbound"):
        self.inbound_contexts = inbound_contexts
        self.internal_contexts = internal_contexts
        self.trunk_channels = trunk_channels
        self.extension_pattern = extension_pattern or re.compile(r"[0-9]{2,5}\Z")
        self.external_min_length = external_min_length
        self.extension_variables = list(extension_variables)
        self.did_variables = list(did_variables)
        self.recording_variables = list(recording_variables)
        self.recording_format = recording_format
        self.number_plan = number_plan or NumberPlan()
        self.ignore_numbers = ignore_numbers
        self.call_max_seconds = call_max_seconds
        self.call_id_variable = call_id_variable
        # the employees' own mobiles ([users] 101 = 7, +7916...): +79161234567 -> "101",
        # matched whole, so that a client's number is never taken for an employee's
        self.mobiles = {}
        for ext, numbers in (mobiles or {}).items():
            for number in numbers:
                self.mobiles[self.number_plan.normalize(number)] = ext
        self.mobile_dial_out = mobile_dial_out
        # 'SIP/trunk-operator' -> 'trunk' or 'phone', as Asterisk itself lists them
        # (PbxDiscovery); empty until learned, and [pbx] trunk_channels still wins.
        self.endpoints = {}

    @classmethod
    def from_config(cls, config, section="pbx"):
        pbx = config.section(section)
        return cls(
            inbound_contexts=pbx["inbound_contexts"],
            internal_contexts=pbx["internal_contexts"],
            trunk_channels=pbx["trunk_channels"],
            extension_pattern=pbx["extension_pattern"],
            external_min_length=pbx["external_min_length"],
            extension_variables=comma_list(pbx["extension_variables"]),
            did_variables=comma_list(pbx["did_variables"]),
            recording_variables=comma_list(pbx["recording_variables"]),
            recording_format=pbx["recording_format"],
            number_plan=NumberPlan(pbx["country_code"], pbx["national_prefix"],
                                   pbx["national_number_length"], pbx["international_prefix"],
                                   config.maps.get("numbers", {}).values()),
            ignore_numbers=pbx["ignore_numbers"],
            call_max_seconds=pbx["call_max_hours"] * 3600,
            mobiles=dict((ext, entry.mobiles) for ext, entry in config.maps.get("users", {}).items()
                         if isinstance(entry, Employee) and entry.mobiles),
            mobile_dial_out=pbx["mobile_dial_out"])

    @classmethod
    def defaults(cls):
        return cls.from_config(Config.defaults())

    def is_extension(self, text):
        return bool(text) and self.extension_pattern.match(text) is not None

    def is_external_number(self, text):
        if not text:
            return False
        digits = text[1:] if text.startswith("+") else text
        return is_digits(digits) and len(digits) >= self.external_min_length

    def is_trunk_channel(self, name):
        if self.trunk_channels is not None and self.trunk_channels.match(name) is not None:
            return True
        return bool(self.endpoints) and self.endpoints.get(channel_device(name)) == "trunk"

    def is_phone_channel(self, name):
        return bool(self.endpoints) and self.endpoints.get(channel_device(name)) == "phone"

    def is_inbound_context(self, context):
        return bool(context) and self.inbound_contexts is not None and \
            self.inbound_contexts.match(context) is not None

    def is_internal_context(self, context):
        return bool(context) and self.internal_contexts is not None and \
            self.internal_contexts.match(context) is not None

    def extension_of_channel(self, name):
        """The extension a dialled channel rings, or None for trunks and helpers."""
        if not name or self.is_trunk_channel(name):
            return None
        endpoint = channel_endpoint(name)
        return endpoint if self.is_extension(endpoint) else None

    def is_external_leg(self, name):
        """A dialled channel that reaches outside: a trunk, or a Local channel dialling a
        full number (Local/89161234567@from-internal)."""
        if not name:
            return False
        if self.is_trunk_channel(name):
            return True
        if self.extension_of_channel(name) is not None:
            return False
        local = local_channel_parts(name)
        if local is not None:
            # FreePBX rings a ring group's outside member as Local/89161234567#@from-internal
            return self.is_external_number(local[0].rstrip("#"))
        return "/" in name

    def dialled_number(self, *candidates):
        """The longest run of digits that looks like an external number."""
        best = None
        for text in candidates:
            if not text:
                continue
            for run in _NUMBER_RUN.findall(text):
                if self.is_external_number(run) and (best is None or len(run) > len(best)):
                    best = run
            if best:
                return best
        return best

    def recording_name(self, variable, value):
        value = (value or "").strip()
        if not value:
            return None
        name = value.replace("\\", "/").rsplit("/", 1)[-1]
        if variable != "MIXMONITOR_FILENAME" and not _RECORDING_EXT.search(name):
            name = "%s.%s" % (name, self.recording_format)
        return name

    def employee_of_number(self, number):
        """The extension of the employee whose mobile number is, or None."""
        if not self.mobiles or not number:
            return None
        return self.mobiles.get(self.number_plan.normalize(number))

    def is_ignored_number(self, number, normalized=None):
        if self.ignore_numbers is None:
            return False
        return any(n and self.ignore_numbers.match(n) for n in (number, normalized))


DIAL_NO_ANSWER = {"NOANSWER", "CANCEL", "RINGING", "ANSWER", ""}
DIAL_FAILED = {"CHANUNAVAIL", "CONGESTION", "INVALIDARGS", "DONTCALL", "TORTURE"}


def decide_disposition(answered, dial_statuses, direction):
    """CDR-style disposition: ANSWERED only when an employee talked to the client."""
    if answered:
        return "ANSWERED"
    statuses = set(dial_statuses)
    if statuses & DIAL_NO_ANSWER:
        return "NO ANSWER"
    if "BUSY" in statuses:
        return "BUSY"
    if statuses & DIAL_FAILED:
        return "FAILED"
    return "FAILED" if direction == "outbound" else "NO ANSWER"


class Channel(object):
    __slots__ = ("uniqueid", "name", "linkedid", "context", "exten", "cid", "extension",
                 "origin", "party", "external_leg", "bridge", "bridged_at", "hungup_at", "on_behalf",
                 "created_at", "dial_status", "pair_key")

    def __init__(self, uniqueid, name, linkedid, when):
        self.uniqueid = uniqueid
        self.name = name
        self.linkedid = linkedid
        self.context = None
        self.exten = None
        self.cid = None
        self.extension = None   # the employee on this channel, if any
        self.origin = None      # 'trunk' or 'phone' for the channel that started the call
        self.party = False      # the client's side of the call
        self.external_leg = False
        self.on_behalf = None   # extension a dialplan variable (AMPUSER) names on this channel
        self.bridge = None
        self.bridged_at = None
        self.hungup_at = None
        self.created_at = when
        self.dial_status = None
        local = local_channel_parts(name) if name else None
        self.pair_key = name[:-2] if local is not None and name[-2:] in (";1", ";2") else None


class Call(object):
    """One call as the client lived it, across ring groups, queues and transfers."""

    def __init__(self, linkedid, when):
        self.linkedid = linkedid
        self.started_at = when
        self.last_event_at = when
        self.direction = None
        self.external_number = None
        self.did = None
        self.did_from_variable = False
        self.rang = []
        self.placer = None          # the extension that placed an outbound/internal call
        self.originated = False     # started by an AMI Originate that rang a phone first
        self.answered_by = None
        self.answered_at = None
        self.talking_with = None
        self.ended_with = None
        self.ended_at = None
        self.transfers = []
        self.pending_transfer = None
        self.recording = None
        self._recording_rank = None
        self.call_id = None         # Bitrix24 CALL_ID carried in by click-to-call
        self.callback = False       # started by the CRM callback form (registered as TYPE 4)
        self.from_mobile = None     # the extension whose employee called in from their mobile
        self.channels = {}
        self.dial_statuses = []
        self.notified_ringing = set()
        self.expired = False
        self.pending_origin = None  # uniqueid of a caller whose kind is not known yet
        # The live view had a hole: first seen mid-call (a restart, a reconnect), or up
        # while AMI was away (a transfer, a park, its end may have gone unseen). What it
        # says of answer, talk time and who talked is then a guess.
        self.adopted = False
        self.gap = False

    @property
    def billsec(self):
        if self.answered_at is None or self.ended_at is None:
            return 0
        return max(0, int(self.ended_at - self.answered_at + 0.5))

    @property
    def disposition(self):
        return decide_disposition(self.answered_at is not None, self.dial_statuses, self.direction)

    def as_dict(self, number_plan):
        return collections.OrderedDict([
            ("linkedid", self.linkedid),
            ("direction", self.direction),
            ("external_number", number_plan.normalize(self.external_number)
             if self.direction != "internal" else None),
            ("did", self.did if self.direction == "inbound" else None),
            ("rang", list(self.rang)),
            ("answered_by", self.answered_by),
            ("ended_with", self.ended_with),
            ("transfers", [dict(t) for t in self.transfers]),
            ("disposition", self.disposition),
            ("billsec", self.billsec),
            ("started_at", iso_time(self.started_at)),
            ("answered_at", iso_time(self.answered_at)),
            ("ended_at", iso_time(self.ended_at)),
            ("recording", self.recording),
            ("click_to_call", self.originated),
            ("call_id", self.call_id),
        ])


# Set (inherited) on calls that the CRM callback form started: Bitrix24 wants them as TYPE 4.
CALLBACK_VARIABLE = "BX24_CALLBACK"


class CallTracker(object):
    """Groups AMI events into calls by Linkedid and tells the CRM side what happens.

    on_call_event(kind, call, extension) is called with kind one of:
      'ringing'     extension's phone should show the card now (inbound: a phone
                    rings; outbound: the placing phone, when the client is dialled)
      'answered'    an employee (extension) is connected to the client
      'transferred' the client is now with extension after a transfer
      'ended'       the call is over (extension is None); its state is dropped next
    Internal calls are tracked and reported with direction 'internal'.
    """

    WANTED_EVENTS = frozenset(name.encode() for name in (
        "Newchannel", "NewCallerid", "VarSet", "DialBegin", "DialEnd", "BridgeEnter",
        "BridgeLeave", "BridgeMerge", "BlindTransfer", "AttendedTransfer", "Hangup", "Rename",
        "Newstate", "Pickup", "OriginateResponse"))

    GONE_KEPT = 2048

    def __init__(self, rules=None, on_call_event=None):
        self.rules = rules or PbxRules()
        self.on_call_event = on_call_event or (lambda kind, call, extension: None)
        self.calls = {}
        self.channels = {}
        self.bridges = {}
        self.local_pairs = {}
        # Channels hung up recently: a late event about one must not bring it back. Late
        # events come within a second; the last GONE_KEPT are remembered (a set and its
        # order: a third of an OrderedDict's memory).
        self._gone = set()
        self._gone_order = collections.deque()
        # Originated calls whose phone never answered, waiting for their OriginateResponse
        # (before or after the Hangups): channel name without its suffix -> (call, number, when).
        self._unanswered_originates = collections.OrderedDict()
        self._variables = {}
        for kind, names in (("extension", self.rules.extension_variables),
                            ("did", self.rules.did_variables),
                            ("recording", self.rules.recording_variables),
                            ("call_id", [self.rules.call_id_variable]),
                            ("callback", [CALLBACK_VARIABLE])):
            for rank, var in enumerate(names):
                for spelling in (var, "_" + var, "__" + var):
                    self._variables[spelling] = (kind, var, rank)
        self._handlers = {
            "Newchannel": self._newchannel, "NewCallerid": self._newcallerid,
            "VarSet": self._varset, "DialBegin": self._dialbegin, "DialEnd": self._dialend,
            "BridgeEnter": self._bridgeenter, "BridgeLeave": self._bridgeleave,
            "BridgeMerge": self._bridgemerge, "BlindTransfer": self._blindtransfer,
            "AttendedTransfer": self._attendedtransfer, "Hangup": self._hangup,
            "Rename": self._rename, "Newstate": self._newstate, "Pickup": self._pickup,
            "OriginateResponse": self._originate_response,
        }

    def wanted_variables(self):
        return frozenset(v.encode() for v in self._variables)

    # -- input ----------------------------------------------------------------
    def handle(self, msg):
        handler = self._handlers.get(msg.name)
        if handler is not None:
            handler(msg, msg.time)

    # The headers of a channel in an event, by the prefix of its Uniqueid header
    # (DialBegin's DestUniqueid...): spelled out once, not joined at every event.
    _CHANNEL_KEYS = dict((uid_key, tuple(uid_key[:-len("Uniqueid")] + key for key in (
        "Linkedid", "Channel", "Context", "Exten", "CallerIDNum", "ChannelState")))
        for uid_key in ("Uniqueid", "DestUniqueid", "TargetUniqueid", "TransfererUniqueid", "TransfereeUniqueid"))

    def _channel(self, msg, when, uid_key="Uniqueid", create=True):
        """The tracked channel an event is about; adopts channels first seen mid-call."""
        uid = msg.get(uid_key)
        if not uid:
            return None
        chan = self.channels.get(uid)
        keys = self._CHANNEL_KEYS.get(uid_key)
        if keys is None:
            prefix = uid_key[:-len("Uniqueid")]
            keys = tuple(prefix + key for key in ("Linkedid", "Channel", "Context", "Exten", "CallerIDNum",
                                                  "ChannelState"))
        linkedid = msg.get(keys[0])
        if chan is None:
            if not create or not linkedid or uid in self._gone:
                return None
            chan = self._add_channel(uid, msg.get(keys[1]), linkedid, when, msg.get(keys[2]), msg.get(keys[3]),
                                     msg.get(keys[4]), msg.get(keys[5]), adopted=True)
        elif linkedid and linkedid != chan.linkedid:
            chan.cid = self._cid(msg.get(keys[4])) or chan.cid
            self._move_channel(chan, linkedid, when)
        call = self.calls.get(chan.linkedid)
        if call is not None and when is not None:
            call.last_event_at = when
        return chan

    def _add_channel(self, uid, name, linkedid, when, context, exten, cid, state, adopted=False):
        call = self.calls.get(linkedid)
        if call is None:
            call = self.calls[linkedid] = Call(linkedid, when)
            call.adopted = adopted
        chan = Channel(uid, name or "", linkedid, when)
        chan.context, chan.exten, chan.cid = context, exten, cid
        call.channels[uid] = chan
        self.channels[uid] = chan
        if chan.pair_key:
            self.local_pairs.setdefault(chan.pair_key, set()).add(uid)
        # Asterisk's own call model: the channel whose Uniqueid is the Linkedid started
        # the call. It calls once it rings in (created Ring on PJSIP, Down and then
        # Newstate Ring on chan_sip, IAX2, DAHDI); a root channel that is itself dialled
        # (an Originate) never does. Adopted mid-call, the root is the calling side
        # whatever its state.
        if (uid == linkedid and (state == "4" or adopted)) or self._enters_for_root(chan, state):
            self._start_call(call, chan, adopted)
        elif chan.extension is None and not (chan.pair_key is not None and chan.name.endswith(";2")):
            # Local/<exten>@...;1 is what a Dial() rang; its ;2 half runs the dialplan
            # there for whoever is behind it (a phone it dials next, or the caller ID of
            # a call file), so the name alone never makes it <exten>'s phone.
            chan.extension = self.rules.extension_of_channel(chan.name)
        return chan

    def _enters_for_root(self, chan, state):
        """An originated Local/<number>@<context> root: its ;2 half is where the call
        enters the dialplan (a call file or a test harness playing a trunk or a phone).
        Local/<extension>@... is the other way round: the ;2 half rings that phone and
        the call is a click-to-call."""
        if state != "4" or chan.pair_key is None or not chan.name.endswith(";2"):
            return False
        root = self.channels.get(chan.linkedid)
        if root is None or root.pair_key != chan.pair_key:
            return False
        exten = local_channel_parts(chan.name)[0].rstrip("#")
        return not self.rules.is_extension(exten)

    def _rings_for_other(self, src, dest, msg):
        """The ;2 half of an originated Local/<extension>@... root dials a phone on behalf
        of another extension (its caller ID): a call file placing an internal call. When
        the caller ID is the rung extension itself it is a click-to-call ringing it."""
        root = self.channels.get(src.linkedid)
        if src.origin or src is root or root is None or root.pair_key is None \
                or root.pair_key != src.pair_key or dest.extension is None:
            return False
        call = self.calls.get(src.linkedid)
        if call is not None and (call.callback or call.call_id):
            return False  # our own click-to-call or callback
        cid = self._cid(msg.get("CallerIDNum"))
        return self.rules.is_extension(cid) and cid != dest.extension

    def _start_call(self, call, chan, adopted=False):
        if call.direction is None and not call.originated and not any(
                c.origin for c in call.channels.values() if c is not chan):
            self._classify_origin(call, chan, adopted)

    def _classify_origin(self, call, chan, adopted=False):
        kind = self._origin_kind(chan, adopted)
        if kind is None:
            # A Local channel in contexts the rules do not know: what it dials tells.
            call.pending_origin = chan.uniqueid
        else:
            self._set_origin(call, chan, kind)

    def _origin_kind(self, chan, adopted):
        """'trunk' or 'phone' for the channel that started a call; None while unknown.
        What Asterisk says of its endpoints comes first, then the [pbx] rules, then the
        shape of the channel: phones are named by their extension, trunks are not."""
        rules = self.rules
        if rules.is_trunk_channel(chan.name) or rules.is_inbound_context(chan.context):
            return "trunk"
        if rules.is_phone_channel(chan.name) or rules.is_internal_context(chan.context):
            return "phone"
        cid = self._cid(chan.cid)
        local = local_channel_parts(chan.name)
        if local is not None:
            if rules.is_inbound_context(local[1]):
                return "trunk"
            if rules.is_internal_context(local[1]) or rules.is_extension(cid):
                return "phone"
            return None if not adopted else "trunk"
        if "/" not in chan.name:
            return None
        if rules.extension_of_channel(chan.name) is not None or rules.is_extension(cid):
            return "phone"
        return "trunk"

    def _set_origin(self, call, chan, kind):
        rules = self.rules
        call.pending_origin = None
        chan.party = True
        chan.origin = kind
        if kind == "trunk":
            chan.extension = None
            call.direction = "inbound"
            call.external_number = self._cid(chan.cid)
            employee = rules.employee_of_number(call.external_number)
            if employee is not None:
                # an employee calling in from their mobile: to a colleague it is an
                # internal call; put through to a client, their own outbound call
                call.direction, call.placer, call.from_mobile = "internal", employee, employee
                call.external_number = None
                chan.extension = employee
                return
            # Adopted mid-call, the trunk leg's extension is where the dialplan is now:
            # the line only while it is still in the context calls come in at, not once
            # it went on to a ring group or a phone.
            if chan.exten and chan.exten != "s" and not call.did_from_variable and (
                    not call.adopted or rules.is_inbound_context(chan.context)):
                call.did = chan.exten
            return
        # A Local channel's name holds the number it dials, not the phone behind it.
        chan.extension = None if chan.name.startswith("Local/") else \
            rules.extension_of_channel(chan.name)
        if chan.extension is None and rules.is_extension(self._cid(chan.cid)):
            chan.extension = chan.cid
        chan.extension = chan.extension or chan.on_behalf
        call.placer = chan.extension

    def _settle_pending(self, call, chan, dialled_phone, dialled=None):
        """A caller whose kind was left open: one who rings phones is a trunk unless
        its caller ID is an extension; one who dials out the number it was started
        for is a phone; one who dials out another number (a forward) is a trunk."""
        if call.pending_origin != chan.uniqueid or chan.origin:
            return
        cid = self._cid(chan.cid)
        if dialled_phone:
            kind = "phone" if self.rules.is_extension(cid) else "trunk"
        else:
            kind = "trunk" if dialled and chan.exten and dialled != chan.exten else "phone"
        self._set_origin(call, chan, kind)

    @staticmethod
    def _cid(cid):
        if not cid or cid == "<unknown>":
            return None
        return cid

    def _move_channel(self, chan, linkedid, when):
        """Asterisk re-links channels when calls are joined (phone-driven transfers)."""
        old = self.calls.get(chan.linkedid)
        if old is not None:
            old.channels.pop(chan.uniqueid, None)
        new = self.calls.get(linkedid)
        if new is None:
            new = self.calls[linkedid] = Call(linkedid, when)
        chan.linkedid = linkedid
        if chan.origin and new.direction is not None:
            chan.origin = None
            chan.party = chan.external_leg
        if chan.extension is None and not chan.party and self.rules.is_extension(self._cid(chan.cid)):
            chan.extension = chan.cid   # a phone's call leg joining this call (parked call taken)
        new.channels[chan.uniqueid] = chan
        if old is not None and not old.channels:
            del self.calls[old.linkedid]
            if old.direction not in (None, "internal"):
                self._finish(old, when)

    def _newchannel(self, msg, when):
        uid = msg.get("Uniqueid")
        if not uid or uid in self.channels:
            return
        self._add_channel(uid, msg.get("Channel"), msg.get("Linkedid") or uid, when,
                          msg.get("Context"), msg.get("Exten"), msg.get("CallerIDNum"),
                          msg.get("ChannelState"))

    def _newstate(self, msg, when):
        uid = msg.get("Uniqueid")
        chan = self.channels.get(uid) if uid else None
        if chan is None or chan.origin or uid != chan.linkedid or msg.get("ChannelState") != "4":
            return
        call = self.calls.get(chan.linkedid)
        if call is not None:
            chan.context = msg.get("Context") or chan.context
            chan.exten = msg.get("Exten") or chan.exten
            chan.cid = msg.get("CallerIDNum") or chan.cid
            self._start_call(call, chan)

    def _pickup(self, msg, when):
        """Directed or group pickup: the picker's phone takes the ringing phone's place.
        Its channel still carries its own Linkedid when it enters the bridge, so it is
        moved into the picked call here, as the employee answering it."""
        picker = self._channel(msg, when, create=False)
        target = self._channel(msg, when, "TargetUniqueid", create=False)
        if picker is None or target is None:
            return
        cid = self._cid(msg.get("CallerIDNum"))
        ext = picker.extension or (cid if self.rules.is_extension(cid) else None)
        if ext is None:
            return
        old = self.calls.get(picker.linkedid)
        if old is not None and old.pending_origin == picker.uniqueid:
            old.pending_origin = None
        if picker.linkedid != target.linkedid:
            self._move_channel(picker, target.linkedid, when)
        picker.origin, picker.party, picker.extension = None, False, ext

    def _newcallerid(self, msg, when):
        chan = self._channel(msg, when)
        if chan is None:
            return
        cid = self._cid(msg.get("CallerIDNum"))
        chan.cid = cid
        call = self.calls[chan.linkedid]
        if chan.origin == "phone" and chan.extension is None and self.rules.is_extension(cid):
            chan.extension = cid
            call.placer = call.placer or cid
        elif chan.origin == "trunk" and cid and not call.notified_ringing and call.answered_at is None:
            call.external_number = cid

    def _varset(self, msg, when):
        known = self._variables.get(msg.get("Variable"))
        if known is None:
            return
        chan = self._channel(msg, when)
        if chan is None:
            return
        kind, var, rank = known
        value = msg.get("Value") or ""
        call = self.calls[chan.linkedid]
        if kind == "recording":
            name = self.rules.recording_name(var, value)
            if name and (call._recording_rank is None or rank < call._recording_rank):
                call.recording, call._recording_rank = name, rank
        elif kind == "did":
            if value and value != "s" and chan.origin == "trunk" and (call.did is None or not call.notified_ringing):
                call.did, call.did_from_variable = value, True
        elif kind == "extension":
            if self.rules.is_extension(value):
                chan.on_behalf = value
            if chan.origin == "phone" and self.rules.is_extension(value):
                if chan.extension is None or chan.name.startswith("Local/"):
                    chan.extension = value
                if call.placer is None or call.direction is None:
                    call.placer = value
        elif kind == "call_id":
            if value and re.match(r"^[A-Za-z0-9._\-]{1,100}$", value):
                call.call_id = value
        elif kind == "callback":
            call.callback = value == "1"

    def _dialbegin(self, msg, when):
        dest = self._channel(msg, when, "DestUniqueid")
        if dest is None:
            return
        src = self._channel(msg, when)
        call = self.calls[dest.linkedid]
        if src is not None and src.uniqueid == src.linkedid and not src.origin and not call.originated \
                and call.direction is None and call.pending_origin is None:
            # a root that dials without ever having rung in (no Newstate Ring seen)
            src.cid = self._cid(msg.get("CallerIDNum")) or src.cid
            self._start_call(call, src)
        if src is not None and call.direction is None and self._rings_for_other(src, dest, msg):
            src.cid = self._cid(msg.get("CallerIDNum"))
            call.originated = False
            self._start_call(call, src)
        if src is not None and call.pending_origin == src.uniqueid:
            src.cid = self._cid(msg.get("CallerIDNum")) or src.cid
            self._settle_pending(call, src, dest.extension is not None,
                                 self.rules.dialled_number(msg.get("DialString"), dest.name))
        if src is None and call.direction is None and not any(c.origin for c in call.channels.values()):
            # Dialled by nobody: an AMI Originate (click-to-call) or a call file.
            if dest.extension is not None:
                call.originated = True
        if dest.extension is not None and not dest.origin:
            ext = dest.extension
            if src is not None and src.extension == ext and src.origin == "phone":
                return
            if call.direction is None and any(c.origin == "phone" for c in call.channels.values()):
                call.direction = "internal"
            if ext not in call.rang:
                call.rang.append(ext)
            if call.direction is not None and ext not in call.notified_ringing:
                call.notified_ringing.add(ext)
                self.on_call_event("ringing", call, ext)
            return
        if src is not None and call.direction == "inbound" and src.extension is None \
                and self.rules.is_external_leg(dest.name):
            self._forward(call, src, dest, msg)
            return
        if src is not None and src.extension is not None and self.rules.is_external_leg(dest.name):
            dest.external_leg = True
            if call.direction in (None, "internal") and call.answered_at is None:
                src_is_origin = src.origin == "phone" or call.originated or (
                    call.from_mobile is not None and src.origin == "trunk" and self.rules.mobile_dial_out == "outbound")
                number = self.rules.dialled_number(msg.get("DialString"), src.exten, msg.get("Exten"),
                                                   msg.get("DestExten"), msg.get("DestCallerIDNum"))
                if self.rules.employee_of_number(number) is not None:
                    # a colleague's mobile: no client on this call
                    call.direction = "internal"
                    if call.placer is None:
                        call.placer = src.extension
                elif src_is_origin or call.direction is None:
                    call.direction = "outbound"
                    call.placer = src.extension
                    call.external_number = number
                    for c in call.channels.values():
                        c.party = False
            if call.direction == "outbound":
                dest.party = True
                if call.placer and call.placer not in call.notified_ringing:
                    call.notified_ringing.add(call.placer)
                    self.on_call_event("ringing", call, call.placer)

    def _forward(self, call, src, dest, msg):
        """An inbound call dialled out again: a call forward or follow-me to a mobile, or
        a transfer to an outside number. The employee who forwarded it (AMPUSER, the
        extension it was routed to, the one who had it) stands on the outside leg, so
        that the mobile answering is that employee answering."""
        exten = msg.get("Exten")
        owner = self.rules.employee_of_number(self.rules.dialled_number(msg.get("DialString"), dest.name))
        ext = owner or src.on_behalf or (exten if self.rules.is_extension(exten) else None) or \
            call.talking_with or (call.rang[-1] if call.rang else None)
        if ext is None:
            return
        dest.external_leg = True
        dest.extension = ext
        if ext not in call.rang:
            call.rang.append(ext)
        if ext not in call.notified_ringing:
            call.notified_ringing.add(ext)
            self.on_call_event("ringing", call, ext)

    def _dialend(self, msg, when):
        # Adopting here too: after a reconnect, the events that arrive before the
        # CoreShowChannels answer may be all we ever hear of a call.
        self._channel(msg, when)
        dest = self._channel(msg, when, "DestUniqueid")
        if dest is None:
            return
        status = msg.get("DialStatus") or ""
        dest.dial_status = status
        call = self.calls.get(dest.linkedid)
        if call is None:
            return
        if dest.extension is not None and call.direction == "inbound":
            call.dial_statuses.append(status)
        elif dest.external_leg and call.direction == "outbound":
            call.dial_statuses.append(status)
        elif status == "ANSWER" and dest.extension is not None and call.originated:
            self._group_answered(call, dest)

    def _group_answered(self, call, dest):
        """An originate that rang a ring group first (the callback form, a click-to-call
        to a group): whoever answered there is the employee placing the call."""
        root = call.channels.get(call.linkedid)
        if root is not None and root.pair_key is not None and root.extension != dest.extension:
            root.extension = dest.extension
            call.placer = dest.extension

    # -- bridges and who talks to whom -------------------------------------------
    def _bridgeenter(self, msg, when):
        chan = self._channel(msg, when)
        bridge = msg.get("BridgeUniqueid")
        if chan is None or not bridge:
            return
        self._leave(chan)
        chan.bridge = bridge
        chan.bridged_at = when
        self.bridges.setdefault(bridge, set()).add(chan.uniqueid)
        self._update_talk(self.calls[chan.linkedid], when)

    def _bridgeleave(self, msg, when):
        chan = self._channel(msg, when)
        if chan is None:
            return
        self._leave(chan)

    def _leave(self, chan):
        if chan.bridge is not None:
            members = self.bridges.get(chan.bridge)
            if members is not None:
                members.discard(chan.uniqueid)
                if not members:
                    del self.bridges[chan.bridge]
            chan.bridge = None

    def _bridgemerge(self, msg, when):
        src = msg.get("FromBridgeUniqueid")
        dst = msg.get("ToBridgeUniqueid")
        moved = self.bridges.pop(src, None) if src else None
        if not moved or not dst:
            return
        target = self.bridges.setdefault(dst, set())
        touched = set()
        for uid in moved:
            chan = self.channels.get(uid)
            if chan is not None:
                chan.bridge = dst
                chan.bridged_at = when
                target.add(uid)
                touched.add(chan.linkedid)
        for linkedid in touched:
            call = self.calls.get(linkedid)
            if call is not None:
                self._update_talk(call, when)

    def _component(self, start):
        """Channels joined to start through bridges and the halves of Local channels."""
        seen = {start.uniqueid}
        todo = [start]
        while todo:
            chan = todo.pop()
            linked = []
            if chan.bridge is not None:
                linked.extend(self.bridges.get(chan.bridge, ()))
            if chan.pair_key is not None:
                linked.extend(self.local_pairs.get(chan.pair_key, ()))
            for uid in linked:
                if uid not in seen:
                    other = self.channels.get(uid)
                    if other is not None and other.hungup_at is None:
                        seen.add(uid)
                        todo.append(other)
        return seen

    def _update_talk(self, call, when):
        if call.direction is None:
            return
        best = None
        for party in call.channels.values():
            # The party itself may be outside any bridge while the other half of its
            # Local channel is in one (a trunk simulated or routed through Local).
            if not party.party or party.hungup_at is not None or (
                    party.bridge is None and party.pair_key is None):
                continue
            for uid in self._component(party):
                chan = self.channels[uid]
                if chan.party or chan.extension is None:
                    continue
                if chan.origin == "phone" and call.direction != "outbound":
                    continue
                key = (chan.bridged_at is not None, chan.bridged_at or 0)
                if best is None or key > best[0]:
                    best = (key, chan)
        if best is None:
            return
        chan = best[1]
        ext = chan.extension
        if call.direction == "outbound":
            ext = chan.extension if chan.origin != "phone" else (call.placer or chan.extension)
        if call.answered_at is None:
            call.answered_at = when
            call.answered_by = ext
            call.talking_with = ext
            call.ended_with = ext
            self.on_call_event("answered", call, ext)
            return
        if ext == call.talking_with:
            return
        previous = call.talking_with
        call.talking_with = ext
        call.ended_with = ext
        pending = call.pending_transfer
        if pending is not None:
            call.pending_transfer = None
            call.transfers.append(collections.OrderedDict(
                [("type", pending[0]), ("from", pending[1] or previous), ("to", ext)]))
        self.on_call_event("transferred", call, ext)

    def _record_transfer(self, call, kind, transferer_ext, target_ext):
        """Transfer events come before or after the bridge change they cause."""
        if call.talking_with is not None and call.talking_with != transferer_ext \
                and call.talking_with is not None and transferer_ext is not None \
                and (not call.transfers or call.transfers[-1]["to"] != call.talking_with):
            call.transfers.append(collections.OrderedDict(
                [("type", kind), ("from", transferer_ext), ("to", call.talking_with)]))
            return
        call.pending_transfer = (kind, transferer_ext, target_ext)

    def _blindtransfer(self, msg, when):
        if (msg.get("Result") or "Success") != "Success":
            return
        chan = self._channel(msg, when, "TransfererUniqueid", create=False) or \
            self._channel(msg, when, "TransfereeUniqueid", create=False)
        if chan is None:
            return
        call = self.calls[chan.linkedid]
        transferer = self.channels.get(msg.get("TransfererUniqueid") or "")
        target = msg.get("Extension")
        self._record_transfer(call, "blind", transferer.extension if transferer else None,
                              target if self.rules.is_extension(target) else None)

    def _attendedtransfer(self, msg, when):
        if (msg.get("Result") or "Success") != "Success":
            return
        transferer = self.channels.get(msg.get("OrigTransfererUniqueid") or "")
        chan = transferer or self.channels.get(msg.get("TransfereeUniqueid") or "")
        if chan is None:
            return
        call = self.calls.get(chan.linkedid)
        if call is None:
            return
        target = self.channels.get(msg.get("TransferTargetUniqueid") or "")
        self._record_transfer(call, "attended", transferer.extension if transferer else None,
                              target.extension if target else None)

    # -- the end ------------------------------------------------------------------
    def _rename(self, msg, when):
        chan = self._channel(msg, when, create=False)
        if chan is not None and msg.get("Newname"):
            chan.name = msg.get("Newname")

    def _hangup(self, msg, when):
        chan = self._channel(msg, when)
        if chan is None:
            return
        self._hangup_channel(chan, when)

    def _hangup_channel(self, chan, when):
        chan.hungup_at = when
        self._gone.add(chan.uniqueid)
        self._gone_order.append(chan.uniqueid)
        if len(self._gone_order) > self.GONE_KEPT:
            self._gone.discard(self._gone_order.popleft())
        self._leave(chan)
        self.channels.pop(chan.uniqueid, None)
        if chan.pair_key is not None:
            pair = self.local_pairs.get(chan.pair_key)
            if pair is not None:
                pair.discard(chan.uniqueid)
                if not pair:
                    del self.local_pairs[chan.pair_key]
        call = self.calls.get(chan.linkedid)
        if call is None:
            return
        if all(c.hungup_at is not None for c in call.channels.values()):
            del self.calls[call.linkedid]
            self._finish(call, when)
        elif chan.party:
            self._update_talk(call, when)

    def _finish(self, call, when):
        parties = [c.hungup_at for c in call.channels.values() if c.party and c.hungup_at is not None]
        call.ended_at = max(parties) if parties else when
        if call.pending_transfer is not None and call.answered_at is not None:
            kind, src, dst = call.pending_transfer
            if dst and dst != call.talking_with:
                call.transfers.append(collections.OrderedDict(
                    [("type", kind), ("from", src or call.talking_with), ("to", dst)]))
            call.pending_transfer = None
        pending = call.channels.get(call.pending_origin) if call.pending_origin else None
        if pending is not None:
            self._settle_pending(call, pending, not self.rules.is_external_number(pending.exten))
        if call.direction is None:
            # A phone that dialled nothing reachable: outbound when the number was external.
            origin = next((c for c in call.channels.values() if c.origin == "phone"), None)
            if origin is not None and self.rules.is_external_number(origin.exten):
                call.direction = "outbound"
                call.external_number = origin.exten
            elif origin is not None:
                call.direction = "internal"
        if call.direction is None and call.originated and call.rang and call.call_id is None:
            # Another AMI client's click-to-call that the phone never answered: the
            # number it was for is only in its OriginateResponse, before or after this.
            root = call.channels.get(call.linkedid)
            if root is not None:
                key = _CHANNEL_SUFFIX.sub("", root.name.rsplit(";", 1)[0] if root.pair_key else root.name)
                self._match_originate(key, call=call, when=when)
            return
        if call.direction is None:
            return  # nothing a CRM could use: helper channels, failed originates
        self.on_call_event("ended", call, None)

    def _originate_response(self, msg, when):
        number = msg.get("Exten")
        if msg.get("Response") == "Failure" and self.rules.is_external_number(number):
            self._match_originate(msg.get("Channel") or "", number=number, when=when)

    def _match_originate(self, key, call=None, number=None, when=None):
        """Pairs an unanswered originated call with its failed OriginateResponse, which
        Asterisk sends before or after the call's Hangups (matched by channel name)."""
        other = self._unanswered_originates.pop(key, None)
        if other is None or (when is not None and other[2] is not None and abs(when - other[2]) > 60):
            self._unanswered_originates[key] = (call, number, when)
            while len(self._unanswered_originates) > 1000:
                self._unanswered_originates.popitem(last=False)
            return
        call = call or other[0]
        number = number or other[1]
        if call is None or number is None:
            return
        call.direction = "outbound"
        call.placer = call.rang[0]
        call.external_number = number
        call.dial_statuses.append("NOANSWER")
        self.on_call_event("ended", call, None)

    # -- housekeeping ---------------------------------------------------------------
    def expire(self, now):
        """Close calls whose Hangup was lost; keeps memory bounded over months."""
        limit = now - self.rules.call_max_seconds
        for call in [c for c in self.calls.values() if c.last_event_at is not None
                     and c.last_event_at < limit]:
            call.expired = True
            log.warning("call %s: no AMI event for %.0f h, closing it", call.linkedid,
                        self.rules.call_max_seconds / 3600.0)
            self.close_call(call.linkedid, call.last_event_at)

    def close_call(self, linkedid, when):
        """Hang up what is left of a call whose end was never reported."""
        call = self.calls.get(linkedid)
        if call is not None:
            for chan in list(call.channels.values()):
                if chan.hungup_at is None:
                    self._hangup_channel(chan, when)

    def resync(self, channels, now, gone_at=None):
        """Align with CoreShowChannels after a reconnect: channels that vanished while we
        were away are hung up, channels we never saw are adopted with their bridges."""
        present = {}
        for msg in channels:
            uid = msg.get("Uniqueid")
            if uid:
                present[uid] = msg
        for chan in [c for c in self.channels.values() if c.uniqueid not in present]:
            call = self.calls.get(chan.linkedid)
            if call is not None:
                call.gap = True
            self._hangup_channel(chan, gone_at if gone_at is not None else now)
        for uid, msg in sorted(present.items(), key=lambda kv: _uniqueid_order(kv[0])):
            if uid in self.channels:
                continue
            started = now - _duration_seconds(msg.get("Duration"))
            self._add_channel(uid, msg.get("Channel"), msg.get("Linkedid") or uid, started,
                              msg.get("Context"), msg.get("Exten"), msg.get("CallerIDNum"),
                              msg.get("ChannelState"), adopted=True)
        for uid, msg in present.items():
            bridge = msg.get("BridgeId") or msg.get("BridgeUniqueid")
            chan = self.channels.get(uid)
            if chan is not None and bridge and chan.bridge != bridge:
                self._leave(chan)
                chan.bridge = bridge
                chan.bridged_at = now
                self.bridges.setdefault(bridge, set()).add(uid)
        for call in list(self.calls.values()):
            if gone_at is not None:
                call.gap = True   # up across the disconnect
            self._update_talk(call, now)


def _uniqueid_order(uid):
    try:
        head, _, tail = uid.partition(".")
        return (int(head), int(tail or 0))
    except ValueError:
        return (0, 0)


def _duration_seconds(text):
    """CoreShowChannel's Duration is HH:MM:SS."""
    try:
        h, m, s = (int(x) for x in (text or "").split(":"))
        return h * 3600 + m * 60 + s
    except ValueError:
        return 0


###############################################################################
# PBX discovery ###############################################################
###############################################################################
# Which endpoints are trunks and which are phones, asked of Asterisk itself
# (PJSIP, chan_sip, IAX2) at connect and every few minutes, so that a PBX with its
# own context names works with an empty [pbx] section. What is learned lands in
# PbxRules.endpoints; [pbx] trunk_channels and the context rules stay overrides.

class Endpoint(object):
    __slots__ = ("device", "kind", "why")

    def __init__(self, device, kind, why):
        self.device = device    # 'PJSIP/trunk-operator', as channel names start
        self.kind = kind        # 'trunk', 'phone' or None (could not tell)
        self.why = why

    def as_dict(self):
        return collections.OrderedDict([("device", self.device), ("kind", self.kind), ("why", self.why)])


def classify_pjsip(endpoints, registrations, rules):
    """EndpointList events + OutboundRegistrationDetail events -> [Endpoint]."""
    registered_auths = set()
    registered_names = set()
    for reg in registrations:
        for auth in comma_list(reg.get("OutboundAuth") or ""):
            registered_auths.add(auth)
        if reg.get("Endpoint"):
            registered_names.add(reg.get("Endpoint"))
    out = []
    for ep in endpoints:
        name = ep.get("ObjectName") or ""
        if not name:
            continue
        auths = comma_list(ep.get("Auths") or "")
        outbound = comma_list(ep.get("OutboundAuths") or "")
        static = any("/" in c for c in comma_list(ep.get("Contacts") or ""))
        if name in registered_names or registered_auths & set(outbound):
            kind, why = "trunk", say("registers to a provider (outbound registration)")
        elif outbound and not auths:
            kind, why = "trunk", say("authenticates to the far end (outbound_auth), not to us")
        elif rules.is_extension(name) and (auths or not static):
            kind, why = "phone", say("extension-shaped name, logs in to us (auth)") if auths else say("extension-shaped name")
        elif auths and not outbound:
            kind, why = "phone", say("logs in to us (auth) and has no outbound auth")
        elif static and not auths:
            kind, why = "trunk", say("a fixed remote contact and no login")
        else:
            kind, why = None, say("no sign either way; the [pbx] rules decide")
        out.append(Endpoint("PJSIP/" + name, kind, why))
    return out


def classify_peers(tech, peers, registry, rules):
    """SIPpeers / IAXpeerlist PeerEntry events (+ SIPshowregistry) -> [Endpoint]."""
    hosts = set(r.get("Host") for r in registry if r.get("Host"))
    users = set(r.get("Username") for r in registry if r.get("Username"))
    out = []
    for peer in peers:
        name = peer.get("ObjectName") or ""
        if not name:
            continue
        dynamic = (peer.get("Dynamic") or "").lower() == "yes"
        address = peer.get("IPaddress") or ""
        if name in users or (address and address in hosts):
            kind, why = "trunk", say("registers to a provider (register =>)")
        elif rules.is_extension(name):
            kind, why = "phone", say("extension-shaped name (host=dynamic)") if dynamic else say("extension-shaped name")
        elif not dynamic:
            kind, why = "trunk", say("a fixed host (%s) and not an extension", address or "static")
        else:
            kind, why = None, say("registers to us but is not extension-shaped; the [pbx] rules decide")
        out.append(Endpoint("%s/%s" % (tech, name), kind, why))
    return out


class PbxDiscovery(Worker):
    """Asks Asterisk for its endpoints whenever AMI is up, then every interval."""

    thread_name = "discovery"
    # (channel driver, list action, its item event, [(helper action, its item event)])
    DRIVERS = (("PJSIP", "PJSIPShowEndpoints", "EndpointList",
                [("PJSIPShowRegistrationsOutbound", "OutboundRegistrationDetail")]),
               ("SIP", "SIPpeers", "PeerEntry", [("SIPshowregistry", "RegistryEntry")]),
               ("IAX2", "IAXpeerlist", "PeerEntry", []))

    def __init__(self, conn, rules, interval):
        Worker.__init__(self)
        self.conn = conn
        self.rules = rules
        self.interval = interval
        self.learned = []
        self.learned_at = None
        self._refused = set()

    def run(self):
        while not self._stop.is_set():
            if self.conn.connected.wait(1.0) and not self._stop.is_set():
                try:
                    self.discover()
                except AmiError as exc:
                    log.warning("PBX discovery: %s", exc)
                except Exception:
                    log.exception("PBX discovery failed")
            self._wake.wait(self.interval)
            self._wake.clear()

    def _list(self, action, item):
        """The item events of a list action; None when the driver is absent or refused."""
        try:
            pending = self.conn.action(action, timeout=10.0)
        except AmiActionFailed as exc:
            message = (exc.response.get("Message") or "") if exc.response is not None else ""
            if "ermission" in message and action not in self._refused:
                self._refused.add(action)
                log.warning("PBX discovery: the AMI user may not run %s (%s); trunks and phones are "
                            "told apart by the [pbx] rules and channel names instead", action, message)
            return None
        return [e for e in pending.events if e.name == item]

    def discover(self):
        found = []
        for tech, action, item, helpers in self.DRIVERS:
            listed = self._list(action, item)
            if listed is None:
                continue
            extra = []
            for helper, helper_item in helpers:
                extra.extend(self._list(helper, helper_item) or [])
            if tech == "PJSIP":
                found.extend(classify_pjsip(listed, extra, self.rules))
            else:
                found.extend(classify_peers(tech, listed, extra, self.rules))
        changed = [e.as_dict() for e in found] != [e.as_dict() for e in self.learned]
        self.learned, self.learned_at = found, time.time()
        # one assignment: the reader thread sees the old map or the new one, never half
        self.rules.endpoints = dict((e.device, e.kind) for e in found if e.kind)
        if changed:
            trunks = [e.device for e in found if e.kind == "trunk"]
            phones = [e.device for e in found if e.kind == "phone"]
            log.info("PBX discovery: %d trunk(s) %s, %d phone(s), %d unclassified", len(trunks),
                     ", ".join(trunks[:10]), len(phones), len(found) - len(trunks) - len(phones))
        return found


###############################################################################
# Bitrix24 ####################################################################
###############################################################################
# The REST client: webhook or local-application OAuth, JSON bodies, a client-side
# leaky bucket that mirrors the portal's, batch, and errors classified the way
# the portal means them (see ../shared/docs/bitrix24-rest.md, section 3).

class BitrixError(Exception):
    """A request that Bitrix24 did not carry out."""

    # Whether the portal may have carried the request out although no answer came.
    maybe_done = False

    def __init__(self, message, code="", description="", status=None, method=None):
        Exception.__init__(self, message)
        self.code = code
        self.description = description
        self.status = status
        self.method = method


class BitrixUnavailable(BitrixError):
    """Timeout, connection error, 5xx: retry later. Unless the connection was never
    made, the portal may have done the work and only the answer was lost."""

    def __init__(self, message, maybe_done=True, **kw):
        BitrixError.__init__(self, message, **kw)
        self.maybe_done = maybe_done


class BitrixRateLimited(BitrixError):
    """503 QUERY_LIMIT_EXCEEDED: the portal's bucket is full; retry with back-off."""


class BitrixMethodLimited(BitrixError):
    """429 OPERATION_TIME_LIMIT: this method only is suspended for a while."""


class BitrixAuthExpired(BitrixError):
    """401 expired_token / invalid_token: refresh the OAuth token once and repeat."""


class BitrixOverloaded(BitrixError):
    """503 OVERLOAD_LIMIT: REST blocked by Bitrix24 support; stop and alert."""


class BitrixRejected(BitrixError):
    """The request itself is wrong or not allowed; retrying cannot help (park it)."""


class BitrixAuthFailed(BitrixRejected):
    """Wrong webhook/app credentials, missing scope, wrong auth type: reconfigure."""


_AUTH_FAILURES = {"NO_AUTH_FOUND", "INVALID_CREDENTIALS", "authorization_error", "insufficient_scope",
                  "invalid_scope", "WRONG_AUTH_TYPE", "ACCESS_DENIED", "user_access_error",
                  "PAYMENT_REQUIRED", "METHOD_CONFIRM_WAITING", "METHOD_CONFIRM_DENIED", "ERROR_OAUTH",
                  "APPLICATION_NOT_FOUND", "invalid_grant", "invalid_client", "PORTAL_DELETED",
                  "WRONG_LICENSE"}
_ADVICE = {
    "WRONG_AUTH_TYPE": "this portal refuses webhooks for telephony methods: configure a local "
                       "application ([bitrix24] portal_url, client_id, client_secret)",
    "insufficient_scope": "add the scopes telephony, crm, user, task to the webhook/application",
    "invalid_scope": "add the scopes telephony, crm, user, task to the webhook/application",
    "NO_AUTH_FOUND": "check [bitrix24] webhook_url (the code may have changed)",
    "INVALID_CREDENTIALS": "check [bitrix24] webhook_url and the webhook user's rights",
    "invalid_grant": "the application's tokens are no longer valid: reinstall the application "
                     "or run bx24ast.py oauth-code",
}


def classify_error(status, body, method=None):
    """The exception that says what to do about a failed REST answer."""
    code = ""
    description = ""
    if isinstance(body, dict):
        code = str(body.get("error") or "")
        description = str(body.get("error_description") or "")
    text = "%s %s" % (code, description)
    message = say("Bitrix24 %s: %s", method or "request", "%s%s" % (
        code or "HTTP %s" % status, (": " + description) if description else ""))
    if code in _ADVICE:
        message = say("%s (%s)", message, say(_ADVICE[code]))
    kw = dict(code=code, description=description, status=status, method=method)
    if code == "QUERY_LIMIT_EXCEEDED":
        return BitrixRateLimited(message, **kw)
    if code == "OPERATION_TIME_LIMIT" or status == 429:
        return BitrixMethodLimited(message, **kw)
    if code == "OVERLOAD_LIMIT":
        return BitrixOverloaded(message, **kw)
    if code in ("expired_token", "invalid_token"):
        return BitrixAuthExpired(message, **kw)
    if code in _AUTH_FAILURES:
        return BitrixAuthFailed(message, **kw)
    if status is not None and (status >= 500 or status in (408, 425)):
        return BitrixUnavailable(message, **kw)
    if code in ("INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER") or "Unexpected database error" in text:
        return BitrixUnavailable(message, **kw)
    return BitrixRejected(message, **kw)


def php_query(data, prefix=None):
    """PHP http_build_query: what Bitrix24 parses inside batch commands."""
    quote_plus = urllib.parse.quote_plus
    out = []

    def walk(value, name):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, "%s[%s]" % (name, k) if name else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, "%s[%d]" % (name, i) if name else str(i))
        else:
            if value is None:
                value = ""
            elif value is True:
                value = "1"
            elif value is False:
                value = "0"
            value = str(value)
            # A batch reference must reach the portal as written to be substituted.
            encoded = value if value.startswith("$result[") else quote_plus(value)
            out.append(quote_plus(name, safe="[]") + "=" + encoded)
    walk(data, prefix)
    return "&".join(out)


class LeakyBucket(object):
    """The portal's limit, mirrored: each request adds 1, the level drains at rate/s,
    and a request that would overflow capacity waits instead of earning a 503."""

    def __init__(self, rate=2.0, capacity=50, clock=None):
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.clock = clock or monotonic
        self.level = 0.0
        self.updated = self.clock()
        self.lock = threading.Lock()

    def _drain(self, now):
        self.level = max(0.0, self.level - (now - self.updated) * self.rate)
        self.updated = now

    def delay(self):
        """Seconds to wait before one more request fits."""
        with self.lock:
            self._drain(self.clock())
            over = self.level + 1.0 - self.capacity
            return over / self.rate if over > 0 else 0.0

    def take(self):
        """Reserve one request; returns how long to wait before sending it."""
        with self.lock:
            now = self.clock()
            self._drain(now)
            wait = max(0.0, (self.level + 1.0 - self.capacity) / self.rate)
            self.level += 1.0
            return wait

    def fill(self):
        with self.lock:
            self._drain(self.clock())
            return self.level / self.capacity

    def snapshot(self):
        """The level with the wall time it was read at: what a restart starts from."""
        with self.lock:
            self._drain(self.clock())
            return {"level": round(self.level, 3), "at": time.time()}

    def restore(self, snapshot):
        """Start from a saved level, drained for the time since (a clock that went back
        drains nothing; one far ahead has drained it all)."""
        try:
            level, at = float(snapshot["level"]), float(snapshot["at"])
        except (KeyError, TypeError, ValueError):
            return
        with self.lock:
            self.level = min(self.capacity, max(0.0, level - max(0.0, time.time() - at) * self.rate))
            self.updated = self.clock()


def mask_webhook(url):
    """An inbound webhook's address without its secret code (logs, the wizard)."""
    return re.sub(r"/rest/(\d+)/[^/]+/?", r"/rest/\1/***/", url or "")


class BitrixClient(object):
    """Calls Bitrix24 REST methods through a webhook or a local application."""

    TOKENS_KEY = "bitrix24.oauth"

    def __init__(self, webhook_url="", portal_url="", client_id="", client_secret="",
                 oauth_url="https://oauth.bitrix.info/oauth/token/", store=None, verify_tls=True,
                 timeout=15.0, rate=2.0, burst=50, sleep=time.sleep):
        self.webhook_url = webhook_url
        self.portal_url = portal_url
        self.client_id = client_id
        self.client_secret = client_secret
        self.oauth_url = oauth_url
        self.store = store
        self.timeout = timeout
        # A little under the portal's numbers: network jitter bunches requests up on
        # arrival, and a 503 costs far more than the margin.
        self.bucket = LeakyBucket(rate * 0.95, max(1, burst - max(2, burst // 10)))
        self.sleep = sleep
        self.verify_tls = verify_tls
        self._built_opener = None
        self._refresh_lock = threading.Lock()
        self.may_refresh = True
        self.requests_sent = 0
        self.answers = collections.Counter()   # (method, "200" or the error code) -> answers (metrics)
        self.last_error = None
        self.last_answer_at = None   # wall time of the last request the portal carried out
        self._saved_level = None
        if store is not None:
            # the portal's bucket did not empty because we restarted
            self.bucket.restore(store.get_setting(self.BUCKET_KEY) or {})

    BUCKET_KEY = "bitrix24.bucket"

    def save_bucket(self):
        """Keep the bucket's level in the state store (every few seconds and at stop)."""
        if self.store is None:
            return
        snap = self.bucket.snapshot()
        if snap["level"] != self._saved_level:
            self.store.set_setting(self.BUCKET_KEY, snap)
            self._saved_level = snap["level"]

    @classmethod
    def from_config(cls, config, store=None):
        b24 = config.section("bitrix24")
        return cls(b24["webhook_url"], b24["portal_url"], b24["client_id"], b24["client_secret"],
                   b24["oauth_url"], store, b24["verify_tls"], b24["timeout"], b24["rate"], b24["burst"])

    @staticmethod
    def configured(config):
        b24 = config.section("bitrix24")
        return bool(b24["webhook_url"] or (b24["portal_url"] and b24["client_id"]))

    @property
    def uses_oauth(self):
        return not self.webhook_url

    @property
    def _opener(self):
        """Built at the first request, with a TLS context only when some address is https:
        loading the CA store costs ~20 ms that `check --cron` on a plain-http portal need not pay."""
        if self._built_opener is None:
            import urllib.request   # and http.client, email: only once a request is made

            class NoRedirect(urllib.request.HTTPRedirectHandler):
                """urllib would follow a 302 of a POST with a GET and drop the body (a renamed
                portal answers 302): redirects are handled in _http."""

                def redirect_request(self, req, fp, code, msg, headers, newurl):
                    return None

            handlers = [NoRedirect()]
            urls = [self.webhook_url] if self.webhook_url else [self.portal_url, self.oauth_url]
            if any((u or "").lower().startswith("https:") for u in urls):
                import ssl
                context = ssl.create_default_context()
                if not self.verify_tls:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                handlers.append(urllib.request.HTTPSHandler(context=context))
            self._built_opener = urllib.request.build_opener(*handlers)
        return self._built_opener

    def describe(self):
        """Where requests go, without the secret part."""
        if self.webhook_url:
            return mask_webhook(self.webhook_url)
        return "%s (local application %s)" % (self.portal_url, self.client_id)

    # -- tokens ---------------------------------------------------------------------------
    def tokens(self):
        return (self.store.get_setting(self.TOKENS_KEY) if self.store else None) or {}

    def save_tokens(self, tokens):
        """Store the tokens from ONAPPINSTALL, the code exchange or a refresh."""
        keep = self.tokens()
        for key in ("access_token", "refresh_token", "expires", "expires_in", "client_endpoint",
                    "server_endpoint", "member_id", "domain", "application_token", "scope", "user_id"):
            if tokens.get(key) not in (None, ""):
                keep[key] = tokens[key]
        if self.store is None:
            raise BitrixAuthFailed("Bitrix24: no state store to keep OAuth tokens in")
        self.store.set_setting(self.TOKENS_KEY, keep)
        return keep

    def _oauth_request(self, params):
        url = self.oauth_url + ("&" if "?" in self.oauth_url else "?") + urllib.parse.urlencode(params)
        status, body = self._http("GET", url, None, None, "oauth")
        if status != 200 or not isinstance(body, dict) or "access_token" not in body:
            raise classify_error(status, body, "oauth")
        return self.save_tokens(body)

    def exchange_code(self, code):
        """First tokens from an authorization code (bx24ast.py oauth-code CODE)."""
        return self._oauth_request({"grant_type": "authorization_code", "client_id": self.client_id,
                                    "client_secret": self.client_secret, "code": code})

    def install(self, auth):
        """ONAPPINSTALL: the portal POSTs the first tokens. They are kept only once
        app.info, asked at the configured portal (never at an address from the POST),
        accepts them as this application's: a forged POST cannot plant tokens."""
        if not self.uses_oauth or not self.portal_url:
            raise BitrixAuthFailed("ONAPPINSTALL needs a local application ([bitrix24] portal_url, client_id)")
        auth = auth if isinstance(auth, dict) else {}
        if not auth.get("access_token") or not auth.get("refresh_token"):
            raise BitrixRejected("ONAPPINSTALL without auth[access_token] and auth[refresh_token]")
        endpoint = self.portal_url + "rest/"
        status, answer = self._http("POST", endpoint + "app.info",
                                    json.dumps({"auth": auth["access_token"]}).encode("utf-8"),
                                    "application/json", "app.info")
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("result"), dict):
            raise classify_error(status, answer, "app.info")
        code = answer["result"].get("CODE")
        if code and self.client_id and code != self.client_id:
            raise BitrixRejected("ONAPPINSTALL tokens belong to application %s, not [bitrix24] client_id %s"
                                 % (code, self.client_id))
        tokens = dict((k, v) for k, v in auth.items() if isinstance(v, str))
        tokens["client_endpoint"] = endpoint
        log.info("Bitrix24: the local application was installed on %s; tokens saved", self.portal_url)
        return self.save_tokens(tokens)

    def refresh(self, stale_access_token=None):
        """One refresh at a time: each refresh replaces the refresh token, so two
        concurrent refreshes would leave one of them holding a dead token."""
        with self._refresh_lock:
            current = self.tokens()
            if stale_access_token and current.get("access_token") != stale_access_token:
                return current  # another thread refreshed meanwhile
            if not current.get("refresh_token"):
                raise BitrixAuthFailed("Bitrix24: no OAuth tokens yet: install the local application "
                                       "on the portal or run bx24ast.py oauth-code CODE")
            log.info("Bitrix24: refreshing the OAuth access token")
            return self._oauth_request({"grant_type": "refresh_token", "client_id": self.client_id,
                                        "client_secret": self.client_secret,
                                        "refresh_token": current["refresh_token"]})

    # -- transport -------------------------------------------------------------------------
    def _http(self, verb, url, data, content_type, method):
        import urllib.error
        import urllib.request
        headers = {"Accept": "application/json", "User-Agent": "bx24ast/%s" % __version__}
        if content_type:
            headers["Content-Type"] = content_type
        for _hop in range(3):
            req = urllib.request.Request(url, data=data, headers=headers, method=verb)
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    status, raw = resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                status, raw = exc.code, exc.read()
                if status in (301, 302, 303, 307, 308) and exc.headers.get("Location"):
                    new = exc.headers["Location"]
                    log.warning("Bitrix24: the portal moved to %s; following with the same body",
                                mask_webhook(new.split("?")[0]))
                    url = new
                    continue
            except (urllib.error.URLError, OSError, socket.timeout) as exc:
                reason = getattr(exc, "reason", exc)
                # Refused or unresolvable: nothing reached the portal, so nothing was done.
                never_sent = isinstance(reason, (ConnectionRefusedError, socket.gaierror))
                raise BitrixUnavailable(say("Bitrix24 %s: cannot reach the portal: %s", method, reason),
                                        maybe_done=not never_sent, method=method)
            except Exception as exc:  # http.client.IncompleteRead, RemoteDisconnected...
                raise BitrixUnavailable(say("Bitrix24 %s: connection failed: %s", method, exc), method=method)
            try:
                body = json.loads(raw.decode("utf-8")) if raw else None
            except (ValueError, UnicodeDecodeError):
                body = None
                if status == 200:
                    raise BitrixUnavailable(say("Bitrix24 %s: the answer is not JSON", method),
                                            status=status, method=method)
            return status, body
        raise BitrixUnavailable(say("Bitrix24 %s: too many redirects", method), method=method)

    def _endpoint(self, method):
        if self.webhook_url:
            return self.webhook_url + method, None
        tokens = self.tokens()
        if not tokens.get("access_token"):
            raise BitrixAuthFailed(say("Bitrix24: no OAuth tokens yet: install the local application on "
                                       "the portal or run bx24ast.py oauth-code CODE"), method=method)
        base = tokens.get("client_endpoint") or (self.portal_url + "rest/")
        return base + method, tokens["access_token"]

    def call(self, method, params=None, wait=True):
        """The result of one method; raises a BitrixError subclass."""
        params = dict(params or {})
        for attempt in (1, 2):
            url, token = self._endpoint(method)
            body = dict(params)
            if token:
                body["auth"] = token
            if not wait and self.bucket.delay() > 0:
                raise BitrixRateLimited("Bitrix24 %s: local rate limit reached" % method, method=method)
            delay = self.bucket.take()
            if delay > 0:
                self.sleep(delay)
            self.requests_sent += 1
            try:
                status, answer = self._http("POST", url, json.dumps(body).encode("utf-8"),
                                            "application/json", method)
            except BitrixUnavailable:
                self.answers[(method, "unreachable")] += 1
                raise
            if status == 200 and isinstance(answer, dict) and "result" in answer and "error" not in answer:
                self.last_error = None
                self.last_answer_at = time.time()
                self.answers[(method, "200")] += 1
                return answer["result"]
            error = classify_error(status, answer, method)
            self.answers[(method, error.code or "HTTP %s" % status)] += 1
            if isinstance(error, BitrixAuthExpired) and self.uses_oauth and attempt == 1 and self.may_refresh:
                self.refresh(token)
                continue
            self.last_error = error
            raise error

    def batch(self, commands, halt=False):
        """commands: [(key, method, params)], at most 50. Returns (results, errors) by key;
        a later command may reference an earlier one's result as "$result[key][FIELD]"."""
        if len(commands) > 50:
            raise ValueError("a Bitrix24 batch takes at most 50 commands")
        cmd = collections.OrderedDict()
        for key, method, params in commands:
            cmd[key] = "%s?%s" % (method, php_query(params))
        result = self.call("batch", {"halt": 1 if halt else 0, "cmd": cmd})
        results = result.get("result") if isinstance(result, dict) else None
        errors = result.get("result_error") if isinstance(result, dict) else None
        results = results if isinstance(results, dict) else {}
        errors = errors if isinstance(errors, dict) else {}
        for key, method, _params in commands:
            if key in errors:
                error = errors[key]
                self.answers[(method, str(error.get("error") or "error") if isinstance(error, dict) else "error")] += 1
            elif key in results:
                self.answers[(method, "200")] += 1
        return results, errors

    def upload(self, url, field, filename, content):
        """The second step of attachRecord: a multipart POST of the raw file."""
        boundary = "bx24ast%s" % hashlib.md5(content[:4096] + filename.encode()).hexdigest()
        body = b"".join([
            ("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
             "Content-Type: application/octet-stream\r\n\r\n" % (boundary, field, filename)).encode(),
            content, ("\r\n--%s--\r\n" % boundary).encode()])
        delay = self.bucket.take()
        if delay > 0:
            self.sleep(delay)
        self.requests_sent += 1
        status, answer = self._http("POST", url, body, "multipart/form-data; boundary=%s" % boundary,
                                    "attachRecord upload")
        if status == 200 and isinstance(answer, dict) and "result" in answer:
            return answer["result"]
        raise classify_error(status, answer, "attachRecord upload")


###############################################################################
# Hooks #######################################################################
###############################################################################
# An office's own rules without patching bx24ast.py: [hooks] file is a Python file
# whose functions, when present, are called at fixed points with plain dicts and
# return a changed dict or a decision. A hook that raises, returns what it should
# not or runs past [hooks] timeout_ms is logged once by name and the call goes on
# as if it were absent: a broken hook never loses a call.

# name -> (what it is given, what it returns); the README and hooks.example.py say more.
HOOK_POINTS = collections.OrderedDict([
    ("need_registration", ("call", "True to report the call, False to leave it out")),
    ("process_client_phone", ("number, call", "the client's number to search and register")),
    ("process_user_phone", ("extension, call", "the extension to find the Bitrix24 user by")),
    ("process_registration_params", ("params, call", "telephony.externalcall.register parameters")),
    ("customize_show_call_card", ("params, call", "telephony.externalcall.show parameters, or False: not shown")),
    ("process_final_params", ("params, call", "telephony.externalcall.finish parameters")),
    ("process_task_creation_params", ("fields, call", "tasks.task.add fields, or False: no task")),
    ("customize_missed_call_responsible", ("user_id, call", "the Bitrix24 user ID for a missed call's task and finish")),
    ("process_record_file_path", ("path, call", "the recording's path, or an http(s) URL the portal downloads")),
    ("process_originate_params", ("params, click", "the click-to-call Originate: Channel, Context, Exten, CallerID")),
    ("customize_autodistribution", ("result, caller", "the routing answer: extension, user_id, status")),
    ("post_registration", ("result, call", "REST requests to queue after the register: [[method, params], ...]")),
    ("post_finish", ("result, call", "REST requests to queue after the finish: [[method, params], ...]")),
])

# The outbox request kinds whose parameters a hook may change before they are sent.
HOOKED_REQUESTS = {"register": "process_registration_params", "show": "customize_show_call_card",
                   "finish": "process_final_params", "task": "process_task_creation_params"}
SKIPPABLE = frozenset(("customize_show_call_card", "process_task_creation_params"))


class HookSkipped(Exception):
    """A hook said a request is not to be sent (a card not shown, no task)."""


class Hooks(object):
    """The admin's hooks file, loaded once; call(name, value, *context) runs a hook."""

    def __init__(self, path="", timeout=0.5):
        self.path = path
        self.timeout = timeout
        self.functions = {}
        self.load_error = None
        self.errors = collections.Counter()   # hook name -> failures (metrics)
        self.calls = collections.Counter()
        self.journal = None                   # a list to note every change in (hooks test)
        self._told = set()
        self._stuck = {}   # hook name -> the thread of a call that never came back
        self._lock = threading.Lock()
        if path:
            self._load(path)

    @classmethod
    def from_config(cls, config):
        return cls(config.get("hooks", "file"), config.get("hooks", "timeout_ms") / 1000.0)

    def _load(self, path):
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            namespace = {"__name__": "bx24ast_hooks", "__file__": path, "log": logging.getLogger("bx24ast.hooks")}
            exec(compile(source, path, "exec"), namespace)
        except (Exception, SystemExit) as exc:   # a SyntaxError as much as an import that fails
            self.load_error = "%s: %s" % (type(exc).__name__, exc)
            log.error("hooks: %s cannot be loaded, running without hooks: %s", path, self.load_error)
            return
        self.functions = dict((name, fn) for name, fn in namespace.items()
                              if name in HOOK_POINTS and callable(fn))
        unknown = sorted(name for name, fn in namespace.items()
                         if hasattr(fn, "__code__") and not name.startswith("_") and name not in HOOK_POINTS
                         and getattr(fn, "__module__", None) == "bx24ast_hooks")
        log.info("hooks: %s loaded: %s", path, ", ".join(sorted(self.functions)) or "no hook functions")
        if unknown:
            log.warning("hooks: %s defines %s, which bx24ast never calls (hook names: %s)",
                        path, ", ".join(unknown), ", ".join(HOOK_POINTS))

    def has(self, name):
        return name in self.functions

    def status(self):
        return {"file": self.path, "loaded": sorted(self.functions), "load_error": self.load_error,
                "errors": dict(self.errors)}

    def _tell_once(self, name, problem, detail):
        with self._lock:
            self.errors[name] += 1
            if (name, problem) in self._told:
                return
            self._told.add((name, problem))
        log.error("hooks: %s %s (%s); the call goes on as if the hook were absent (said once)",
                  name, problem, detail)

    def _run(self, name, args):
        """(ok, result) of the hook within the time limit. A hook stuck for good (a
        network call that never returns) keeps one thread; until it comes back the hook
        is taken as absent, so that calls do not pile up threads behind it."""
        stuck = self._stuck.get(name)
        if stuck is not None:
            if stuck.is_alive():
                self._tell_once(name, "ran longer than [hooks] timeout_ms", "%.0f ms" % (self.timeout * 1000))
                return False, None
            del self._stuck[name]
        box = {}

        def target():
            try:
                box["result"] = self.functions[name](*args)
            except BaseException as exc:   # a hook's sys.exit() must not stop the daemon
                box["error"] = exc

        worker = threading.Thread(target=target, name="hook-" + name, daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            self._stuck[name] = worker
            self._tell_once(name, "ran longer than [hooks] timeout_ms", "%.0f ms" % (self.timeout * 1000))
            return False, None
        if "error" in box:
            exc = box["error"]
            self._tell_once(name, "raised %s" % type(exc).__name__, str(exc)[:200])
            return False, None
        return True, box.get("result")

    def call(self, name, default, args, check, edits=False):
        """What the hook returns, passed through check (which raises ValueError for what
        cannot be used), or default when the hook is absent or fails. With edits, the
        first argument is the value the hook changes: it gets a copy, and returning
        None keeps its edits of the copy; a hook that fails half-way leaves nothing."""
        if name not in self.functions:
            return default
        self.calls[name] += 1
        first = args[0]
        if isinstance(first, (dict, list)):
            args = (json.loads(json.dumps(first)),) + tuple(args[1:])
        ok, result = self._run(name, args)
        if not ok:
            return default
        if result is None and edits and isinstance(first, dict):
            result = args[0]
        if type(result) is type(default) and result == default:
            return default   # handed back as given: never an error, even where bx24ast's own value is odd
        try:
            out = check(result)
        except HookSkipped:
            if self.journal is not None:
                self.journal.append((name, default, False, args[-1]))
            raise
        except (ValueError, TypeError) as exc:
            self._tell_once(name, "returned what bx24ast cannot use", ("%s; got %r" % (exc, result))[:300])
            return default
        if self.journal is not None and out != default:
            self.journal.append((name, default, out, args[-1]))
        return out

    # -- the checks of what each kind of hook returns ---------------------------------------
    @staticmethod
    def a_bool(result):
        if result is None:
            return True
        if not isinstance(result, bool):
            raise ValueError("True or False")
        return result

    @staticmethod
    def a_number(result):
        number = clean_phone_number(result)
        if number is None:
            raise ValueError("a phone number (digits, optional +)")
        return number

    @staticmethod
    def an_extension(result):
        if not isinstance(result, str) or not re.match(r"^[0-9A-Za-z*#+_\-]{1,20}$", result):
            raise ValueError("an extension (digits)")
        return result

    @staticmethod
    def a_user_id(result):
        if isinstance(result, bool) or not isinstance(result, int) or result <= 0:
            raise ValueError("a Bitrix24 user ID (a whole number)")
        return result

    @staticmethod
    def params(skippable=False):
        def check(result):
            if result is False and skippable:
                raise HookSkipped()
            if not isinstance(result, dict):
                raise ValueError("a dict of parameters" + (" or False" if skippable else ""))
            json.dumps(result)   # what goes into the outbox must be JSON
            return result
        return check

    @staticmethod
    def requests(result):
        if result is None:
            return []
        if not isinstance(result, (list, tuple)):
            raise ValueError("a list of [method, params] pairs")
        out = []
        for item in result:
            if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
                    or not re.match(r"^[a-zA-Z][a-zA-Z0-9_.]{2,80}$", item[0]) or not isinstance(item[1], dict)):
                raise ValueError("[method, params] pairs, like ['crm.timeline.comment.add', {'fields': {...}}]")
            json.dumps(item[1])
            out.append((item[0], item[1]))
        return out

    # -- the hook points, named for their callers ----------------------------------------------
    def need_registration(self, call):
        return self.call("need_registration", True, (call,), self.a_bool)

    def client_phone(self, number, call):
        return self.call("process_client_phone", number, (number, call), self.a_number)

    def user_phone(self, extension, call):
        return self.call("process_user_phone", extension, (extension, call), self.an_extension)

    def missed_call_responsible(self, user_id, call):
        return self.call("customize_missed_call_responsible", user_id, (user_id, call), self.a_user_id)

    def outbound(self, kind, params, call):
        """The parameters of an outbox request of kind as the hook changes them;
        HookSkipped when the hook says it is not to be sent."""
        name = HOOKED_REQUESTS.get(kind)
        if name is None or name not in self.functions:
            return params
        check = self.params(name in SKIPPABLE)
        if kind == "task":
            fields = params.get("fields") or {}
            return collections.OrderedDict(params, fields=self.call(name, fields, (fields, call), check, edits=True))
        return self.call(name, params, (params, call), check, edits=True)

    def follow_ups(self, name, result, call):
        """post_registration / post_finish: [(method, params)] to queue."""
        return self.call(name, [], (result if isinstance(result, (dict, list)) else {"result": result}, call),
                         self.requests)


###############################################################################
# CRM flows ###################################################################
###############################################################################
# What Bitrix24 hears about each call: the card (register/show/hide), the call
# activity (finish), the recording (attachRecord) and the missed-call task.
# CrmFlows turns lifecycle events into outbox requests at once, with
# placeholders ({"$": "call_id"}, {"$": "user", "ext": "101"}) that the
# OutboxSender fills in at send time, when Bitrix24 has answered the earlier
# requests of that call.

STATUS_CODES = {"ANSWERED": "200", "NO ANSWER": "304", "BUSY": "486", "FAILED": "603"}


def bitrix_time(ts):
    """ISO 8601 with an explicit offset: CALL_START_DATE without one means portal time."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ts))


class UserDirectory(object):
    """Extension -> Bitrix24 user: [users] overrides, else UF_PHONE_INNER from user.get."""

    def __init__(self, client=None, overrides=None, default_user_id=0, refresh_seconds=600.0):
        self.client = client
        self.overrides = dict((k, Employee.user_id_of(v)) for k, v in (overrides or {}).items())
        self.default_user_id = default_user_id or None
        self.refresh_seconds = refresh_seconds
        self._map = {}
        self._lock = threading.Lock()
        self.loaded_at = None
        self.next_try = 0.0

    def user_for(self, ext):
        if ext is None:
            return None
        with self._lock:
            return self.overrides.get(ext) or self._map.get(ext)

    def extension_of(self, user_id):
        """The extension that rings user_id (click-to-call, routing); [users] first."""
        with self._lock:
            for ext, uid in self.overrides.items():
                if uid == user_id:
                    return ext
            for ext, uid in self._map.items():
                if uid == user_id and ext not in self.overrides:
                    return ext
        return None

    def status(self):
        """The extension -> user map as the status page shows it ([users] overrides included)."""
        with self._lock:
            mapping = dict(self._map)
            mapping.update(self.overrides)
        return {"map": dict(sorted(mapping.items())), "loaded_at": self.loaded_at}

    def stale(self, now=None):
        now = time.time() if now is None else now
        if self.client is None or now < self.next_try:
            return False
        return self.loaded_at is None or now - self.loaded_at >= self.refresh_seconds

    def refresh(self):
        """Read every active user's UF_PHONE_INNER (paged user.get)."""
        found, start, owners = {}, 0, {}
        while True:
            page = self.client.call("user.get", {"FILTER": {"ACTIVE": True}, "start": start})
            for user in page or []:
                ext = (user.get("UF_PHONE_INNER") or "").strip()
                if not ext:
                    continue
                uid = int(user["ID"])
                if ext in found and found[ext] != uid:
                    owners.setdefault(ext, {found[ext]}).add(uid)
                    continue
                found[ext] = uid
            if not page or len(page) < 50:
                break
            start += 50
        for ext, uids in owners.items():
            log.warning("Bitrix24: extension %s is the UF_PHONE_INNER of several users %s; using %s "
                        "(set [users] %s = <ID> to choose)", ext, sorted(uids), found[ext], ext)
        with self._lock:
            self._map = found
            self.loaded_at = time.time()
        log.info("Bitrix24: %d extensions mapped to users", len(found))
        return found


class RecordingProblem(Exception):
    """A recording that cannot be attached (missing, empty, unconvertible)."""


class RecordingFiles(object):
    """Finds a MixMonitor file by name and makes it something Bitrix24 accepts."""

    def __init__(self, path, settle_seconds=3.0, inline_max_bytes=8 * 1024 * 1024):
        self.path = path
        self.settle_seconds = settle_seconds
        self.inline_max_bytes = inline_max_bytes

    def locate(self, name, started_at=None):
        if not name or "/" in name or name.startswith("."):
            return None
        candidates = [os.path.join(self.path, name)]
        if started_at:
            for t in (time.localtime(started_at), time.gmtime(started_at)):
                candidates.append(os.path.join(self.path, time.strftime("%Y/%m/%d", t), name))
        for c in candidates:
            if os.path.isfile(c):
                return c
        for root, _dirs, files in os.walk(self.path):
            if name in files:
                return os.path.join(root, name)
        return None

    def find_for_call(self, uniqueids, started_at=None):
        """A recording whose name carries one of the call's uniqueids (FreePBX names end in
        -<uniqueid>.wav): how CEL-recovered calls find theirs, CEL having no file names."""
        dirs = [self.path]
        if started_at:
            for t in (time.localtime(started_at), time.gmtime(started_at)):
                d = os.path.join(self.path, time.strftime("%Y/%m/%d", t))
                if d not in dirs:
                    dirs.insert(0, d)
        marks = ["-%s." % u for u in uniqueids if u]
        for d in dirs:
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            for name in names:
                if any(m in name for m in marks) and _RECORDING_EXT.search(name):
                    return name
        return None

    def settled(self, path, now=None):
        """MixMonitor may still be writing right after the hang-up."""
        now = time.time() if now is None else now
        age = now - os.path.getmtime(path)
        # a file "from the future" was written before the clock stepped back
        return age >= self.settle_seconds or age < -60

    @staticmethod
    def _has_audio(path, data):
        if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
            return len(data) > 44 + 160  # more than a header (unanswered calls leave 44 bytes)
        if data[:3] == b"ID3" or (len(data) > 2 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0):
            return len(data) > 1024
        return False

    @staticmethod
    def _pcm_wav(data):
        return data[:4] == b"RIFF" and data[8:12] == b"WAVE" and data[20:22] == b"\x01\x00"

    def prepare(self, path):
        """(file name, bytes) for attachRecord: lower-case .wav/.mp3 with real audio."""
        if os.path.exists(path) and not is_regular_file(path):
            raise RecordingProblem("%s is not a regular file" % path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (IOError, OSError) as exc:
            raise RecordingProblem("cannot read %s: %s" % (path, exc.strerror))
        base = os.path.basename(path)
        stem, ext = os.path.splitext(base)
        low = ext.lower()
        if not data or (low == ".wav" and data[:4] == b"RIFF" and len(data) <= 44 + 160):
            raise RecordingProblem("%s holds no audio (%d bytes)" % (base, len(data)))
        if low == ".mp3" and self._has_audio(path, data):
            return stem + ".mp3", data
        if low == ".wav" and self._pcm_wav(data) and self._has_audio(path, data):
            return stem + ".wav", data
        converted = self._convert(path)
        if converted is None:
            raise RecordingProblem("%s is not PCM WAV or MP3 and neither ffmpeg, sox nor lame is "
                                   "installed to convert it" % base)
        return converted

    def _convert(self, path):
        import shutil
        import tempfile
        stem = os.path.splitext(os.path.basename(path))[0]
        tmp = tempfile.mkdtemp(prefix="bx24ast-rec-")
        try:
            if shutil.which("ffmpeg"):
                out = os.path.join(tmp, stem + ".mp3")
                cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", path, "-ac", "1", out]
            elif shutil.which("sox"):
                out = os.path.join(tmp, stem + ".wav")
                cmd = ["sox", path, "-e", "signed-integer", "-b", "16", out]
            elif shutil.which("lame"):
                out = os.path.join(tmp, stem + ".mp3")
                cmd = ["lame", "--quiet", path, out]
            else:
                return None
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0 or not os.path.exists(out):
                raise RecordingProblem("converting %s with %s failed: %s"
                                       % (os.path.basename(path), cmd[0], err.decode("utf-8", "replace")[:200]))
            with open(out, "rb") as f:
                data = f.read()
            if not self._has_audio(out, data):
                raise RecordingProblem("%s holds no audio after conversion" % os.path.basename(path))
            return os.path.basename(out), data
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RecordingProblem("converting %s took too long" % os.path.basename(path))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class Lines(object):
    """The lines clients dial ([line:DID] sections, [lines]) and their settings. A line
    written 8 (495) 123-45-67, +74951234567 or 74951234567 is one line, whichever way
    the trunk presents the DID."""

    def __init__(self, settings, number_plan, default_hours=None):
        self.number_plan = number_plan
        self.default_hours = default_hours
        self._by_key = dict((self.key(did), s) for did, s in settings.items())

    @classmethod
    def from_config(cls, config, rules, pbx=""):
        return cls(config.line_settings(pbx), rules.number_plan, config.get("routing", "hours"))

    def key(self, did):
        number = clean_phone_number(did)
        return (self.number_plan.normalize(number) if number else None) or did

    def get(self, did):
        """The line's settings, or None when it has none of its own."""
        return self._by_key.get(self.key(did)) if did else None

    def hours(self, did):
        """When the line is open: its own hours, else [routing] hours; None is always."""
        settings = self.get(did)
        return (settings and settings["hours"]) or self.default_hours

    def responsible(self, did):
        settings = self.get(did)
        return (settings and settings["responsible"]) or None


class PbxCall(object):
    """A call of a named PBX ([ami:NAME]) as the CRM side keys it: its linkedid carries
    the PBX's name, so that two Asterisks' linkedids never meet in the state database
    (each counts from its own start time)."""

    def __init__(self, call, pbx):
        self.__dict__["call"] = call
        self.__dict__["linkedid"] = "%s:%s" % (pbx, call.linkedid)

    def __getattr__(self, name):
        return getattr(self.__dict__["call"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["call"], name, value)


class CrmFlows(object):
    """Lifecycle events of external calls -> Bitrix24 requests in the outbox.

    With a ledger (CEL), a call whose live view had a hole (adopted after a restart or
    a reconnect, or ended while AMI was away) is finished from what Asterisk recorded,
    not from guesses: its end waits for reconcile(); after ledger_wait seconds without
    it, the live values are used and the call is marked uncertain.
    """

    def __init__(self, config, outbox, records, rules, ledger=False, ledger_wait=120.0, hooks=None, pbx=""):
        self.crm = config.section("crm")
        self.rules = rules
        self.hooks = hooks or Hooks()
        self.pbx = pbx
        # a line written 8 (495) 123-45-67, +74951234567 or 74951234567 is one line,
        # whichever way the trunk presents the DID
        self.lines = Lines.from_config(config, rules, pbx)
        # what hooks said of a call, asked once per call (bounded: a call's events come
        # within hours, and a restarted daemon asks again)
        self._decided = BoundedCache(5000)
        self.attach = config.get("recordings", "attach")
        self.outbox = outbox
        self.records = records
        self.ledger = ledger
        self.ledger_wait = ledger_wait
        self._shown = {}   # linkedid -> extensions whose screen shows the card
        self._live = set()  # calls this process follows live and has not seen end
        self._awaiting = {}  # linkedid -> (Call as seen live, monotonic time it ended)
        self.on_awaiting = lambda: None   # the CEL watcher's kick: read CEL soon
        self._unsaved = collections.deque()   # (kind, call, extension) a failed write left
        self._ledger_first = {}   # linkedid -> (Call from CEL, when): closed in CEL before AMI said so
        self._lock = threading.Lock()

    # -- entry points -----------------------------------------------------------------
    def _keyed(self, call):
        """The call as this side keys it: a named PBX's linkedids carry its name."""
        return PbxCall(call, self.pbx) if self.pbx else call

    def on_call_event(self, kind, call, extension):
        call = self._keyed(call)
        if not is_reportable(call, self.rules) or not self._wanted(call, extension):
            return
        with self._lock:
            # a write failed (disk full): later events of every call wait behind it, in order
            if self._unsaved or not self._saved(kind, call, extension):
                self._unsaved.append((kind, call, extension))

    def retry_unsaved(self):
        """Write the events a failed write left in memory; True when none is left."""
        with self._lock:
            while self._unsaved:
                if not self._saved(*self._unsaved[0]):
                    return False
                kind, call, _ext = self._unsaved.popleft()
                log.info("call %s: %s written to the state database after all", call.linkedid, kind)
            return True

    def unsaved(self):
        return len(self._unsaved)

    def _saved(self, kind, call, extension):
        lid = call.linkedid
        before = (list(self._shown[lid]) if lid in self._shown else None, lid in self._live,
                  self._awaiting.get(lid))
        try:
            with self.records.store.transaction():
                self._apply(kind, call, extension)
            return True
        except sqlite3.Error:
            shown, live, awaiting = before
            if shown is None:
                self._shown.pop(lid, None)
            else:
                self._shown[lid] = shown
            (self._live.add if live else self._live.discard)(lid)
            if awaiting is None:
                self._awaiting.pop(lid, None)
            else:
                self._awaiting[lid] = awaiting
            return False

    def _apply(self, kind, call, extension):
        if kind == "ringing":
            self._live.add(call.linkedid)
            self._ringing(call, extension)
        elif kind == "answered":
            self._live.add(call.linkedid)
            self._card_only_for(call, extension)
        elif kind == "transferred":
            self._card_only_for(call, extension)
        elif kind == "ended":
            self._live.discard(call.linkedid)
            recorded = self._ledger_first.pop(call.linkedid, None)
            if self.ledger and (call.adopted or call.gap) and call.call_id is None:
                if recorded is not None:
                    # CEL closed it before AMI told us: what Asterisk recorded is at hand
                    self._finish_from_ledger(recorded[0])
                else:
                    self._await_ledger(call)
                return
            self._ended(call)
            self._shown.pop(call.linkedid, None)

    def report_finished(self, call):
        """A whole call at once, as Asterisk recorded it (CEL): reported late when the
        live path never saw it; finished when it was registered and never finished
        (the daemon stopped, AMI was away) or its end waits for the ledger."""
        call = self._keyed(call)
        with self._lock, self.records.store.transaction():
            row = self.records.get(call.linkedid)
            if row is None or row.get("source") is None:
                if not self._wanted(call, None):
                    return False
                self._ended(call, late=True)
                return "late"
            if row.get("ended_at") is not None:
                return False
            if call.linkedid in self._live and call.linkedid not in self._awaiting:
                # CEL is written as the call ends, the AMI Hangup may not be read yet:
                # kept for the live end, which needs it when its own view had a gap
                now = monotonic()
                self._ledger_first[call.linkedid] = (call, now)
                for lid in [k for k, (_c, at) in self._ledger_first.items() if now - at > 600]:
                    del self._ledger_first[lid]
                return False
            self._finish_from_ledger(call)
            return "finished"

    def _finish_from_ledger(self, call):
        self._awaiting.pop(call.linkedid, None)
        shown = self._shown.pop(call.linkedid, None)
        # cards shown by an earlier life of the daemon: whoever rang may still see one
        self._ended(call, hide=shown if shown is not None else list(call.rang))
        self.records.update(call.linkedid, awaiting_since=None)

    def awaiting(self):
        return bool(self._awaiting)

    def settle_awaiting(self, now=None):
        """Ends that waited for the ledger longer than ledger_wait: the live values,
        marked uncertain (check lists them)."""
        now = monotonic() if now is None else now
        with self._lock:
            late = [(lid, call) for lid, (call, since) in self._awaiting.items() if now - since >= self.ledger_wait]
            for linkedid, call in late:
                del self._awaiting[linkedid]
                with self.records.store.transaction():
                    self._close_uncertain(call, "not in CEL %.0f s after its end; values as seen live"
                                          % self.ledger_wait)

    def close_orphans(self, tracked, gone_at):
        """After (re)connecting: calls registered but never finished that Asterisk no
        longer has. With a ledger they wait for CEL (ledger_wait); without, they are
        closed at once with what was kept of them, marked uncertain."""
        closed = 0
        if self.pbx:
            tracked = set("%s:%s" % (self.pbx, lid) for lid in tracked)
        with self._lock:
            for row in self.records.unended(self.pbx):
                linkedid = row["linkedid"]
                if linkedid in tracked or linkedid in self._awaiting or linkedid in self._live:
                    continue
                call = self._call_from_record(row, gone_at)
                with self.records.store.transaction():
                    if self.ledger:
                        self._awaiting[linkedid] = (call, monotonic())
                        self.records.update(linkedid, awaiting_since=time.time())
                        self.on_awaiting()
                    else:
                        self._close_uncertain(call, "ended while bx24ast was not connected to Asterisk "
                                                    "and CEL is off: end time and answer are guesses")
                        closed += 1
        return closed

    def _contact_and_deal(self, call, owner):
        """[line:DID] create = deal: a contact and a deal of bx24ast's own for an unknown
        number, sent after the register (which found nobody; the sender skips both when
        it found someone) and before the finish, which then finds the new contact by its
        number and binds the call to it and its deal."""
        number, line = self.client_number(call), self._line(call)
        source = line["source"] or "CALL"
        self.outbox.add(call.linkedid, "contact", "crm.contact.add", {"fields": collections.OrderedDict([
            ("NAME", number), ("OPENED", "Y"), ("ASSIGNED_BY_ID", owner), ("SOURCE_ID", source),
            ("SOURCE_DESCRIPTION", "bx24ast: call to %s" % call.did),
            ("PHONE", [{"VALUE": number, "VALUE_TYPE": "WORK"}])]), "check": {"number": number}},
            PRIORITY_FINISH)
        fields = collections.OrderedDict([
            ("TITLE", "%s: call from %s" % (call.did, number)), ("CONTACT_ID", {"$": "created", "type": "CONTACT"}),
            ("CATEGORY_ID", line["deal_category"]), ("OPENED", "Y"), ("ASSIGNED_BY_ID", owner),
            ("SOURCE_ID", source)])
        if line["deal_stage"]:
            fields["STAGE_ID"] = line["deal_stage"]
        self.outbox.add(call.linkedid, "deal", "crm.deal.add", {"fields": fields}, PRIORITY_FINISH)

    # -- the ledger -------------------------------------------------------------------------
    def _await_ledger(self, call):
        self._awaiting[call.linkedid] = (call, monotonic())
        if not self._registered(call):
            self._register(call, call.ended_with or (call.rang[-1] if call.rang else call.placer), show=False)
        self.records.update(call.linkedid, awaiting_since=time.time())
        log.info("call %s: its live view had a gap; finishing it from CEL", call.linkedid)
        self.on_awaiting()

    def _close_uncertain(self, call, why):
        shown = self._shown.pop(call.linkedid, None)
        self._ended(call, hide=shown if shown is not None else list(call.rang))
        self.records.update(call.linkedid, uncertain=why[:500], awaiting_since=None)
        log.warning("call %s: finished with uncertain values: %s", call.linkedid, why)

    @staticmethod
    def _call_from_record(row, ended_at):
        call = Call(row["linkedid"], row.get("started_at"))
        call.direction = row.get("direction")
        call.external_number = row.get("external_number")
        call.did = row.get("did")
        call.rang = [row["last_rang"]] if row.get("last_rang") else []
        call.ended_at = max(ended_at or 0, row.get("answered_at") or 0, row.get("started_at") or 0) or None
        call.adopted = True
        return call

    # -- what hooks see and say -----------------------------------------------------------
    def facts(self, call, extension=None):
        """The call as hooks are given it: plain values only."""
        number = self._decided.get((call.linkedid, "number"))
        return {"linkedid": call.linkedid, "pbx": self.pbx, "direction": call.direction,
                "number": number or self.rules.number_plan.normalize(call.external_number),
                "raw_number": call.external_number, "did": call.did, "extension": extension,
                "rang": list(call.rang), "answered_by": call.answered_by, "placer": call.placer,
                "started_at": call.started_at, "answered_at": call.answered_at, "ended_at": call.ended_at,
                "billsec": call.billsec, "disposition": call.disposition, "recording": call.recording,
                "click_to_call": call.call_id is not None, "callback": call.callback}

    def _wanted(self, call, extension):
        if not self.hooks.has("need_registration"):
            return True
        key = (call.linkedid, "wanted")
        wanted = self._decided.get(key)
        if wanted is None:
            wanted = self._decided[key] = self.hooks.need_registration(self.facts(call, extension))
            if not wanted:
                log.info("call %s: not reported (need_registration said so)", call.linkedid)
        return wanted

    def _ext(self, call, ext):
        """The extension to find the Bitrix24 user by (process_user_phone)."""
        if ext is None or not self.hooks.has("process_user_phone"):
            return ext
        key = (call.linkedid, "ext", ext)
        mapped = self._decided.get(key)
        if mapped is None:
            mapped = self._decided[key] = self.hooks.user_phone(ext, self.facts(call, ext))
        return mapped

    def _user_ref(self, call, ext):
        return {"$": "user", "ext": self._ext(call, ext)}

    def _responsible_ref(self, call, ext):
        """Who answers for a call nobody took: the CRM's owner of the client, the line's
        responsible, the phone that rang, [crm] default_user_id (resolved when sent)."""
        ref = {"$": "responsible", "ext": self._ext(call, ext)}
        line = self._line(call)
        if line and line["responsible"]:
            ref["line_user"] = line["responsible"]
        return ref

    # -- pieces ---------------------------------------------------------------------------
    def client_number(self, call):
        number = self.rules.number_plan.normalize(call.external_number)
        if number is None or not self.hooks.has("process_client_phone"):
            return number
        key = (call.linkedid, "number")
        hooked = self._decided.get(key)
        if hooked is None:
            hooked = self._decided[key] = self.hooks.client_phone(number, self.facts(call))
        return hooked

    def _line(self, call):
        """The call's line settings ([line:DID], [lines]), or None."""
        if call.direction != "inbound" or not call.did:
            return None
        return self.lines.get(call.did)

    def _withheld(self, call):
        """No number a portal could store: anonymous, empty, <unknown>, a SIP URI."""
        return self.client_number(call) is None

    def _creates(self, call):
        """What an unknown number creates on this call's line: lead (the portal's own
        CRM_CREATE), deal (a contact and a deal bx24ast adds), or none."""
        if not self.crm["create"] or self._withheld(call):
            return "none"
        line = self._line(call)
        return line["create"] if line else "lead"

    def _register_params(self, call, ext, show):
        withheld = self._withheld(call)
        params = collections.OrderedDict([
            ("USER_ID", self._user_ref(call, ext)),
            ("PHONE_NUMBER", self.crm["withheld_number"] if withheld else self.client_number(call)),
            ("TYPE", 2 if call.direction == "inbound" else 4 if call.callback else 1),
            ("CALL_START_DATE", bitrix_time(call.started_at or time.time())),
            ("CRM_CREATE", 1 if self._creates(call) == "lead" else 0),
            ("SHOW", 1 if show and self.crm["show_card"] else 0),
            ("EXTERNAL_CALL_ID", call.linkedid),
        ])
        if call.direction == "inbound" and call.did:
            params["LINE_NUMBER"] = call.did
            line = self._line(call)
            if line and line["source"]:
                params["CRM_SOURCE"] = line["source"]
        return params

    def _registered(self, call):
        return call.call_id is not None or self.records.registered(call.linkedid)

    def _register(self, call, ext, show, recovered=False):
        self.records.update(call.linkedid, direction=call.direction, external_number=self.client_number(call),
                            started_at=call.started_at, source="live" if show else "late",
                            did=call.did if call.direction == "inbound" else None)
        params = self._register_params(call, ext, show)
        if recovered:
            # found in CEL with no record of it here (the state may have been lost): the
            # portal may have it already; the sender looks before registering it again
            params["check"] = {"external_call_id": call.linkedid}
        self.outbox.add(call.linkedid, "register", "telephony.externalcall.register", params,
                        PRIORITY_LATER if recovered else PRIORITY_CARD)

    def _ringing(self, call, ext):
        shown = self._shown.setdefault(call.linkedid, [])
        if call.direction == "inbound":
            self.records.update(call.linkedid, last_rang=ext)
        if call.call_id is not None:
            # Click-to-call: Bitrix24 registered the call and shows the card itself.
            if not self.records.registered(call.linkedid):
                self.records.update(call.linkedid, direction=call.direction, call_id=call.call_id,
                                    external_number=self.client_number(call), started_at=call.started_at,
                                    source="click-to-call")
            if ext not in shown:
                shown.append(ext)
            return
        if not self._registered(call):
            self._register(call, ext, show=True)
            shown.append(ext)
            return
        if ext not in shown and self.crm["show_card"]:
            shown.append(ext)
            self.outbox.add(call.linkedid, "show", "telephony.externalcall.show",
                            {"CALL_ID": {"$": "call_id"}, "USER_ID": [self._user_ref(call, ext)]},
                            PRIORITY_CARD)

    def _card_only_for(self, call, ext):
        """One employee has the client now: hide the card from the others ringing."""
        shown = self._shown.setdefault(call.linkedid, [])
        # Kept in the state store so that a restarted daemon finishes the call right.
        row = self.records.get(call.linkedid) or {}
        self.records.update(call.linkedid, talker=ext, answered_at=row.get("answered_at") or call.answered_at)
        if not self._registered(call) and call.call_id is None:
            self._register(call, ext, show=True)
            shown.append(ext)
        others = [e for e in shown if e != ext]
        if ext not in shown and self.crm["show_card"] and call.call_id is None:
            self.outbox.add(call.linkedid, "show", "telephony.externalcall.show",
                            {"CALL_ID": {"$": "call_id"}, "USER_ID": [self._user_ref(call, ext)]},
                            PRIORITY_CARD)
        if others:
            self.outbox.add(call.linkedid, "hide", "telephony.externalcall.hide",
                            {"CALL_ID": {"$": "call_id"},
                             "USER_ID": [self._user_ref(call, e) for e in others]}, PRIORITY_CARD)
        shown[:] = [ext]

    def _ended(self, call, late=False, hide=None):
        linkedid = call.linkedid
        row = self.records.get(linkedid)
        if row is not None and row.get("ended_at") is not None:
            return  # already reported
        row = row or {}
        answered_at = call.answered_at or row.get("answered_at")
        if call.adopted and call.answered_at and row.get("answered_at"):
            # adopted: "answered" is when we found it talking; an earlier life saw the answer
            answered_at = min(call.answered_at, row["answered_at"])
        answered = answered_at is not None
        talker = (call.ended_with or row.get("talker")) if answered else None
        billsec = call.billsec
        if answered and answered_at != call.answered_at:
            billsec = max(0, int((call.ended_at or time.time()) - answered_at + 0.5))
        disposition = "ANSWERED" if answered else call.disposition
        last_rang = (call.rang[-1] if call.rang else row.get("last_rang")) or \
            (call.placer if call.direction == "outbound" else None)
        if call.call_id is None and not self._registered(call):
            self._register(call, talker or last_rang or call.placer, show=False, recovered=late)
        elif call.call_id is not None and not row:
            self.records.update(linkedid, direction=call.direction, call_id=call.call_id,
                                external_number=self.client_number(call), started_at=call.started_at,
                                source="click-to-call")
        self.records.update(linkedid, answered=1 if answered else 0, ended_at=call.ended_at or time.time())
        missed_inbound = call.direction == "inbound" and not answered
        if answered:
            finisher = self._user_ref(call, talker)
        else:
            finisher = self._responsible_ref(call, last_rang)
            if missed_inbound and not self._withheld(call):
                self.outbox.add(linkedid, "owner", "telephony.externalCall.searchCrmEntities",
                                {"PHONE_NUMBER": self.client_number(call)}, PRIORITY_FINISH)
        if self._creates(call) == "deal":
            self._contact_and_deal(call, finisher)
        shown = [e for e in (hide if hide is not None else self._shown.get(linkedid, [])) if e != talker]
        if shown and not late:
            self.outbox.add(linkedid, "hide", "telephony.externalcall.hide",
                            {"CALL_ID": {"$": "call_id"}, "USER_ID": [self._user_ref(call, e) for e in shown]},
                            PRIORITY_FINISH)
        self.outbox.add(linkedid, "finish", "telephony.externalcall.finish", collections.OrderedDict([
            ("CALL_ID", {"$": "call_id"}),
            ("USER_ID", finisher),
            ("DURATION", billsec if answered else 0),
            ("STATUS_CODE", STATUS_CODES.get(disposition, "603")),
            ("ADD_TO_CHAT", 1 if self.crm["add_to_chat"] else 0),
        ]), PRIORITY_FINISH)
        if self.attach and answered and (call.recording or call.adopted):
            # An adopted call may have started MixMonitor before we saw it: its file is
            # found by the call's uniqueids, as CEL recovery finds them.
            spec = {"$": "recording", "name": call.recording, "started_at": call.started_at}
            if not call.recording:
                spec["uniqueids"] = sorted(call.channels) or [linkedid]
            self.outbox.add(linkedid, "record", "telephony.externalCall.attachRecord",
                            {"CALL_ID": {"$": "call_id"}, "FILENAME": spec}, PRIORITY_LATER)
        if missed_inbound and self.crm["missed_task"]:
            when = call.ended_at or time.time()
            hours = self.lines.hours(call.did)
            # missed while the office was closed: due after it opens again
            due_from = hours.next_opening(when) if hours is not None else when
            fields = {"number": self.client_number(call) or self.crm["withheld_label"],
                      "did": call.did or "", "line": call.did or "",
                      "time": time.strftime("%Y-%m-%d %H:%M", time.localtime(when)), "linkedid": linkedid}
            self.outbox.add(linkedid, "task", "tasks.task.add", {"fields": collections.OrderedDict([
                ("TITLE", self.crm["missed_task_title"].format(**fields)),
                ("DESCRIPTION", self.crm["missed_task_description"].format(**fields)),
                ("RESPONSIBLE_ID", self._responsible_ref(call, last_rang)),
                ("DEADLINE", bitrix_time(due_from + self.crm["missed_task_deadline_minutes"] * 60)),
                ("UF_CRM_TASK", {"$": "crm_binding"}),
            ]), "check": {"number": self.client_number(call), "since": when}},
                # from the wall clock's now at the latest: call times follow the steady
                # clock, which is ahead of a wall clock that just stepped back
                PRIORITY_LATER, not_before=min(when, time.time()) + self.crm["callback_window_minutes"] * 60)


class Unresolved(Exception):
    """A placeholder whose value Bitrix24 has not given us (yet)."""


class NotReady(Exception):
    """Not sendable yet: the extension -> user map has never been read from Bitrix24."""


class _Ride(object):
    """A request of another part (the offline-event poll) carried in an outbox batch."""

    def __init__(self, method, params):
        self.method = method
        self.params = params
        self.done = threading.Event()
        self.result = None
        self.error = None

    def finish(self, result, error):
        self.result, self.error = result, error
        self.done.set()


class OutageLog(object):
    """What the log says while Bitrix24 is away: one line when it stops answering, a
    count every few minutes while it stays away, one line when it is back, instead of
    a warning per attempt. Also what `check` reads through the heartbeat."""

    SUMMARY_EVERY = 300.0

    def __init__(self, clock=monotonic):
        self.clock = clock
        self.since = None          # monotonic start of the current outage
        self.since_wall = None     # the same, for people
        self.failures = 0
        self.last_error = None
        self._summary_at = 0.0
        self._last = None

    def failed(self, exc, waiting=None):
        now = self.clock()
        if exc is self._last:
            return  # one failed batch, many requests
        self._last = exc
        self.failures += 1
        self.last_error = str(exc)
        if self.since is None:
            self.since, self.since_wall, self._summary_at = now, time.time(), now
            log.warning("%s; requests wait in the outbox and are retried with back-off", exc)
        elif now - self._summary_at >= self.SUMMARY_EVERY:
            self._summary_at = now
            log.warning("Bitrix24 still not answering after %s: %d failed attempts%s; last: %s",
                        _duration(now - self.since), self.failures,
                        ", %d requests waiting" % waiting() if waiting else "", exc)

    def backoff(self, cap):
        """How long every request waits after the latest failed attempt of an outage."""
        return min(cap, 0.5 * (1.6 ** max(0, self.failures - 1))) if self.since is not None else 0.0

    def succeeded(self):
        if self.since is not None:
            log.info("Bitrix24 answers again after %s (%d failed attempts)",
                     _duration(self.clock() - self.since), self.failures)
            self.since = self.since_wall = None
            self.failures = 0

    def status(self):
        return {"failing_since": self.since_wall, "failures": self.failures,
                "last_error": self.last_error if self.since is not None else None}


class OutboxSender(object):
    """Sends the outbox: one request at a time when idle, batches when a backlog
    builds up, within the leaky bucket; retries, refreshes or parks by error."""

    BACKOFF_CAP = 60.0
    HOLD_SECONDS = 0.8     # the longest a finish waits for a card's request to ride in
    HOLD_FILL = 0.25       # ...once the bucket is this full: a quarter keeps cards from ever waiting
    HOUSEKEEPING_EVERY = 3600.0
    # Bounded by count as well as age: a busy office must not grow the file for a week.
    KEEP_DONE_SECONDS = 7 * 86400      # done requests, for `outbox list` and support
    KEEP_DONE_COUNT = 5000
    KEEP_CALLS_SECONDS = 90 * 86400    # call records: "already reported" for CEL recovery
    KEEP_CALLS_COUNT = 100000

    def __init__(self, outbox, records, client, users, recordings, default_user_id=None,
                 clock=time.time, unanswered_retry=65.0, hooks=None):
        self.outbox = outbox
        self.hooks = hooks or Hooks()
        self.unanswered_retry = unanswered_retry
        self.records = records
        self.client = client
        self.users = users
        self.recordings = recordings
        self.default_user_id = default_user_id or None
        self.clock = clock
        # pauses are spans of time, so they run on the steady clock: a wall-clock step
        # back must not hold the whole outbox for an hour
        self.steady = monotonic
        self._bucket_wait = 0.0
        self.paused_until = 0.0
        self.method_paused = {}
        self.alert = None
        self.outage = OutageLog()
        self.last_sent_at = None   # wall time of the last answered request
        self._stop = threading.Event()
        self._thread = None
        self.sent_batches = 0
        self.sent_single = 0
        self.card_latency = Histogram()   # a ringing phone -> its card's request on the wire
        self._housekept = 0.0
        self._housekept_at_done = 0
        self._riders = []
        self._riders_lock = threading.Lock()

    # -- placeholders -------------------------------------------------------------------------
    def _user(self, ext):
        return self.users.user_for(ext)

    def _responsible(self, linkedid, ext, line_user=None):
        row = self.records.get(linkedid) or {}
        if row.get("crm_owner_id"):
            user = int(row["crm_owner_id"])
        elif line_user:
            user = line_user
        else:
            user = self._user(ext)
            if user is None and ext and self.users.client is not None and self.users.loaded_at is None:
                raise NotReady("waiting for the user list (user.get)")
            user = user or self.default_user_id
        if user is not None and self.hooks.has("customize_missed_call_responsible"):
            user = self.hooks.missed_call_responsible(user, self.facts(row, linkedid))
        return user

    @staticmethod
    def facts(row, linkedid):
        """A call as hooks are given it at send time, from what the state database keeps."""
        row = row or {}
        entities = row.get("created_entities")
        return {"linkedid": linkedid, "direction": row.get("direction"), "number": row.get("external_number"),
                "did": row.get("did"), "extension": row.get("talker") or row.get("last_rang"),
                "answered_by": row.get("talker") if row.get("answered") else None,
                "started_at": row.get("started_at"), "answered_at": row.get("answered_at"),
                "ended_at": row.get("ended_at"), "answered": bool(row.get("answered")),
                "call_id": row.get("call_id"), "crm_entity_type": row.get("crm_entity_type"),
                "crm_entity_id": row.get("crm_entity_id"),
                "created_entities": json.loads(entities) if entities else []}

    def resolve(self, request, value, refs=None):
        if isinstance(value, dict):
            kind = value.get("$")
            if kind is None:
                return collections.OrderedDict((k, self.resolve(request, v, refs)) for k, v in value.items()
                                               if k != "check")
            if kind == "call_id":
                row = self.records.get(request.linkedid) or {}
                if row.get("call_id"):
                    return row["call_id"]
                if refs and request.linkedid in refs:
                    return "$result[%s][CALL_ID]" % refs[request.linkedid]
                reason = self.outbox.parked_reason(request.linkedid, "register")
                if reason:
                    raise Unresolved(reason if reason.startswith("register failed") else
                                     "register failed: " + reason)
                raise Unresolved("no CALL_ID yet (register not done)")
            if kind == "user":
                user = self._user(value["ext"])
                if user is None and self.users.client is not None and self.users.loaded_at is None:
                    # Falling back to the default user only because user.get has not
                    # answered yet would put the call on the wrong employee.
                    raise NotReady("waiting for the user list (user.get)")
                if user is None:
                    user = self.default_user_id
                if user is None:
                    raise Unresolved("no Bitrix24 user for extension %s and [crm] default_user_id = 0"
                                     % value["ext"])
                return user
            if kind == "responsible":
                user = self._responsible(request.linkedid, value.get("ext"), value.get("line_user"))
                if user is None:
                    raise Unresolved("no responsible user (extension %s unmapped, [crm] default_user_id = 0)"
                                     % value.get("ext"))
                return user
            if kind == "crm_binding":
                row = self.records.get(request.linkedid) or {}
                prefix = {"LEAD": "L", "CONTACT": "C", "COMPANY": "CO", "DEAL": "D"}
                binding = []
                for entity in json.loads(row.get("created_entities") or "[]"):
                    if entity.get("ENTITY_TYPE") in prefix:
                        binding.append("%s_%s" % (prefix[entity["ENTITY_TYPE"]], entity["ENTITY_ID"]))
                if row.get("crm_entity_type") in prefix and row.get("crm_entity_id"):
                    tag = "%s_%s" % (prefix[row["crm_entity_type"]], row["crm_entity_id"])
                    if tag not in binding:
                        binding.insert(0, tag)
                return binding
            if kind == "recording":
                return value["name"]
            if kind == "created":
                row = self.records.get(request.linkedid) or {}
                for entity in json.loads(row.get("created_entities") or "[]"):
                    if entity.get("ENTITY_TYPE") == value["type"]:
                        return entity["ENTITY_ID"]
                raise Unresolved("no %s was created for the call" % value["type"])
            raise Unresolved("unknown placeholder %r" % kind)
        if isinstance(value, list):
            out = []
            for item in value:
                resolved = self.resolve(request, item, refs)
                if resolved not in out:
                    out.append(resolved)
            return out
        return value

    # -- requests of others riding in our batches ---------------------------------------------
    def backlog(self):
        """True when requests are waiting, so a batch is about to go anyway."""
        return self._thread is not None and self.steady() >= self.paused_until and \
            bool(self.outbox.ready(self.clock(), 2))

    def ride(self, method, params):
        """Put one request into the next batch (the offline-event poll); wait on
        ride.done, then read ride.result or ride.error."""
        ride = _Ride(method, params)
        with self._riders_lock:
            self._riders.append(ride)
        with self.outbox.wakeup:
            self.outbox.wakeup.notify_all()
        return ride

    def unride(self, ride):
        with self._riders_lock:
            if ride in self._riders:
                self._riders.remove(ride)

    def _take_riders(self, room):
        with self._riders_lock:
            taken, self._riders = self._riders[:room], self._riders[room:]
        return taken

    # -- the loop -----------------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(target=self.run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout=10.0):
        self._stop.set()
        with self.outbox.wakeup:
            self.outbox.wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self):
        while not self._stop.is_set():
            try:
                busy = self.step()
            except sqlite3.Error:
                # the state store logged it and check shows it; what was sent and not
                # recorded is asked again later, with the checks for uncertain outcomes
                busy = False
                self._stop.wait(1)
            except Exception:
                log.exception("outbox: unexpected error; continuing in 5 s")
                busy = False
                self._stop.wait(5)
            if not busy:
                self._sleep_until_work()

    def _sleep_until_work(self):
        now = self.clock()
        due = self.outbox.next_due()
        wait = 1.0
        if due is not None:
            wait = min(wait, max(0.0, due - now))
        steady = self.steady()
        if self.paused_until > steady:
            wait = max(wait, min(self.paused_until - steady, 5.0))
        if self._bucket_wait > 0 and due is not None and due <= now:
            wait = max(wait, self._bucket_wait)   # work is due, the portal's budget is not
        if due is not None and due <= now:
            # due but held back (its method paused after a 429): sleep until the pause ends
            pauses = [t - steady for t in self.method_paused.values() if t > steady]
            if pauses:
                wait = max(wait, min(min(pauses), 1.0))
        with self.outbox.wakeup:
            if not self._stop.is_set() and wait > 0:
                self.outbox.wakeup.wait(wait)

    def step(self):
        """Send what is due; True when something was sent."""
        now = self.clock()
        if self.housekeeping_due(now):
            self.housekeeping(now)
        if self.users.stale(now):
            try:
                self.users.refresh()
            except BitrixError as exc:
                self.users.next_try = now + (60 if self.users.loaded_at else 3)
                log.warning("Bitrix24: cannot read users (user.get): %s", exc)
        steady = self.steady()
        if steady < self.paused_until:
            return False
        # Wait for the bucket before choosing what to send: a card that rings during
        # the wait goes in the next request, first, with whatever else is waiting then.
        self._bucket_wait = self.client.bucket.delay()
        if self._bucket_wait > 0:
            return False
        ready = [r for r in self.outbox.ready(now, 50) if self.method_paused.get(r.method, 0) <= steady]
        if not ready or self._hold_for_a_card(ready, now):
            return False
        ready = [r for r in ready if self._pre_send(r, now)]
        if not ready:
            return True
        singles = [r for r in ready if r.kind == "record"]
        rest = [r for r in ready if r.kind != "record"]
        riders = self._take_riders(5) if rest else []
        if len(rest) == 1 and not singles and not riders:
            self._send_single(rest[0])
        elif rest:
            self._send_batch(rest, riders)
        for r in singles[:1]:
            self._send_record(r)
        return True

    def _hold_for_a_card(self, ready, now):
        """While a quarter of the budget is spent, a finish (or anything else but a card) waits a
        moment to share the request of the next card instead of spending one alone;
        a card never waits for company."""
        if any(r.priority == PRIORITY_CARD for r in ready) or self.client.bucket.fill() <= self.HOLD_FILL:
            return False
        waited = now - min(max(r.created_at, r.next_at) for r in ready)
        if waited >= self.HOLD_SECONDS:
            return False
        self._bucket_wait = self.HOLD_SECONDS - waited
        return True

    def housekeeping_due(self, now):
        """Hourly, and as often as done requests fill what is kept: the file stays bounded
        under any load, not only a light one."""
        return (now - self._housekept > self.HOUSEKEEPING_EVERY
                or self.outbox.done_count - self._housekept_at_done >= self.KEEP_DONE_COUNT)

    def housekeeping(self, now):
        """Months of uptime must not grow the state database without bound."""
        self._housekept = now
        self._housekept_at_done = self.outbox.done_count
        self.outbox.purge_done(now - self.KEEP_DONE_SECONDS, self.KEEP_DONE_COUNT)
        self.records.purge(now - self.KEEP_CALLS_SECONDS, self.KEEP_CALLS_COUNT)
        self.outbox.store.reclaim()

    def _pre_send(self, req, now):
        """Work that needs no request, or decides a request is not needed."""
        row = self.records.get(req.linkedid) or {}
        if req.kind == "owner":
            if row.get("created_entities") not in (None, "[]", "null") or not row.get("crm_entity_id"):
                self.outbox.done(req, note="no existing CRM entity: nothing to look up")
                return False
        if req.kind in ("contact", "deal"):
            return self._deal_flow_needed(req, row)
        if req.kind == "task":
            check = req.params.get("check") or {}
            if self.records.answered_since(check.get("number"), check.get("since", 0), req.linkedid):
                self.outbox.done(req, note="the client got through since: no task")
                log.info("call %s: no missed-call task, %s got through since", req.linkedid,
                         check.get("number"))
                return False
            if req.attempts and (req.last_error is None or req.last_error.startswith("no answer")):
                # An earlier attempt got no answer (or the daemon died): the task may
                # exist already, and tasks.task.add is not idempotent.
                try:
                    fields = self.resolve(req, req.params["fields"])
                    found = self.client.call("tasks.task.list", {
                        "filter": {"TITLE": fields["TITLE"], "RESPONSIBLE_ID": fields["RESPONSIBLE_ID"]},
                        "select": ["ID", "TITLE"]})
                except (BitrixError, Unresolved, NotReady) as exc:
                    self.outbox.retry(req, self._backoff(req), "no answer: checking for the task: %s" % exc)
                    return False
                tasks = (found or {}).get("tasks") if isinstance(found, dict) else found
                if tasks:
                    self.outbox.done(req, note="the task was created by an earlier attempt")
                    return False
        if req.kind == "register" and (req.params.get("check") or {}).get("external_call_id"):
            return self._not_in_bitrix24_yet(req)
        if req.kind in ("finish", "record") and self._maybe_done_before(req) and row.get("call_id"):
            return self._not_done_yet(req, row)
        if req.kind in ("show", "hide"):
            try:
                users = self.resolve(req, req.params["USER_ID"])
            except Unresolved:
                users = []
            except NotReady as exc:
                self.outbox.retry(req, 2.0, str(exc))
                return False
            if not users:
                self.outbox.done(req, note="no Bitrix24 user to show/hide the card for")
                return False
        return True

    @staticmethod
    def _maybe_done_before(req):
        """An earlier attempt left and got no answer (or the daemon died waiting)."""
        return bool(req.attempts) and (req.last_error is None or req.last_error.startswith("no answer"))

    def _not_done_yet(self, req, row):
        """Whether a finish or attachRecord whose earlier attempt got no answer still has
        to go: the call's statistics record (voximplant.statistic.get) shows a finished
        call, and RECORD_FILE_ID an attached recording (a second upload is a second file)."""
        try:
            found = self.client.call("voximplant.statistic.get", {"FILTER": {"CALL_ID": row["call_id"]}})
        except BitrixError as exc:
            self.outbox.retry(req, self._backoff(req), "no answer: checking the call's statistics: %s" % exc)
            return False
        stats = [r for r in (found or []) if isinstance(r, dict) and r.get("CALL_ID") == row["call_id"]]
        if req.kind == "finish" and stats:
            self.records.update(req.linkedid, finished_at=time.time())
            self.outbox.done(req, note="finished by an earlier attempt")
            log.info("call %s: the finish that got no answer was carried out", req.linkedid)
            return False
        if req.kind == "record" and stats and stats[0].get("RECORD_FILE_ID"):
            self.outbox.done(req, note="attached by an earlier attempt")
            log.info("call %s: the recording that got no answer was attached", req.linkedid)
            return False
        return True

    def _deal_flow_needed(self, req, row):
        """A contact only for a number the register found no one for; a deal only for the
        contact just made. A contact whose answer was lost is looked for by its number."""
        created = [e.get("ENTITY_TYPE") for e in json.loads(row.get("created_entities") or "[]")]
        if req.kind == "deal":
            if "CONTACT" not in created:
                self.outbox.done(req, note="no new contact: no deal")
                return False
            return True
        if row.get("crm_entity_id"):
            self.outbox.done(req, note="the client is in the CRM (%s %s): no new contact"
                             % (row.get("crm_entity_type"), row.get("crm_entity_id")))
            return False
        if self._uncertain(req):
            number = req.params["check"]["number"]
            try:
                found = self.client.call("crm.duplicate.findbycomm",
                                         {"type": "PHONE", "values": [number], "entity_type": "CONTACT"})
            except BitrixError as exc:
                self.outbox.retry(req, self._backoff(req), "no answer: looking for the contact: %s" % exc)
                return False
            ids = (found or {}).get("CONTACT") if isinstance(found, dict) else None
            if ids:
                self._created(req.linkedid, "CONTACT", int(ids[0]))
                self.outbox.done(req, note="the contact was created by an earlier attempt")
                return False
        return True

    def _created(self, linkedid, entity_type, entity_id):
        row = self.records.get(linkedid) or {}
        created = json.loads(row.get("created_entities") or "[]")
        created.append({"ENTITY_TYPE": entity_type, "ENTITY_ID": entity_id})
        fields = {"created_entities": json.dumps(created)}
        if entity_type == "CONTACT":
            fields.update(crm_entity_type="CONTACT", crm_entity_id=entity_id)
        self.records.update(linkedid, **fields)

    def _not_in_bitrix24_yet(self, req):
        """A call recovered from CEL that this state knows nothing of: when the portal's
        statistics already hold it (by EXTERNAL_CALL_ID) it was reported before the state
        was lost, and the whole call is left as it is."""
        external = req.params["check"]["external_call_id"]
        try:
            found = self.client.call("voximplant.statistic.get", {"FILTER": {"EXTERNAL_CALL_ID": external}})
        except BitrixError as exc:
            self.outbox.retry(req, self._backoff(req), "no answer: looking the call up in the statistics: %s" % exc)
            return False
        stats = [r for r in (found or []) if isinstance(r, dict) and r.get("EXTERNAL_CALL_ID") == external]
        if not stats:
            return True
        self.records.update(req.linkedid, call_id=stats[0].get("CALL_ID"), finished_at=time.time())
        count = self.outbox.close_call(req.linkedid, "already in Bitrix24 (%s)" % stats[0].get("CALL_ID"))
        log.info("call %s: found in CEL and already in Bitrix24 as %s; %d request(s) not sent",
                 req.linkedid, stats[0].get("CALL_ID"), count)
        return False

    def _backoff(self, req):
        return min(self.BACKOFF_CAP, 0.5 * (1.6 ** max(0, req.attempts - 1)))

    # The call a request is about is not the hook's to change.
    PROTECTED = ("CALL_ID", "EXTERNAL_CALL_ID")

    def prepared(self, req, refs=None):
        """The request's parameters filled in and passed through its hook; HookSkipped
        when the hook says it is not to be sent."""
        params = self.resolve(req, req.params, refs)
        if req.kind not in HOOKED_REQUESTS or not self.hooks.has(HOOKED_REQUESTS[req.kind]):
            return params
        hooked = self.hooks.outbound(req.kind, params, self.facts(self.records.get(req.linkedid), req.linkedid))
        for key in self.PROTECTED:
            if key in params:
                hooked[key] = params[key]
        return hooked

    def _params(self, req):
        """The request's parameters ready to send, or None (then parked, postponed, or
        done because a hook said so)."""
        try:
            return self.prepared(req)
        except Unresolved as exc:
            self._park(req, str(exc))
        except NotReady as exc:
            self.outbox.retry(req, 2.0, str(exc))
        except HookSkipped:
            self.outbox.done(req, note="not sent: %s said so" % HOOKED_REQUESTS[req.kind])
            log.info("call %s: %s not sent (%s said so)", req.linkedid, req.method, HOOKED_REQUESTS[req.kind])
        return None

    def _leaving(self, requests):
        now = time.time()
        for req in requests:
            if req.attempts == 0 and req.priority == PRIORITY_CARD and req.kind in ("register", "show"):
                self.card_latency.observe(max(0.0, now - req.created_at))
        self.outbox.mark_sending(requests, self.unanswered_retry)

    def _send_single(self, req):
        params = self._params(req)
        if params is None:
            return
        self._leaving([req])
        self.sent_single += 1
        try:
            result = self.client.call(req.method, params)
        except BitrixError as exc:
            self._failed(req, exc)
            return
        self._succeeded(req, result)

    def _send_batch(self, heads, riders=()):
        commands, members, refs = [], [], {}
        room = 50 - len(riders)
        for req in heads:
            if len(commands) >= room:
                break
            params = self._params(req)
            if params is None:
                continue
            key = "r%d" % req.id
            commands.append((key, req.method, params))
            members.append((key, req, None))
            if req.kind == "register":
                refs[req.linkedid] = key
                # Only the card rides along: a finish in the same batch as its register
                # would, after a crash before the answer, meet a re-sent register that
                # can no longer be de-duplicated (Bitrix24 matches unfinished calls only).
                for follower in self.outbox.followers(req):
                    if len(commands) >= room or follower.kind not in ("show", "hide"):
                        break
                    try:
                        fparams = self.prepared(follower, refs)
                    except (Unresolved, NotReady, HookSkipped):
                        break
                    fkey = "r%d" % follower.id
                    commands.append((fkey, follower.method, fparams))
                    members.append((fkey, follower, key))
        if not commands:
            with self._riders_lock:
                self._riders[:0] = list(riders)  # nothing to carry them: they wait for the next batch
            return
        for n, ride in enumerate(riders):
            commands.append(("x%d" % n, ride.method, ride.params))
        self._leaving([m[1] for m in members])
        self.sent_batches += 1
        try:
            results, errors = self.client.batch(commands)
        except BitrixError as exc:
            for ride in riders:
                ride.finish(None, exc)
            for _key, req, _dep in members:
                self._failed(req, exc)
            return
        for n, ride in enumerate(riders):
            key = "x%d" % n
            if key in errors:
                ride.finish(None, classify_error(None, errors[key], ride.method))
            elif key in results:
                ride.finish(results[key], None)
            else:
                ride.finish(None, BitrixUnavailable("Bitrix24 batch: no answer for %s" % ride.method,
                                                    method=ride.method))
        failed = set()
        for key, req, depends_on in members:
            if depends_on is not None and depends_on in failed:
                failed.add(key)
                self.outbox.retry(req, 0, "not sent: register failed in the same batch")
                continue
            if key in errors:
                failed.add(key)
                self._failed(req, classify_error(None, errors[key], req.method))
            elif key in results:
                self._succeeded(req, results[key])
            else:
                failed.add(key)
                self._failed(req, BitrixUnavailable("Bitrix24 batch: no answer for %s" % req.method,
                                                    method=req.method))

    def _send_record(self, req):
        row = self.records.get(req.linkedid) or {}
        call_id = row.get("call_id")
        if not call_id:
            reason = self.outbox.parked_reason(req.linkedid, "register")
            self._park(req, "register failed: " + reason if reason else "no CALL_ID for the recording")
            return
        spec = req.params["FILENAME"]
        name = spec.get("name") or self.recordings.find_for_call(spec.get("uniqueids") or [], spec.get("started_at"))
        path = self.recordings.locate(name, spec.get("started_at")) if name else None
        if self.hooks.has("process_record_file_path"):
            path = self.hooks.call("process_record_file_path", path, (path, self.facts(row, req.linkedid)),
                                   self.a_recording)
            if path is not None and re.match(r"^https?://", path):
                self._send_record_url(req, call_id, path)
                return
            name = name or (os.path.basename(path) if path else None)
        if name is None:
            log.info("call %s: no recording found for it under %s", req.linkedid, self.recordings.path)
            self.outbox.done(req, note="no recording named after the call's channels")
            return
        if path is None:
            log.warning("call %s: recording %s not found under %s; the call is in Bitrix24 without it",
                        req.linkedid, name, self.recordings.path)
            self.outbox.done(req, note="recording not found")
            return
        if not self.recordings.settled(path, self.clock()):
            self.outbox.retry(req, self.recordings.settle_seconds, "waiting for MixMonitor to close the file")
            return
        try:
            name, data = self.recordings.prepare(path)
        except RecordingProblem as exc:
            log.warning("call %s: recording not attached: %s", req.linkedid, exc)
            self.outbox.done(req, note=str(exc))
            return
        self._leaving([req])
        try:
            if len(data) <= self.recordings.inline_max_bytes:
                self.client.call(req.method, {"CALL_ID": call_id, "FILENAME": name,
                                              "FILE_CONTENT": base64.b64encode(data).decode("ascii")})
            else:
                step = self.client.call(req.method, {"CALL_ID": call_id, "FILENAME": name})
                self.client.upload(step["uploadUrl"], step.get("fieldName") or "file", name, data)
        except BitrixError as exc:
            self._failed(req, exc)
            return
        except (KeyError, TypeError):
            self._failed(req, BitrixUnavailable("Bitrix24 attachRecord: no uploadUrl in the answer"))
            return
        log.info("call %s: recording %s attached (%d bytes)", req.linkedid, name, len(data))
        self.outbox.done(req)

    @staticmethod
    def a_recording(result):
        """What process_record_file_path may answer: None, a regular file, an http(s) URL."""
        if result is None:
            return None
        if not isinstance(result, str) or has_line_break(result):
            raise ValueError("a file path or an http(s) URL")
        if re.match(r"^https?://[^\s/]+/\S*$", result):
            return result
        if not os.path.isabs(result) or not is_regular_file(result):
            raise ValueError("an absolute path of a regular file, or an http(s) URL")
        return result

    def _send_record_url(self, req, call_id, url):
        """attachRecord with RECORD_URL: the portal fetches the file itself."""
        self._leaving([req])
        try:
            self.client.call(req.method, {"CALL_ID": call_id, "RECORD_URL": url,
                                          "FILENAME": url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]})
        except BitrixError as exc:
            self._failed(req, exc)
            return
        log.info("call %s: recording attached by URL %s", req.linkedid, url)
        self.outbox.done(req)

    # -- outcomes -------------------------------------------------------------------------------
    def _park(self, req, reason):
        log.error("call %s: %s parked: %s", req.linkedid, req.method, reason)
        self.outbox.park(req, reason)
        if req.kind == "register":
            self.outbox.park_call(req.linkedid, "register failed: " + reason)

    REGISTER_ANSWER_TRIES = 5

    def _succeeded(self, req, result):
        linkedid = req.linkedid
        if req.kind == "register" and not (isinstance(result, dict) and result.get("CALL_ID")):
            # Nothing to finish the call with: asked again (the same EXTERNAL_CALL_ID
            # finds the call if the portal did register it), then given up with the reason.
            reason = "register answered without a CALL_ID: %s" % json.dumps(result)[:200]
            if req.attempts >= self.REGISTER_ANSWER_TRIES:
                self._park(req, reason)
            else:
                self.outbox.retry(req, self._backoff(req), reason)
                log.warning("call %s: %s; asking again", linkedid, reason)
            return
        self.outage.succeeded()
        self.last_sent_at = time.time()
        if self.alert and self.paused_until <= self.steady() and req.kind != "owner":
            log.info("Bitrix24 accepts requests again; the alert (%s) no longer applies", self.alert)
            self.alert = None
        if req.kind == "register" and isinstance(result, dict):
            self.records.update(linkedid, call_id=result.get("CALL_ID"),
                                crm_entity_type=result.get("CRM_ENTITY_TYPE") or None,
                                crm_entity_id=result.get("CRM_ENTITY_ID") or None,
                                created_entities=json.dumps(result.get("CRM_CREATED_ENTITIES") or []))
            log.info("call %s: registered in Bitrix24 as CALL_ID=%s%s", linkedid, result.get("CALL_ID"),
                     " (created %s)" % result.get("CRM_CREATED_ENTITIES") if result.get("CRM_CREATED_ENTITIES") else "")
        elif req.kind == "owner" and isinstance(result, list):
            row = self.records.get(linkedid) or {}
            owner = None
            for entity in result:
                if str(entity.get("CRM_ENTITY_ID")) == str(row.get("crm_entity_id")) or owner is None:
                    owner = entity.get("ASSIGNED_BY_ID") or owner
            if owner:
                self.records.update(linkedid, crm_owner_id=int(owner))
        elif req.kind == "finish":
            self.records.update(linkedid, finished_at=time.time())
            row = self.records.get(linkedid) or {}
            log.info("call %s: finished in Bitrix24 CALL_ID=%s", linkedid, row.get("call_id"))
        elif req.kind == "task" and isinstance(result, dict):
            task = result.get("task") or {}
            if task.get("id"):
                self.records.update(linkedid, task_id=int(task["id"]))
            log.info("call %s: missed-call task %s created", linkedid, task.get("id"))
        elif req.kind == "hook":
            log.info("call %s: %s (queued by a hook) done", linkedid, req.method)
        elif req.kind in ("contact", "deal") and is_digits(str(result)):
            self._created(linkedid, req.kind.upper(), int(result))
            log.info("call %s: %s %s created for the line", linkedid, req.kind, result)
        follow = {"register": "post_registration", "finish": "post_finish"}.get(req.kind)
        if follow is not None and self.hooks.has(follow):
            for method, params in self.hooks.follow_ups(follow, result, self.facts(self.records.get(linkedid), linkedid)):
                self.outbox.add(linkedid, "hook", method, params, PRIORITY_LATER)
        self.outbox.done(req)

    def _waiting(self):
        return self.outbox.counts().get("pending", 0)

    def _uncertain(self, req):
        """An earlier attempt may have been carried out: sent, but no answer came."""
        return req.attempts > 1 and (req.last_error is None or req.last_error.startswith("no answer"))

    def _failed(self, req, exc):
        now = self.steady()
        if isinstance(exc, BitrixUnavailable):
            delay = self._backoff(req)
            if exc.maybe_done and req.kind in Outbox.UNCERTAIN_KINDS:
                # The portal may still be carrying out the attempt that timed out:
                # resent now, a register would pop up a second card with its own CALL_ID.
                delay = max(delay, req.next_at - time.time())
                if req.attempts == 1:
                    log.info("call %s: %s got no answer; it may have been carried out, so it is "
                             "asked again in %.0f s", req.linkedid, req.method, delay)
            self.outbox.retry(req, delay, "no answer: %s" % exc)
            self.outage.failed(exc, self._waiting)
            # The portal is away for every request, not just this one: one probe per
            # back-off step instead of each waiting request trying on its own clock.
            self.paused_until = max(self.paused_until, now + self.outage.backoff(self.BACKOFF_CAP))
        elif isinstance(exc, BitrixRateLimited):
            delay = self._backoff(req)
            self.paused_until = max(self.paused_until, now + delay)
            self.outbox.retry(req, delay, str(exc))
            self.outage.failed(exc, self._waiting)
        elif isinstance(exc, BitrixMethodLimited):
            self.method_paused[req.method] = now + 60
            self.outbox.retry(req, 60, str(exc))
            log.warning("Bitrix24: %s is over its operating-time budget; pausing it for 60 s", req.method)
        elif isinstance(exc, BitrixOverloaded):
            self.paused_until = now + 600
            self.outbox.retry(req, 600, str(exc))
            log.error("%s: REST is blocked by Bitrix24; all requests wait 10 minutes", exc)
            self.alert = str(exc)   # last: whoever sees the alert sees the request put back too
        elif isinstance(exc, BitrixAuthExpired):
            self.outbox.retry(req, self._backoff(req), str(exc))
        elif req.kind == "finish" and exc.description.startswith("Call is not found") and self._uncertain(req):
            log.info("call %s: finish answered 'not found' after an unanswered attempt: it was done",
                     req.linkedid)
            self.records.update(req.linkedid, finished_at=time.time())
            self.outbox.done(req, note="already finished")
        elif req.kind == "record" and "not finished yet" in exc.description and req.attempts < 4:
            self.outbox.retry(req, 5 * req.attempts, str(exc))
        else:
            self._park(req, str(exc))
            if isinstance(exc, BitrixAuthFailed):
                self.alert = str(exc)


###############################################################################
# CEL #########################################################################
###############################################################################
# Asterisk's Channel Event Logging table is the memory of every call, also of
# those made while bx24ast was not connected. A finished call's CEL rows are
# turned into the AMI events CallTracker understands, so recovered calls are
# read with exactly the rules of live ones.

class CelError(Exception):
    """The CEL store cannot be read (missing, locked, wrong table or credentials)."""


# The columns a call is rebuilt from, in the order every back-end yields them.
# Rows are plain named tuples: reading them is most of the cost of a recovery.
CelRow = collections.namedtuple("CelRow", "id eventtype eventtime cid_num exten context channame "
                                          "uniqueid linkedid extra")
CEL_COLUMNS = CelRow._fields
# The rows a call is rebuilt from; the database skips the others (CHAN_END, DTMF,
# STREAM_*, HOLD, APP_*...), which on a busy PBX are most of the table.
CEL_USED_EVENTS = ("CHAN_START", "ANSWER", "HANGUP", "BRIDGE_ENTER", "BRIDGE_EXIT", "BLINDTRANSFER",
                   "ATTENDEDTRANSFER", "PICKUP", "LINKEDID_END")
_CEL_EVENTS_SQL = "eventtype IN (%s)" % ", ".join("'%s'" % e for e in CEL_USED_EVENTS)


_CEL_TIMES = {}


def cel_time(text):
    """CEL eventtime (dateformat %F %T, the PBX's local time; or epoch seconds)."""
    cached = _CEL_TIMES.get(text)
    if cached is not None:
        return cached
    if len(_CEL_TIMES) > 4096:
        _CEL_TIMES.clear()  # one-second resolution: a call's rows share a handful of times
    _CEL_TIMES[text] = value = _cel_time(text)
    return value


def _cel_time(text):
    text = (text or "").strip()
    try:
        return float(text)
    except ValueError:
        pass
    m = re.match(r"(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(\.\d+)?", text)
    if not m:
        raise CelError(say("CEL eventtime %r is not a date", text))
    parts = [int(x) for x in m.groups()[:6]]
    return time.mktime(tuple(parts) + (0, 0, -1)) + float(m.group(7) or 0)


_make_cel_row = CelRow._make


class SqliteCel(object):
    """CEL written by cel_sqlite3_custom, read-only: Asterisk keeps writing meanwhile."""

    def __init__(self, path, table="cel", id_column="AcctId"):
        self.path = path
        self.table = table
        self.id_column = id_column
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", table) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", id_column):
            raise CelError(say("CEL table/column names must be plain identifiers: %r, %r", table, id_column))

    def describe(self):
        return "sqlite %s (table %s)" % (self.path, self.table)

    def _connect(self):
        if not os.path.exists(self.path):
            raise CelError(say("CEL database %s does not exist (cel_sqlite3_custom not loaded?)", self.path))
        if not is_regular_file(self.path):
            # a FIFO or a device would block the reading thread for ever
            raise CelError(say("[cel] sqlite_path %s is not a regular file", self.path))
        try:
            db = sqlite3.connect("file:%s?mode=ro" % sqlite_uri_path(os.path.abspath(self.path)),
                                 uri=True, timeout=5)
            db.execute("PRAGMA query_only = 1")
            cols = [r[1] for r in db.execute("PRAGMA table_info(%s)" % self.table)]
        except sqlite3.Error as exc:
            raise CelError(say("cannot read CEL database %s: %s", self.path, exc))
        if not cols:
            db.close()
            raise CelError(say("CEL database %s has no table '%s'", self.path, self.table))
        missing = [c for c in CEL_COLUMNS[1:] if c not in cols]
        if missing or self.id_column not in cols:
            db.close()
            raise CelError(say("CEL table %s.%s lacks columns %s", self.path, self.table,
                                                                 ", ".join(missing or [self.id_column])))
        return db

    def rows(self, after_id=0, since=None, batch=5000):
        """CEL rows with id > after_id (and eventtime >= since), in id order, streamed."""
        db = self._connect()
        select = ", ".join(["%s AS id" % self.id_column] + list(CEL_COLUMNS[1:]))
        last = after_id
        try:
            while True:
                sql = "SELECT %s FROM %s WHERE %s > ? AND %s" % (select, self.table, self.id_column,
                                                                  _CEL_EVENTS_SQL)
                args = [last]
                if since:
                    sql += " AND eventtime >= ?"
                    args.append(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)))
                sql += " ORDER BY %s LIMIT %d" % (self.id_column, batch)
                try:
                    chunk = db.execute(sql, args).fetchall()
                except sqlite3.Error as exc:
                    raise CelError(say("reading CEL from %s failed: %s", self.path, exc))
                for row in map(_make_cel_row, chunk):
                    yield row
                if len(chunk) < batch:
                    return
                last = chunk[-1][0]
        finally:
            db.close()

    def newest(self):
        """(id, eventtime) of the last CEL row, or (None, None) for an empty table."""
        db = self._connect()
        try:
            row = db.execute("SELECT %s, eventtime FROM %s ORDER BY %s DESC LIMIT 1"
                             % (self.id_column, self.table, self.id_column)).fetchone()
        except sqlite3.Error as exc:
            raise CelError(say("reading CEL from %s failed: %s", self.path, exc))
        finally:
            db.close()
        return (row[0], cel_time(row[1])) if row else (None, None)

    def first_since(self, since):
        """The id of the first CEL row written at or after since, or None."""
        db = self._connect()
        try:
            row = db.execute("SELECT MIN(%s) FROM %s WHERE eventtime >= ?" % (self.id_column, self.table),
                             (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)),)).fetchone()
        except sqlite3.Error as exc:
            raise CelError(say("reading CEL from %s failed: %s", self.path, exc))
        finally:
            db.close()
        return row[0] if row else None


_HANGUP_CAUSE_STATUS = {17: "BUSY", 21: "BUSY", 18: "NOANSWER", 19: "NOANSWER", 26: "CANCEL",
                        1: "CHANUNAVAIL", 3: "CHANUNAVAIL", 20: "CHANUNAVAIL", 27: "CHANUNAVAIL",
                        34: "CONGESTION", 38: "CONGESTION", 42: "CONGESTION"}


_BRIDGE_ID = LazyPattern(r'"bridge_id"\s*:\s*"([^"]*)"')


def _cel_extra(extra):
    try:
        extra = json.loads(extra or "{}")
        return extra if isinstance(extra, dict) else {}
    except ValueError:
        return {}


def cel_events(rows, rules):
    """The AMI events that a finished call's CEL rows stand for.

    CEL has no Dial events: a channel that starts after the first one of the call
    was dialled by it (the trunk dials the ring group, the phone dials the trunk),
    and its ANSWER or HANGUP cause tells how that dial ended. The second half of a
    Local channel is not dialled, it is born with the first; of an originated Local
    pair, the second half is the one that dials. The CallTracker then reads these
    events with the live rules.
    """
    if not rows:
        return []
    linkedid = rows[0].linkedid
    by_channel = collections.OrderedDict()
    for row in rows:
        chan_rows = by_channel.get(row.uniqueid)
        if chan_rows is None:
            by_channel[row.uniqueid] = [row]
        else:
            chan_rows.append(row)
    origin_uid = linkedid if linkedid in by_channel else rows[0].uniqueid
    origin_name = by_channel[origin_uid][0].channame or ""
    dialer_uid = origin_uid
    if origin_name.startswith("Local/") and origin_name.endswith(";1"):
        partner = origin_name[:-1] + "2"
        dialer_uid = next((u for u, r in by_channel.items() if r[0].channame == partner), origin_uid)
    dialer_rows = by_channel[dialer_uid]
    dialer_cid = _first_cid(dialer_rows, rules, True) or _first_cid(dialer_rows, rules, False)
    if dialer_uid != origin_uid and not rules.is_extension(dialer_cid):
        # Local/<number>@...: the first half is the phone user who placed the call to
        # that number (a call file); the second half shows the caller ID the outbound
        # route presents instead.
        number = local_channel_parts(origin_name)[0]
        if rules.is_external_number(number) and any(
                _dialled(r, rules) == number for u, r in by_channel.items() if u not in (origin_uid, dialer_uid)):
            dialer_cid = _first_cid(by_channel[origin_uid], rules, True) or dialer_cid
    origin = {"Channel": dialer_rows[0].channame, "Uniqueid": dialer_uid, "Linkedid": linkedid,
              "CallerIDNum": dialer_cid}
    # Local/<extension>@... (a click-to-call): the second half rings the phone, the
    # first half, once the phone answered, dials the client.
    outward = origin
    if dialer_uid != origin_uid and rules.is_extension(local_channel_parts(origin_name)[0].rstrip("#")):
        outward = {"Channel": origin_name, "Uniqueid": origin_uid, "Linkedid": linkedid,
                   "CallerIDNum": _first_cid(by_channel[origin_uid], rules, True)}
    dialer_status = _dial_status_of(dialer_rows)
    events = []
    append = events.append
    answered = set()
    # The hot loop of a recovery: headers are built inline, not through helpers.
    for row in rows:
        _, kind, stamp, cid, exten, context, name, uid, row_linkedid, extra = row
        when = cel_time(stamp)
        name = name or ""
        if kind == "HANGUP" or kind == "ANSWER" or kind == "CHAN_START":
            local_second = name.endswith(";2") and name.startswith("Local/")
            dest = {"DestChannel": name, "DestUniqueid": uid, "DestLinkedid": row_linkedid,
                    "DestContext": context or "", "DestExten": exten or "", "DestCallerIDNum": cid or ""}
        if kind == "CHAN_START":
            head = {"Event": "Newchannel", "Channel": name, "Uniqueid": uid, "Linkedid": row_linkedid,
                    "Context": context or "", "Exten": exten or "", "CallerIDNum": cid or ""}
            if uid == origin_uid:
                # Local roots never call themselves (their second half does); others
                # call unless they were originated: a phone rung first sits at 's'.
                calling = dialer_uid == origin_uid and not name.startswith("Local/") and (
                    exten not in ("", "s") or rules.extension_of_channel(name) is None)
                # CallerID may be filled in after CHAN_START (Local channels, trunk
                # legs starting at 's'): look ahead in the channel's rows.
                head["CallerIDNum"] = cid or _first_cid(by_channel[uid], rules, False) if \
                    rules.extension_of_channel(name) is None else \
                    _first_cid(by_channel[uid], rules, True) or cid or ""
                head["ChannelState"] = "4" if calling else "0"
                append(Message(head, True, "Newchannel", when))
                if not calling:
                    # Originated (click-to-call, call file): nobody dialled it.
                    dest["Event"] = "DialBegin"
                    dest["DialString"] = exten or ""
                    append(Message(dest, True, "DialBegin", when))
            else:
                head["ChannelState"] = "4" if local_second else "0"
                if uid == dialer_uid:
                    head["CallerIDNum"] = dialer_cid
                append(Message(head, True, "Newchannel", when))
                if not local_second:
                    number = None if rules.extension_of_channel(name) else _dialled(by_channel[uid], rules)
                    dest.update(outward if number else origin)
                    dest["Event"] = "DialBegin"
                    dest["DialString"] = number or exten or ""
                    if number:
                        # where the dialler was routed before dialling out (a forward)
                        dest["Exten"] = next((r.exten for r in dialer_rows if r.id >= row.id
                                              and rules.is_extension(r.exten)), "")
                    append(Message(dest, True, "DialBegin", when))
        elif kind == "BRIDGE_ENTER" or kind == "BRIDGE_EXIT":
            m = _BRIDGE_ID.search(extra or "")
            if m:
                event = "BridgeEnter" if kind == "BRIDGE_ENTER" else "BridgeLeave"
                append(Message({"Event": event, "Channel": name, "Uniqueid": uid, "Linkedid": row_linkedid,
                                "Context": context or "", "Exten": exten or "", "CallerIDNum": cid or "",
                                "BridgeUniqueid": m.group(1)}, True, event, when))
        elif kind == "ANSWER":
            if uid != origin_uid and uid != dialer_uid and not local_second and uid not in answered:
                answered.add(uid)
                dest.update(origin)
                dest["Event"] = "DialEnd"
                dest["DialStatus"] = "ANSWER"
                append(Message(dest, True, "DialEnd", when))
        elif kind == "HANGUP":
            if uid != origin_uid and uid != dialer_uid and not local_second and uid not in answered:
                cause = _cel_extra(extra).get("hangupcause")
                try:
                    status = _HANGUP_CAUSE_STATUS.get(int(cause), "NOANSWER")
                except (TypeError, ValueError):
                    status = "NOANSWER"
                if status == "NOANSWER" and dialer_status in _DIAL_FAILURES:
                    status = dialer_status  # the far end's own cause is often just 0
                dest.update(origin)
                dest["Event"] = "DialEnd"
                dest["DialStatus"] = status
                append(Message(dest, True, "DialEnd", when))
            if events and events[-1].name == "BridgeLeave" and events[-1]["Uniqueid"] == uid:
                events.pop()  # a Hangup leaves the bridge itself; one event less to track
            append(Message({"Event": "Hangup", "Channel": name, "Uniqueid": uid, "Linkedid": row_linkedid,
                            "Context": context or "", "Exten": exten or "", "CallerIDNum": cid or ""},
                           True, "Hangup", when))
        elif kind == "PICKUP":
            info = _cel_extra(extra)
            picker = info.get("pickup_channel_uniqueid", "")
            picker_rows = by_channel.get(picker)
            if picker_rows:
                append(Message({"Event": "Pickup", "Channel": info.get("pickup_channel", ""),
                                "Uniqueid": picker, "Linkedid": row_linkedid,
                                "CallerIDNum": _first_cid(picker_rows, rules, True),
                                "TargetChannel": name, "TargetUniqueid": uid,
                                "TargetLinkedid": row_linkedid}, True, "Pickup", when))
        elif kind == "BLINDTRANSFER" or kind == "ATTENDEDTRANSFER":
            info = _cel_extra(extra)
            head = {"Channel": name, "Uniqueid": uid, "Linkedid": row_linkedid, "Context": context or "",
                    "Exten": exten or "", "CallerIDNum": cid or "", "Result": "Success",
                    "TransfereeUniqueid": info.get("transferee_channel_uniqueid", "")}
            if kind == "BLINDTRANSFER":
                head.update(Event="BlindTransfer", TransfererUniqueid=uid, TransfererLinkedid=linkedid,
                            Extension=info.get("extension", ""))
                append(Message(head, True, "BlindTransfer", when))
            else:
                head.update(Event="AttendedTransfer", OrigTransfererUniqueid=uid,
                            TransferTargetUniqueid=info.get("transfer_target_channel_uniqueid", ""))
                append(Message(head, True, "AttendedTransfer", when))
    return events


_DIAL_FAILURES = ("BUSY", "CHANUNAVAIL", "CONGESTION")


def _dial_status_of(chan_rows):
    """The dialstatus a channel's HANGUP row reports for its own last Dial."""
    for row in reversed(chan_rows):
        if row.eventtype == "HANGUP":
            return _cel_extra(row.extra).get("dialstatus") or ""
    return ""


def _first_cid(chan_rows, rules, extension_only):
    for row in chan_rows:
        cid = row.cid_num
        if cid and (not extension_only or rules.is_extension(cid)):
            return cid
    return ""


def _dialled(chan_rows, rules):
    """The external number a channel dialled, from the first of its rows that shows one."""
    for row in chan_rows:
        number = rules.dialled_number(row.exten, row.cid_num)
        if number:
            return number
    return None


class CelCallBuilder(object):
    """Feeds finished calls' CEL rows through one CallTracker (the live rules)."""

    def __init__(self, rules):
        self.rules = rules
        self._ended = []
        self.tracker = CallTracker(rules, self._on_call_event)

    def _on_call_event(self, kind, call, extension):
        if kind == "ended":
            self._ended.append(call)

    def calls(self, group):
        """The call(s) one linkedid's rows make."""
        handle = self.tracker.handle
        for msg in cel_events(group, self.rules):
            handle(msg)
        # A call whose CEL lacks a HANGUP (a crash of Asterisk) is still closed here.
        self.tracker.close_call(group[0].linkedid, cel_time(group[-1].eventtime))
        ended, self._ended = self._ended, []
        return ended


class CelGroups(object):
    """Rows grouped into calls by Linkedid, as they stream in. A channel Asterisk
    re-links into another call (a pickup, a phone-driven transfer) takes all its rows
    along, so that each call is rebuilt from every channel it ended with."""

    def __init__(self):
        self.open = collections.OrderedDict()
        self._owner = {}

    def add(self, row):
        """Adds a row; returns the call's rows when its LINKEDID_END closed it."""
        linkedid, uid = row.linkedid, row.uniqueid
        group = self.open.get(linkedid)
        if group is None:
            group = self.open[linkedid] = []
        previous = self._owner.get(uid)
        if previous is not None and previous != linkedid and previous in self.open:
            old = self.open[previous]
            group.extend(r for r in old if r.uniqueid == uid)
            group.sort(key=lambda r: r.id)
            old[:] = [r for r in old if r.uniqueid != uid]
            if not old:
                del self.open[previous]
        self._owner[uid] = linkedid
        group.append(row)
        if row.eventtype != "LINKEDID_END":
            return None
        del self.open[linkedid]
        for r in group:
            if self._owner.get(r.uniqueid) == linkedid:
                del self._owner[r.uniqueid]
        return group

    def first_open_id(self):
        return min(g[0].id for g in self.open.values()) if self.open else None


def rebuild_calls(rows, rules):
    """The finished calls in a set of CEL rows (grouped by linkedid), live rules."""
    groups = CelGroups()
    builder = CelCallBuilder(rules)
    calls = []
    for row in rows:
        group = groups.add(row)
        if group is not None:
            calls.extend(builder.calls(group))
    for group in list(groups.open.values()):
        calls.extend(builder.calls(group))
    return calls


class CelRecovery(object):
    """Reports to Bitrix24 the calls CEL holds that the live path never reported.

    A checkpoint (last CEL id read) lives in the state store. Rows are read from
    it; a call counts once LINKEDID_END closed it; calls still open stay for the
    next pass, and the checkpoint never moves past their first row.
    """

    def __init__(self, source, store, rules, crm=None, recordings=None, pbx=""):
        self.source = source
        self.store = store
        self.rules = rules
        self.crm = crm
        self.recordings = recordings
        # each PBX reads its own CEL from its own place
        self.checkpoint_key = "cel.checkpoint" + (":" + pbx if pbx else "")
        self.recovered = collections.Counter()   # "late" / "finished" -> calls (metrics)

    def checkpoint(self):
        return self.store.get_setting(self.checkpoint_key)

    def start_from_now(self, hours=24.0, now=None):
        """No checkpoint (a first start, or the state database was lost): CEL is read from
        `hours` back, so that the calls of a daemon whose state is gone are not skipped
        and the calls in progress are read from their first row; 0 starts at the newest row."""
        if self.checkpoint() is not None:
            return
        newest, _ = self.source.newest()
        start = newest or 0
        if hours and newest is not None:
            first = self.source.first_since((time.time() if now is None else now) - hours * 3600)
            start = (first - 1) if first is not None else newest
            log.warning("CEL: no checkpoint in the state database (a new or lost state): calls of the last "
                        "%g h are read from CEL and reported unless Bitrix24 already has them "
                        "([cel] recover_hours_without_state)", hours)
        self.store.set_setting(self.checkpoint_key, start)

    @staticmethod
    def _from_its_start(group):
        """Whether the rows hold the call's beginning (its root channel's CHAN_START)."""
        linkedid = group[-1].linkedid
        return any(r.eventtype == "CHAN_START" and r.uniqueid == linkedid for r in group)

    def run_once(self, since=None, dry_run=False, report=None):
        """One pass; returns how many finished external calls CEL held (each handed to
        report(call) as it is rebuilt, so memory stays flat whatever the backlog)."""
        start = 0 if since is not None else (self.checkpoint() or 0)
        groups = CelGroups()
        found = 0
        last_id = start
        builder = CelCallBuilder(self.rules)
        for row in self.source.rows(start, since):
            last_id = row.id
            group = groups.add(row)
            if group is not None and not self._from_its_start(group):
                # the tail of a call closed (and reported) before the checkpoint: its
                # last rows came after the first row of a call still open then
                group = None
            if group is not None:
                for call in builder.calls(group):
                    if not is_reportable(call, self.rules):
                        continue
                    if self.recordings is not None and call.recording is None:
                        call.recording = self.recordings.find_for_call(
                            [r.uniqueid for r in group], call.started_at)
                    found += 1
                    if report is not None:
                        report(call)
                    if not dry_run and self.crm is not None:
                        done = self.crm.report_finished(call)
                        if done:
                            self.recovered[done] += 1
                        if done == "late":
                            log.info("call %s: found in CEL, reported late (%s, %s)", call.linkedid,
                                     call.direction, call.disposition)
                        elif done:
                            log.info("call %s: finished from CEL, as Asterisk recorded it (%s, %d s)",
                                     call.linkedid, call.disposition, call.billsec)
        if since is None and not dry_run:
            first_open = groups.first_open_id()
            new = (first_open - 1) if first_open is not None else last_id
            self.store.set_setting(self.checkpoint_key, max(start, new))
        return found


class MysqlCel(object):
    """CEL in MySQL/MariaDB (FreePBX's asteriskcdrdb.cel), read through the mysql
    command-line client: no driver to install on the PBX. Values travel as HEX()
    so that tabs, newlines and NULLs inside them cannot break the rows apart."""

    def __init__(self, database="asteriskcdrdb", table="cel", user="", password="", host="localhost",
                 port=3306, socket_path="", id_column="id", client="mysql", timeout=60):
        for name in (database, table, id_column):
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise CelError(say("CEL database/table/column names must be plain identifiers: %r", name))
        self.database, self.table, self.id_column = database, table, id_column
        self.user, self.password = user, password
        self.host, self.port, self.socket_path = host, port, socket_path
        self.client = client
        self.timeout = timeout

    def describe(self):
        where = self.socket_path or "%s:%s" % (self.host, self.port)
        return "mysql %s.%s at %s as %s" % (self.database, self.table, where, self.user or "(default user)")

    def _options_file(self):
        import tempfile
        fd, path = tempfile.mkstemp(prefix="bx24ast-my-", suffix=".cnf")
        os.fchmod(fd, 0o600)
        lines = ["[client]"]
        for key, value in (("user", self.user), ("password", self.password), ("host", self.host),
                           ("port", self.port), ("socket", self.socket_path)):
            if value not in ("", None):
                # Quoted, so that '#', ';' or spaces in a password survive the option file.
                quoted = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "")
                lines.append('%s="%s"' % (key, quoted))
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def _run(self, sql):
        """Yield the output lines of one query; CelError with the reason on failure."""
        options = self._options_file()
        cmd = [self.client, "--defaults-extra-file=" + options, "--batch", "--raw", "--skip-column-names",
               "--connect-timeout=10", "--database=" + self.database, "--execute=" + sql]
        try:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
            except OSError as exc:
                raise CelError(say("the mysql client (%s) cannot be run: %s; install mariadb-client "
                               "(apt) or mariadb (yum)", self.client, exc.strerror))
            complete = False
            try:
                # Read in large blocks and split here: line by line from the pipe
                # costs more than parsing the rows. No value holds a raw newline
                # (free text travels as HEX), so every b"\n" ends a row.
                tail = b""
                while True:
                    block = proc.stdout.read(1 << 18)
                    if not block:
                        break
                    lines = (tail + block).split(b"\n")
                    tail = lines.pop()
                    for line in lines:
                        yield line
                if tail:
                    yield tail
                complete = True
            finally:
                if not complete:
                    proc.kill()
                proc.stdout.close()
                err = proc.stderr.read().decode("utf-8", "replace").strip()
                proc.stderr.close()
                code = proc.wait()
            if code != 0:
                if "Access denied" in err:
                    raise CelError(say("MySQL refused [cel] mysql_user/mysql_password: %s", err.splitlines()[-1]))
                if "doesn't exist" in err:
                    raise CelError(say("MySQL has no table %s.%s ([cel] mysql_database, table): %s",
                                       self.database, self.table, err.splitlines()[-1]))
                raise CelError(say("mysql failed (exit %d): %s", code, (err.splitlines() or ["no message"])[-1]))
        finally:
            os.unlink(options)

    # Columns Asterisk fills with its own tokens travel raw; those a caller, the
    # dialplan or a channel driver can fill (a CallerID may hold a tab) travel as
    # HEX(), a NULL as an empty value (the call engine reads both alike).
    _RAW_COLUMNS = frozenset(("eventtype", "eventtime", "uniqueid", "linkedid"))

    def rows(self, after_id=0, since=None, batch=50000):
        cols = ", ".join(["`%s`" % self.id_column] + [
            ("`%s`" if c in self._RAW_COLUMNS else "COALESCE(HEX(`%s`), '')") % c for c in CEL_COLUMNS[1:]])
        unhex = binascii.unhexlify
        width = len(CEL_COLUMNS)
        last = int(after_id or 0)
        while True:
            where = "`%s` > %d AND %s" % (self.id_column, last, _CEL_EVENTS_SQL)
            if since:
                where += " AND eventtime >= '%s'" % time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
            sql = "SELECT %s FROM `%s` WHERE %s ORDER BY `%s` LIMIT %d" % (
                cols, self.table, where, self.id_column, batch)
            count = 0
            for line in self._run(sql):
                f = line.split(b"\t")
                if len(f) != width:
                    raise CelError(say("unexpected mysql output (%d fields, %d expected)", len(f), width))
                # Spelled out column by column (CelRow's order): this runs for every row.
                last = int(f[0])
                count += 1
                yield CelRow(last, f[1].decode("ascii", "replace"), f[2].decode("ascii", "replace"),
                             unhex(f[3]).decode("utf-8", "replace"), unhex(f[4]).decode("utf-8", "replace"),
                             unhex(f[5]).decode("utf-8", "replace"), unhex(f[6]).decode("utf-8", "replace"),
                             f[7].decode("ascii", "replace"), f[8].decode("ascii", "replace"),
                             unhex(f[9]).decode("utf-8", "replace"))
            if count < batch:
                return

    def newest(self):
        lines = list(self._run("SELECT `%s`, HEX(eventtime) FROM `%s` ORDER BY `%s` DESC LIMIT 1"
                               % (self.id_column, self.table, self.id_column)))
        if not lines:
            return None, None
        ident, stamp = lines[0].split(b"\t")
        return int(ident), cel_time(bytes.fromhex(stamp.decode()).decode())

    def first_since(self, since):
        lines = list(self._run("SELECT MIN(`%s`) FROM `%s` WHERE eventtime >= '%s'"
                               % (self.id_column, self.table,
                                  time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)))))
        value = lines[0].strip() if lines else b""
        return int(value) if value.isdigit() else None


NEEDED_CEL_EVENTS = ("CHAN_START", "ANSWER", "HANGUP", "BRIDGE_ENTER", "BRIDGE_EXIT", "LINKEDID_END")


def _read_ini(path):
    """An Asterisk/ODBC style .conf file as {section: {key: value}}, or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except (IOError, OSError):
        return None
    out = collections.OrderedDict()
    section = None
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^\[([^\]]+)\]", line)
        if m:
            section = out.setdefault(m.group(1).strip(), collections.OrderedDict())
            continue
        if section is not None and ("=" in line):
            key, _, value = line.partition("=")
            # Asterisk accepts both "key = value" and "key => value".
            section[key.strip().lower()] = value.lstrip(">").strip().strip('"')
    return out


def detect_cel(root="/", asterisk_etc=None):
    """Where this PBX keeps CEL, the way an admin would look: FreePBX's database
    settings, cel_odbc + res_odbc + odbc.ini, cel_sqlite3_custom, and which CEL
    events cel.conf enables. Candidates, best first; passwords are kept for use,
    never for printing (see describe_detection)."""
    etc = asterisk_etc or os.path.join(root, "etc", "asterisk")
    found, warnings = [], []
    cel_conf = _read_ini(os.path.join(etc, "cel.conf"))
    if cel_conf is None:
        warnings.append(say("no %s: CEL is not configured", os.path.join(etc, "cel.conf")))
    else:
        general = cel_conf.get("general", {})
        if general.get("enable", "no").lower() not in ("yes", "true", "1", "on"):
            warnings.append(say("cel.conf: enable is not 'yes': Asterisk writes no CEL"))
        events = set(e.strip().upper() for e in general.get("events", "").split(",") if e.strip())
        if "ALL" not in events:
            missing = [e for e in NEEDED_CEL_EVENTS if e not in events]
            if missing:
                warnings.append(say("cel.conf: events %s are off; recovery needs them (events=ALL)",
                                    ", ".join(missing)))
    amp = {}
    amportal = os.path.join(root, "etc", "amportal.conf")
    try:
        with open(amportal, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = re.match(r"^\s*([A-Z_]+)\s*=\s*(.*?)\s*$", line)
                if m:
                    amp[m.group(1)] = m.group(2).strip('"')
    except (IOError, OSError):
        pass
    freepbx = os.path.join(root, "etc", "freepbx.conf")
    try:
        with open(freepbx, encoding="utf-8", errors="replace") as f:
            for key, value in re.findall(r"\$amp_conf\[['\"](\w+)['\"]\]\s*=\s*['\"]([^'\"]*)['\"]", f.read()):
                amp.setdefault(key, value)
    except (IOError, OSError):
        pass
    odbc = _read_ini(os.path.join(etc, "cel_odbc.conf")) or {}
    res_odbc = _read_ini(os.path.join(etc, "res_odbc.conf")) or {}
    odbc_ini = _read_ini(os.path.join(root, "etc", "odbc.ini")) or {}
    for name, section in odbc.items():
        conn = res_odbc.get(section.get("connection", ""), {})
        dsn = odbc_ini.get(conn.get("dsn", ""), {})
        if not conn:
            continue
        lower = dict((k.lower(), v) for k, v in dsn.items())
        found.append({"backend": "mysql", "confidence": "high", "source": "cel_odbc.conf [%s]" % name,
                      "settings": {"mysql_host": lower.get("server", "localhost"),
                                   "mysql_port": lower.get("port", "3306"),
                                   "mysql_socket": lower.get("socket", ""),
                                   "mysql_user": conn.get("username", ""),
                                   "mysql_password": conn.get("password", ""),
                                   "mysql_database": lower.get("database", amp.get("CDRDBNAME", "asteriskcdrdb")),
                                   "table": section.get("table", "cel")}})
    if amp.get("AMPDBUSER"):
        found.append({"backend": "mysql", "confidence": "high" if not found else "medium",
                      "source": "FreePBX (%s)" % ("freepbx.conf" if os.path.exists(freepbx) else "amportal.conf"),
                      "settings": {"mysql_host": amp.get("CDRDBHOST") or amp.get("AMPDBHOST") or "localhost",
                                   "mysql_port": amp.get("CDRDBPORT") or "3306", "mysql_socket": "",
                                   "mysql_user": amp.get("CDRDBUSER") or amp["AMPDBUSER"],
                                   "mysql_password": amp.get("CDRDBPASS") or amp.get("AMPDBPASS", ""),
                                   "mysql_database": amp.get("CDRDBNAME") or "asteriskcdrdb",
                                   "table": amp.get("CELDBTABLENAME") or "cel"}})
    sqlite_conf = _read_ini(os.path.join(etc, "cel_sqlite3_custom.conf"))
    if sqlite_conf:
        master = sqlite_conf.get("master", {})
        ast = _read_ini(os.path.join(etc, "asterisk.conf")) or {}
        logdir = ast.get("directories", {}).get("astlogdir") or "/var/log/asterisk"
        path = os.path.join(root, logdir.lstrip("/")) if root != "/" else logdir
        path = os.path.join(path, "master.db")
        found.append({"backend": "sqlite", "confidence": "high" if os.path.exists(path) else "low",
                      "source": "cel_sqlite3_custom.conf",
                      "settings": {"sqlite_path": path, "table": master.get("table", "cel")}})
    return found, warnings


def describe_detection(found, warnings):
    lines = []
    if not found:
        lines.append("CEL store: none found (FreePBX, cel_odbc, cel_sqlite3_custom); set [cel] by hand")
    for i, cand in enumerate(found):
        shown = dict((k, ("***" if "password" in k and v else v)) for k, v in cand["settings"].items())
        lines.append("%s %s via %s, confidence %s: %s" % ("CEL store:" if i == 0 else "also:", cand["backend"],
                                                          cand["source"], cand["confidence"],
                                                          ", ".join("%s=%s" % kv for kv in sorted(shown.items()))))
    for w in warnings:
        lines.append("WARNING: %s" % w)
    return lines


def open_cel_source(config, root="/", section="cel"):
    """The CEL reader the configuration asks for ([cel], or [cel:NAME] of another PBX);
    None when CEL is off or not found."""
    cel = config.section(section)
    backend = cel["backend"]
    settings = dict(cel)
    if backend == "off":
        return None
    if backend == "auto":
        found, _warnings = detect_cel(root, cel["asterisk_etc"])
        usable = [c for c in found if c["confidence"] != "low"]
        if not usable:
            return None
        backend = usable[0]["backend"]
        settings.update(usable[0]["settings"])
    if backend == "sqlite":
        return SqliteCel(settings["sqlite_path"], settings["table"])
    return MysqlCel(settings["mysql_database"], settings["table"], settings["mysql_user"],
                    settings["mysql_password"], settings["mysql_host"], int(settings["mysql_port"]),
                    settings["mysql_socket"])


def cel_health(source, now=None, max_age=3600):
    """[(level, message)]: reachable, and a CEL event written within the last hour."""
    now = time.time() if now is None else now
    try:
        newest_id, newest_time = source.newest()
    except CelError as exc:
        return [("CRITICAL", say("CEL unreachable: %s", said_of(exc)))]
    if newest_id is None:
        return [("WARNING", say("CEL table is empty: is cel.conf enabled?"))]
    age = now - newest_time
    if age > max_age:
        return [("WARNING", say("no CEL event written in the last %s (the newest is %s old): "
                                "calls made now could not be recovered", Span(max_age), Span(age)))]
    return [("OK", say("CEL reachable (%s), the newest event %s old", source.describe(), Span(max(0, age))))]


class CelWatcher(Worker):
    """Runs CelRecovery at start-up and every few minutes, in its own thread; soon
    after a kick, and every few seconds while calls wait for their end from CEL."""

    thread_name = "cel"
    AWAITING_EVERY = 2.0

    def __init__(self, recovery, interval, hours_without_state=24.0):
        Worker.__init__(self)
        self.recovery = recovery
        self.interval = interval
        self.hours_without_state = hours_without_state

    def run(self):
        try:
            self.recovery.start_from_now(self.hours_without_state)
        except CelError as exc:
            log.warning("CEL: %s; calls missed while bx24ast is down cannot be recovered", exc)
        crm = self.recovery.crm
        while not self._stop.is_set():
            try:
                found = self.recovery.run_once()
                if found:
                    log.info("CEL: %d finished call(s) read", found)
            except CelError as exc:
                log.warning("CEL: %s", exc)
            except Exception:
                log.exception("CEL: recovery failed")
            if crm is not None:
                crm.settle_awaiting()
            waiting = crm is not None and crm.awaiting()
            if self._wake.wait(self.AWAITING_EVERY if waiting else self.interval) and not self._stop.is_set():
                # Asterisk writes the call's last CEL rows with its hang-up: give it a moment
                self._stop.wait(0.5)
            self._wake.clear()


###############################################################################
# Routing and click-to-call ###################################################
###############################################################################
# The two features that touch live calls. ResponsibleLookup answers "who owns
# this caller" within a budget (FastAgiServer for the dialplan, a local HTTP
# twin for CURL()); ClickToCall turns Bitrix24's OnExternalCallStart into one
# validated AMI Originate, whether the event is POSTed to EventListener (port
# mode) or fetched by OfflineEventPoller (no inbound port).

def php_form(text):
    """A form body with PHP-style keys (data[CALL_ID]=..&auth[application_token]=..)
    as nested dicts, the way Bitrix24 posts events."""
    out = {}
    for name, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
        m = re.match(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$", name)
        if not m:
            continue
        keys = [m.group(1)] + re.findall(r"\[([^\[\]]*)\]", m.group(2))
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[keys[-1]] = value
    return out


_CLICK_NUMBER_FORMATTING = LazyPattern(r"[ \t\-().]")
_CLICK_NUMBER = LazyPattern(r"^\+?[0-9]{3,20}\Z")


def clean_phone_number(text):
    """A number from Bitrix24 made safe for the dialplan: digits with an optional
    leading +, 3 to 20 digits, after dropping spaces, dashes, dots and brackets.
    None for anything else: nothing unvalidated ever reaches AMI."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    text = _CLICK_NUMBER_FORMATTING.sub("", text)
    return text if _CLICK_NUMBER.match(text) else None


class WorkingHours(object):
    """When a line is open: "mon-fri 09:00-18:00; sat 10:00-15:00" on the PBX's clock.
    A range past midnight (22:00-06:00) ends the next morning. Day names in English or
    Russian (пн-пт)."""

    DAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6,
            "пн": 0, "вт": 1, "ср": 2, "чт": 3, "пт": 4, "сб": 5, "вс": 6}
    WEEK = 7 * 1440
    _TIME = LazyPattern(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")

    def __init__(self, intervals, text=""):
        self.intervals = intervals   # (start, end) minutes from Monday 00:00; end may pass the week
        self.text = text

    @classmethod
    def parse(cls, text):
        intervals = []
        for group in [g.strip() for g in text.split(";") if g.strip()]:
            days_text, _, times_text = group.partition(" ")
            days = cls._days(days_text.strip().lower())
            times = [t.strip() for t in times_text.replace(" ", "").split(",") if t.strip()]
            if not times:
                raise ValueError("%r has no times (HH:MM-HH:MM)" % group)
            for t in times:
                m = cls._TIME.match(t)
                if not m:
                    raise ValueError("%r is not HH:MM-HH:MM" % t)
                h1, m1, h2, m2 = (int(x) for x in m.groups())
                if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2) or (h1, m1) == (h2, m2):
                    raise ValueError("%r is not a span of time in a day" % t)
                start, end = h1 * 60 + m1, h2 * 60 + m2
                if end < start:
                    end += 1440
                intervals.extend((d * 1440 + start, d * 1440 + end) for d in days)
        if not intervals:
            raise ValueError("no days and times")
        return cls(sorted(intervals), text)

    @classmethod
    def _days(cls, text):
        days = []
        for part in text.split(","):
            first, dash, last = part.partition("-")
            if first not in cls.DAYS or (dash and last not in cls.DAYS):
                raise ValueError("%r is not a day or days (mon, mon-fri, пн-пт)" % part)
            a, b = cls.DAYS[first], cls.DAYS[last] if dash else cls.DAYS[first]
            days.extend(range(a, b + 1) if a <= b else list(range(a, 7)) + list(range(0, b + 1)))
        return days

    @staticmethod
    def _minute_of_week(ts):
        t = time.localtime(ts)
        return t.tm_wday * 1440 + t.tm_hour * 60 + t.tm_min, t.tm_sec + (ts % 1)

    def is_open(self, ts):
        m, _ = self._minute_of_week(ts)
        return any(s <= m < e or s <= m + self.WEEK < e for s, e in self.intervals)

    def next_opening(self, ts):
        """ts itself when open, else when it opens next."""
        if self.is_open(ts):
            return ts
        m, seconds = self._minute_of_week(ts)
        ahead = min((s - m) % self.WEEK for s, _e in self.intervals)
        return ts - seconds + ahead * 60

    def __str__(self):
        return self.text


def _agi_text(value, limit=80):
    """A value for SET VARIABLE: no quotes, backslashes or control characters, so
    it cannot end the command or start another."""
    text = re.sub(r'[\x00-\x1f\x7f"\\]', "", str(value or ""))
    return text[:limit]


class Listener(object):
    """A server socket answered by threads of its own (FastAGI, HTTP lookup, events,
    wizard); subclasses set self.server and say what they serve in describe()."""

    thread_name = "listener"
    server = None

    def describe(self):
        return "%s on %s:%d" % (self.thread_name, self.address[0], self.address[1])

    @property
    def address(self):
        return self.server.server_address[:2]

    def start(self):
        threading.Thread(target=self.server.serve_forever, name=self.thread_name, daemon=True).start()
        log.info("%s", self.describe())

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class ResponsibleLookup(object):
    """Caller's number -> the employee who owns the client in the CRM, fast.

    One searchCrmEntities per number, remembered for cache_minutes; a lookup that
    takes longer than the budget answers empty and keeps running in the background,
    so that the next call from that number is answered from the cache."""

    MAX_IN_FLIGHT = 16
    MISS_SECONDS = 60.0

    def __init__(self, client, users, rules, ami=None, budget=0.5, cache_seconds=600.0,
                 check_state=True, hint_context="from-internal", clock=monotonic, hooks=None,
                 ami_for=None, records=None, sticky_days=0.0, lines=None, wall=time.time, pbx_lines=None):
        self.client = client
        self.hooks = hooks or Hooks()
        self.users = users
        self.rules = rules
        self.ami = ami
        self.ami_for = ami_for          # extension -> the AMI of its PBX, when there are several
        self.records = records          # who talked with a number lately (sticky routing)
        self.sticky_days = sticky_days
        self.lines = lines or Lines({}, rules.number_plan)
        self.pbx_lines = pbx_lines or {}    # [ami:NAME] -> its lines ([line:NAME:DID] over [line:DID])
        self.wall = wall
        self.budget = budget
        self.cache_seconds = cache_seconds
        self.check_state = check_state
        self.hint_context = hint_context
        self.clock = clock
        self._cache = {}
        self._in_flight = {}
        self._lock = threading.Lock()
        self.lookups = 0
        self.cache_hits = 0

    @classmethod
    def from_config(cls, config, client, users, rules, ami=None, hooks=None, ami_for=None, records=None):
        r = config.section("routing")
        return cls(client, users, rules, ami, r["budget_ms"] / 1000.0, r["cache_minutes"] * 60,
                   r["check_extension_state"], r["hint_context"], hooks=hooks, ami_for=ami_for,
                   records=records, sticky_days=r["sticky_days"], lines=Lines.from_config(config, rules),
                   pbx_lines=dict((name, Lines.from_config(config, rules, name)) for name in config.names("ami")))

    ANSWER_KEYS = ("status", "number", "extension", "user_id", "crm_entity", "name")
    # When the CRM gives no reachable owner, these may still route the caller.
    NO_OWNER = frozenset(("NOT_FOUND", "NO_EXTENSION", "UNAVAILABLE", "TIMEOUT", "LIMITED", "ERROR"))

    def knows_pbx(self, pbx):
        return not pbx or pbx in self.pbx_lines

    def lookup(self, number, line=None, pbx=""):
        """{"status", "number", "extension", "user_id", "crm_entity", "name"}; status is
        FOUND (the CRM's owner), STICKY (who talked with the caller last), LINE (the line's
        responsible), CLOSED (outside the line's working hours), NOT_FOUND, NO_EXTENSION,
        UNAVAILABLE, TIMEOUT, LIMITED, ERROR or INVALID. line is read in the lines of the
        PBX the call is on ("" is [ami])."""
        started = self.clock()
        lines = self.pbx_lines.get(pbx, self.lines)
        hours = lines.hours(line)
        if hours is not None and not hours.is_open(self.wall()):
            key = self.rules.number_plan.normalize(clean_phone_number(number or "") or "")
            return self.customized(self.answer("CLOSED", key or number), line)
        found = self._lookup(number)
        if found["status"] in self.NO_OWNER:
            found = self._no_owner(found, lines.responsible(line), started + self.budget) or found
        return self.customized(found, line)

    def _no_owner(self, found, user, deadline):
        """The employee who talked with the caller last (within sticky_days), else user
        (the line's responsible); each only while their phone is reachable."""
        candidates = []
        if self.sticky_days and self.records is not None and found["number"]:
            talker = self.records.last_talker(found["number"], self.wall() - self.sticky_days * 86400)
            if talker and self.rules.is_extension(talker):
                candidates.append(("STICKY", talker, self.users.user_for(talker)))
        if user:
            ext = self.users.extension_of(user)
            if ext and self.rules.is_extension(ext):
                candidates.append(("LINE", ext, user))
        for status, ext, user in candidates:
            if not self.check_state or self._reachable(ext, deadline):
                return dict(found, status=status, extension=ext, user_id=str(user or ""))
        return None

    def customized(self, found, line):
        """The answer as customize_autodistribution leaves it."""
        if self.hooks.has("customize_autodistribution"):
            caller = {"number": found["number"], "line": line}
            found = self.hooks.call("customize_autodistribution", found, (found, caller), self._an_answer, edits=True)
        return found

    def _an_answer(self, result):
        """What customize_autodistribution may answer: the same keys, an extension or none."""
        if not isinstance(result, dict) or set(result) != set(self.ANSWER_KEYS):
            raise ValueError("a dict of %s" % ", ".join(self.ANSWER_KEYS))
        if not all(isinstance(result[k], str) for k in self.ANSWER_KEYS):
            raise ValueError("text values")
        if result["extension"] and not self.rules.is_extension(result["extension"]):
            raise ValueError("extension %r is not an extension ([pbx] extension_pattern)" % result["extension"])
        if not re.match(r"^[A-Z_]{2,20}$", result["status"]):
            raise ValueError("status in capitals, like FOUND")
        return dict((k, _agi_text(v)) for k, v in result.items())

    def _lookup(self, number):
        started = self.clock()
        deadline = started + self.budget
        self.lookups += 1
        key = self.rules.number_plan.normalize(clean_phone_number(number or "") or "")
        if not key:
            return self.answer("INVALID", number)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > started:
                self.cache_hits += 1
                found = dict(hit[1])
            else:
                found = None
                pending = self._in_flight.get(key)
                if pending is None:
                    if len(self._in_flight) >= self.MAX_IN_FLIGHT:
                        return self.answer("LIMITED", key)
                    pending = self._in_flight[key] = [threading.Event(), None]
                    threading.Thread(target=self._fetch, args=(key, pending), name="lookup",
                                     daemon=True).start()
        if found is None:
            if not pending[0].wait(max(0.0, deadline - self.clock())):
                return self.answer("TIMEOUT", key)
            found = dict(pending[1])
        if found["status"] == "FOUND" and self.check_state:
            if not self._reachable(found["extension"], deadline):
                found["status"], found["extension"] = "UNAVAILABLE", ""
        return found

    def answer(self, status, number, **fields):
        out = {"status": status, "number": number or "", "extension": "", "user_id": "",
               "crm_entity": "", "name": ""}
        out.update(fields)
        return out

    def _fetch(self, key, pending):
        try:
            result, keep = self._search(key)
            if keep:
                ttl = self.cache_seconds if result["status"] != "NOT_FOUND" else \
                    min(self.cache_seconds, self.MISS_SECONDS)
                with self._lock:
                    if len(self._cache) > 20000:
                        now = self.clock()
                        self._cache = dict((k, v) for k, v in self._cache.items() if v[0] > now)
                    self._cache[key] = (self.clock() + ttl, result)
            pending[1] = result
        except Exception:
            log.exception("routing: lookup of %s failed", key)
            pending[1] = self.answer("ERROR", key)
        finally:
            with self._lock:
                self._in_flight.pop(key, None)
            pending[0].set()

    def _search(self, key):
        """(result, cacheable) from Bitrix24."""
        try:
            # wait=False: when the rate budget is spent the caller must not wait for it.
            found = self.client.call("telephony.externalCall.searchCrmEntities", {"PHONE_NUMBER": key},
                                     wait=False)
        except BitrixRateLimited as exc:
            log.info("routing: %s not looked up: %s", key, exc)
            return self.answer("LIMITED", key), False
        except BitrixError as exc:
            log.warning("routing: searchCrmEntities for %s failed: %s", key, exc)
            return self.answer("ERROR", key), False
        best = None
        for entity in found if isinstance(found, list) else []:
            if not isinstance(entity, dict):
                continue
            try:
                user = int(entity.get("ASSIGNED_BY_ID") or (entity.get("ASSIGNED_BY") or {}).get("ID") or 0)
            except (TypeError, ValueError):
                user = 0
            ext = self.users.extension_of(user) if user else None
            if ext is None:
                inner = (entity.get("ASSIGNED_BY") or {}).get("USER_PHONE_INNER")
                ext = inner.strip() if isinstance(inner, str) else None
            fields = {"user_id": str(user) if user else "", "name": _agi_text(entity.get("NAME")),
                      "crm_entity": "%s_%s" % (_agi_text(entity.get("CRM_ENTITY_TYPE"), 20),
                                               _agi_text(entity.get("CRM_ENTITY_ID"), 20))}
            if ext and self.rules.is_extension(ext):
                return self.answer("FOUND", key, extension=ext, **fields), True
            if best is None:
                best = self.answer("NO_EXTENSION", key, **fields)
        return (best or self.answer("NOT_FOUND", key)), True

    def _reachable(self, ext, deadline):
        """False only when Asterisk says the phone is unavailable (ExtensionState 4)."""
        remaining = deadline - self.clock()
        if remaining <= 0.005:
            return True
        ami = self.ami_for(ext) if self.ami_for is not None else self.ami
        if ami is None:
            return True
        try:
            pending = ami.action("ExtensionState", [("Exten", ext), ("Context", self.hint_context)],
                                 timeout=remaining)
        except AmiError as exc:
            log.debug("routing: ExtensionState %s@%s: %s", ext, self.hint_context, exc)
            return True
        return pending.response.get("Status") != "4"


class FastAgiServer(Listener):
    """AGI(agi://127.0.0.1:4573/responsible[,number]): sets BX24_RESPONSIBLE_EXT,
    BX24_RESPONSIBLE_USER, BX24_CRM_ENTITY and BX24_RESPONSIBLE_STATUS."""

    thread_name = "fastagi"
    MAX_LINE = 4096
    MAX_ENV_LINES = 200

    def __init__(self, lookup, host="127.0.0.1", port=4573, set_callerid_name=False, pbx_by_address=None):
        self.lookup = lookup
        self.set_callerid_name = set_callerid_name
        # several PBXs: which one a session comes from, when its script does not say
        # (agi://.../responsible?pbx=NAME): the address of an [ami:NAME] host
        self.pbx_by_address = pbx_by_address or {}
        server = self
        import socketserver

        class Handler(socketserver.StreamRequestHandler):
            timeout = 10

            def setup(self):
                # Small writes answered by small reads: Nagle would add round trips.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socketserver.StreamRequestHandler.setup(self)

            def handle(self):
                server.session(self.rfile, self.wfile, self.client_address)

        # every call of the PBX may run the AGI at once, all from the PBX's address
        self.server = bounded(listener_classes().ThreadingTCPServer((host, port), Handler), "FastAGI", 256, 256, 60.0)

    def describe(self):
        return "routing: FastAGI on %s:%d (AGI(agi://%s:%d/responsible))" % (self.address * 2)

    def _read_env(self, rfile, peer):
        env = {}
        for _ in range(self.MAX_ENV_LINES):
            line = rfile.readline(self.MAX_LINE + 1)
            if not line:
                return None
            if len(line) > self.MAX_LINE:
                log.warning("AGI from %s: a line over %d bytes; session dropped", peer[0], self.MAX_LINE)
                return None
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if not text:
                return env
            name, sep, value = text.partition(":")
            if not sep or not name.startswith("agi_"):
                log.warning("AGI from %s: %r is not an agi_* variable line; session dropped", peer[0], text[:80])
                return None
            env[name] = value.strip()
        log.warning("AGI from %s: more than %d environment lines; session dropped", peer[0], self.MAX_ENV_LINES)
        return None

    def session(self, rfile, wfile, peer):
        try:
            env = self._read_env(rfile, peer)
            if env is None:
                return
            script, _q, query = env.get("agi_network_script", "").partition("?")
            script = script.strip("/")
            if script != "responsible":
                log.warning("AGI from %s: unknown script %r (only agi://.../responsible)", peer[0], script)
                self._command(rfile, wfile, 'VERBOSE "bx24ast: unknown AGI script" 1')
                return
            number = env.get("agi_arg_1") or env.get("agi_callerid") or ""
            started = monotonic()
            found = self.lookup.lookup(number, self._line(env), self._pbx(query, peer))
            log.info("routing: AGI %s -> %s %s (%.0f ms)", _agi_text(number, 30), found["status"],
                     found["extension"] or "-", (monotonic() - started) * 1000)
            commands = [("BX24_RESPONSIBLE_EXT", found["extension"]), ("BX24_RESPONSIBLE_USER", found["user_id"]),
                        ("BX24_CRM_ENTITY", found["crm_entity"] if found["user_id"] else ""),
                        ("BX24_RESPONSIBLE_STATUS", found["status"])]
            if self.set_callerid_name and found["name"]:
                commands.append(("CALLERID(name)", found["name"]))
            for variable, value in commands:
                if not self._command(rfile, wfile, 'SET VARIABLE %s "%s"' % (variable, _agi_text(value))):
                    return
        except (OSError, socket.timeout) as exc:
            log.info("AGI from %s: connection lost: %s", peer[0], exc)

    def _pbx(self, query, peer):
        """The PBX whose lines the call is on: ?pbx=NAME in the AGI's URL, else the one
        whose [ami:NAME] host the session comes from, else [ami]'s ("")."""
        named = dict(urllib.parse.parse_qsl(query)).get("pbx") if query else None
        if not named:
            return self.pbx_by_address.get(peer[0], "")
        if self.lookup.knows_pbx(named):
            return named
        # a dialplan's mistake repeats on every call: said a few times a minute
        REFUSALS.log(logging.WARNING, "routing: unknown pbx=", "AGI from %s: pbx=%s in the AGI's URL is no "
                     "[ami:NAME] of the configuration; the lines of [ami] are used", peer[0], _agi_text(named, 32))
        return ""

    @staticmethod
    def _line(env):
        """The line the caller dialled: the AGI's second argument (${FROM_DID} in the
        wizard's dialplan), else the extension a _X. pattern matched, else the DNID."""
        for value in (env.get("agi_arg_2"), env.get("agi_extension"), env.get("agi_dnid")):
            if value and clean_phone_number(value) and len(value.lstrip("+")) >= 4:
                return value
        return None

    def _command(self, rfile, wfile, command):
        """Send one command; False when the channel hung up or the session is over."""
        wfile.write(command.encode("utf-8") + b"\n")
        wfile.flush()
        while True:
            line = rfile.readline(self.MAX_LINE + 1)
            if not line:
                return False
            text = line.decode("utf-8", "replace").strip()
            if text == "HANGUP":
                return False  # the caller hung up: Asterisk answers 511 to anything more
            if text.startswith("200 "):
                return True
            if text.startswith("520-"):
                continue  # usage text follows until "520 End of proper usage."
            log.warning("AGI: %r answered %r", command.split(" ")[0], text[:80])
            return not text.startswith(("511", "520"))


class LogLimiter(object):
    """At most `burst` lines a minute per kind of event; the rest are counted and told
    in one line when the minute is over. Refused connections and forms come from
    outside: a flood of them must not become a flood of log."""

    def __init__(self, burst=5, every=60.0, clock=monotonic):
        self.burst, self.every, self.clock = burst, every, clock
        self._windows = {}     # kind -> [window start, lines logged, lines held back]
        self._lock = None      # made at the first line: REFUSALS exists in every command

    def log(self, level, kind, fmt, *args):
        now = self.clock()
        if self._lock is None:
            self._lock = threading.Lock()
        with self._lock:
            window = self._windows.get(kind)
            held = 0
            if window is None or now - window[0] >= self.every:
                held = window[2] if window else 0
                window = self._windows[kind] = [now, 0, 0]
                if len(self._windows) > 256:
                    for old in [k for k, w in self._windows.items() if now - w[0] >= self.every]:
                        del self._windows[old]
            if window[1] >= self.burst:
                window[2] += 1
                return
            window[1] += 1
        if held:
            log.log(level, "%s: %d more like it in the last minute, not logged one by one", kind, held)
        log.log(level, fmt, *args)


REFUSALS = LogLimiter()


class _Namespace(object):
    def __init__(self, **items):
        self.__dict__.update(items)


_LISTENER_CLASSES = []


def listener_classes():
    """The base classes of every listener, built at the first one: socketserver,
    http.server and ssl cost `check`, the cron job and the other short commands time
    and memory they never use. Its fields: BoundedServer, ThreadingTCPServer,
    ThreadingHTTPServer, QuietRequestHandler, TlsRequestHandler and CLIENT_GONE, the
    errors of a client that hung up mid-request or mid-reply (one line in the log)."""
    if _LISTENER_CLASSES:
        return _LISTENER_CLASSES[0]
    import http.server
    import socketserver
    import ssl
    client_gone = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout, ssl.SSLError)

    class BoundedServer(socketserver.ThreadingMixIn):
        """A thread per connection, but a bounded number of them: at most max_connections
        at once, max_per_address from one address, and each done within request_deadline
        (an idle or trickling client is cut off). Beyond that a connection is closed at
        once, so a public port cannot use up the daemon's threads or file descriptors."""

        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 64
        max_connections = 64
        max_per_address = 16
        request_deadline = 30.0
        label = "listener"

        def __init__(self, *args, **kwargs):
            self._open = {}     # socket -> (address, deadline)
            self._open_lock = threading.Lock()
            super(BoundedServer, self).__init__(*args, **kwargs)

        def verify_request(self, request, client_address):
            conns = self._open
            peer = client_address[0] if client_address else "?"
            with self._open_lock:
                if len(conns) >= self.max_connections:
                    why = "%d connections open, the most it takes" % len(conns)
                elif sum(1 for addr, _ in conns.values() if addr == peer) >= self.max_per_address:
                    why = "%d connections open from that address, the most it takes" % self.max_per_address
                else:
                    conns[request] = (peer, monotonic() + self.request_deadline)
                    return True
            REFUSALS.log(logging.WARNING, "%s: refused connections" % self.label,
                         "%s: refused a connection from %s: %s", self.label, peer, why)
            return False

        def shutdown_request(self, request):
            with self._open_lock:
                self._open.pop(request, None)
            socketserver.TCPServer.shutdown_request(self, request)

        def service_actions(self):
            """Called by serve_forever every half second: cut off connections past their deadline."""
            now = monotonic()
            with self._open_lock:
                late = [sock for sock, (_addr, deadline) in self._open.items() if deadline < now]
            for sock in late:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def open_count(self):
            with self._open_lock:
                return len(self._open)

        def handle_error(self, request, client_address):
            # socketserver would print a traceback to stderr for a client that vanished
            # or spoke plain HTTP to the TLS port: a (limited) log line is enough.
            REFUSALS.log(logging.INFO, "%s: failed connections" % self.label, "%s: connection from %s failed: %s",
                         self.label, client_address[0] if client_address else "?", sys.exc_info()[1])

    class ThreadingTCPServer(BoundedServer, socketserver.TCPServer):
        pass

    class ThreadingHTTPServer(BoundedServer, http.server.HTTPServer):
        # http.server.ThreadingHTTPServer is 3.7+.
        pass

    class QuietRequestHandler(http.server.BaseHTTPRequestHandler):
        """What every HTTP listener of bx24ast answers with: no Python version in the
        Server header, the headers that keep browsers from guessing, and no traceback
        for a client that went away."""

        server_version = "bx24ast"
        timeout = 10

        def version_string(self):
            return self.server_version

        def end_headers(self):
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            if getattr(self, "tls", None) is not None:
                self.send_header("Strict-Transport-Security", "max-age=31536000")
            http.server.BaseHTTPRequestHandler.end_headers(self)

        def handle_one_request(self):
            try:
                http.server.BaseHTTPRequestHandler.handle_one_request(self)
            except client_gone as exc:
                self.close_connection = True
                log.debug("http: client %s went away: %s", self.client_address[0], exc)

        def log_message(self, fmt, *args):
            log.debug("http: " + fmt, *args)

    class TlsRequestHandler(QuietRequestHandler):
        """A request handler whose TLS handshake happens in the connection's own thread:
        a slow or plain-HTTP client cannot hold up the accept loop."""

        tls = None

        def setup(self):
            if self.tls is not None:
                self.request.settimeout(self.timeout)
                self.request = self.tls.wrap_socket(self.request, server_side=True)
            http.server.BaseHTTPRequestHandler.setup(self)

    _LISTENER_CLASSES.append(_Namespace(
        BoundedServer=BoundedServer, ThreadingTCPServer=ThreadingTCPServer, ThreadingHTTPServer=ThreadingHTTPServer,
        QuietRequestHandler=QuietRequestHandler, TlsRequestHandler=TlsRequestHandler, CLIENT_GONE=client_gone))
    return _LISTENER_CLASSES[0]


def bounded(server, label, max_connections=None, max_per_address=None, deadline=None):
    """Set a listener's limits (per instance: FastAGI from the PBX itself takes more
    from one address than a public port)."""
    server.label = label
    if max_connections is not None:
        server.max_connections = max_connections
    if max_per_address is not None:
        server.max_per_address = max_per_address
    if deadline is not None:
        server.request_deadline = deadline
    return server


def tls_context(cert, key, section):
    """A server TLS context, or ConfigError naming [section] tls_cert."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) if hasattr(ssl, "PROTOCOL_TLS_SERVER") else \
        ssl.SSLContext(ssl.PROTOCOL_SSLv23)
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        if path and not is_regular_file(path):
            raise ConfigError("[%s] %s %s is not a readable regular file" % (section, name, path),
                              section=section, key=name, value=path)
    try:
        context.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("[%s] tls_cert/tls_key cannot be loaded: %s" % (section, exc),
                          section=section, key="tls_cert", value=cert)
    return context


def _json_reply(handler, status, payload):
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json; charset=utf-8")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _is_loopback(address):
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1")


class LookupHttpServer(Listener):
    """GET /responsible?number=...[&line=DID][&pbx=NAME] on a local address, for dialplans
    using CURL()."""

    thread_name = "lookup-http"
    def __init__(self, lookup, host="127.0.0.1", port=4574):
        self.lookup = lookup
        owner = self

        class Handler(listener_classes().QuietRequestHandler):
            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                if not _is_loopback(self.client_address[0]):
                    return _json_reply(self, 403, {"error": "the lookup answers only local clients"})
                if url.path.rstrip("/") != "/responsible":
                    return _json_reply(self, 404, {"error": "unknown path %s; use /responsible?number=..."
                                                            % url.path[:80]})
                query = dict(urllib.parse.parse_qsl(url.query))
                if not query.get("number"):
                    return _json_reply(self, 400, {"error": "the number parameter is missing"})
                pbx = query.get("pbx") or ""
                if not owner.lookup.knows_pbx(pbx):
                    return _json_reply(self, 400, {"error": "the pbx parameter %r is no [ami:NAME] of the configuration"
                                                            % pbx[:40]})
                return _json_reply(self, 200, owner.lookup.lookup(query["number"], query.get("line"), pbx))

        # the dialplan's CURL() of every call, all from the PBX itself
        self.server = bounded(listener_classes().ThreadingHTTPServer((host, port), Handler), "routing http", 256, 256, 10.0)

    def describe(self):
        return "routing: HTTP lookup on http://%s:%d/responsible?number=..." % self.address


CLICK_EVENTS = ("ONEXTERNALCALLSTART", "ONEXTERNALCALLBACKSTART")

# OriginateResponse Reason -> how the Bitrix24 card is closed when the phone never answered.
_ORIGINATE_FAILURE_STATUS = {"3": "304", "5": "486"}


class ClickToCall(object):
    """OnExternalCallStart -> one AMI Originate: the employee's phone first, then the
    client through the outbound routes, under Bitrix24's own CALL_ID."""

    def __init__(self, ami, users, store, outbox, rules, settings, clock=time.time, hooks=None, ami_for=None):
        self.ami = ami
        self.ami_for = ami_for   # extension -> the AMI of its PBX (several PBXs)
        self.hooks = hooks or Hooks()
        self.users = users
        self.store = store
        self.outbox = outbox
        self.rules = rules
        self.settings = settings
        self.clock = clock
        self._last_by_user = {}
        self._originating = {}   # ActionID -> (CALL_ID, user)
        self._lock = threading.Lock()

    def dial_string(self, number):
        """The validated number in the form the outbound routes expect."""
        fmt = self.settings["number_format"]
        plan = self.rules.number_plan
        e164 = plan.normalize(number)
        if not e164 or not e164.startswith("+"):
            return number.lstrip("+") if fmt != "e164" else number
        if fmt == "e164":
            return e164
        if fmt == "digits":
            return e164[1:]
        if plan.country_code and e164.startswith("+" + plan.country_code) and \
                len(e164) == 1 + len(plan.country_code) + plan.national_number_length:
            return plan.national_prefix + e164[1 + len(plan.country_code):]
        return self.settings["international_dial_prefix"] + e164[1:]

    def _claim(self, key, user, number):
        """True the first time a click is seen (kept in the state store, so that a
        restart or a redelivered event never dials twice)."""
        try:
            with self.store.transaction() as db:
                db.execute("INSERT INTO clicks (key, user_id, number, at) VALUES (?, ?, ?, ?)",
                           (key, user, number, self.clock()))
            return True
        except sqlite3.IntegrityError:
            return False

    def _outcome(self, key, outcome):
        self.store.execute("UPDATE clicks SET outcome = ? WHERE key = ?", (outcome, key))

    def start(self, data, source):
        """Handle one OnExternalCallStart's data; returns (originated, reason)."""
        if not isinstance(data, dict):
            return self._refuse(None, None, None, "%s: the event has no data[...] fields" % source)
        call_id = data.get("CALL_ID")
        if not isinstance(call_id, str) or not re.match(r"^[A-Za-z0-9._\-]{1,100}$", call_id):
            return self._refuse(None, None, None, "%s: data[CALL_ID] %r is not a Bitrix24 call id"
                                % (source, str(call_id)[:60]))
        user = data.get("USER_ID")
        user = int(user) if is_digits(user) and len(user) < 10 else None
        if user is None:
            return self._refuse(call_id, None, None, "%s: data[USER_ID] %r is not a user id"
                                % (source, str(data.get("USER_ID"))[:30]))
        number = clean_phone_number(data.get("PHONE_NUMBER_INTERNATIONAL")) or \
            clean_phone_number(data.get("PHONE_NUMBER"))
        if number is None:
            return self._refuse(call_id, user, None, "%s: data[PHONE_NUMBER] %r is not a phone number "
                                "(digits, optional +, 3-20 long)" % (source, str(data.get("PHONE_NUMBER"))[:40]))
        if not self._claim(call_id, user, number):
            log.info("click-to-call %s: already handled; not dialled again", call_id)
            return False, "already handled"
        ext = self.users.extension_of(user)
        if ext is None:
            return self._refuse(call_id, user, number, "%s: user %d has no extension (UF_PHONE_INNER or [users])"
                                % (source, user), close=True)
        now = self.clock()
        with self._lock:
            last = self._last_by_user.get(user)
            if last is not None and now - last < self.settings["user_interval_seconds"]:
                return self._refuse(call_id, user, number, "user %d clicked again within %g s"
                                    % (user, self.settings["user_interval_seconds"]), close=True)
            self._last_by_user[user] = now
        params = self.originate_params(call_id, user, ext, number, source)
        channel, dial = params["Channel"], params["Exten"]
        ami = self.ami_for(ext) if self.ami_for is not None else self.ami
        # filed before it is sent: a phone Asterisk cannot reach at all fails at once, and
        # its OriginateResponse may be read before this thread runs again
        action_id = ami.next_action_id()
        with self._lock:
            self._originating[action_id] = (call_id, user)
        try:
            ami.originate(channel, params["Context"], dial, caller_id=params["CallerID"],
                          variables={"__" + self.rules.call_id_variable: call_id},
                          timeout_ms=params["Timeout"], callback=self._queued, action_id=action_id)
        except AmiError as exc:
            with self._lock:
                self._originating.pop(action_id, None)
            return self._refuse(call_id, user, number, "AMI: %s" % exc, close=True)
        self._outcome(call_id, "originated")
        log.info("click-to-call %s: user %d (extension %s) -> %s via %s (%s)", call_id, user, ext, dial,
                 channel, source)
        return True, "originated"

    def originate_params(self, call_id, user, ext, number, source):
        """The Originate of a click, as process_originate_params leaves it."""
        params = {"Channel": self.settings["phone_channel"].format(extension=ext),
                  "Context": self.settings["outbound_context"], "Exten": self.dial_string(number),
                  "CallerID": '"%s" <%s>' % (number, ext), "Timeout": self.settings["ring_timeout"] * 1000}
        if self.hooks.has("process_originate_params"):
            click = {"call_id": call_id, "user_id": user, "extension": ext, "number": number, "source": source}
            params = self.hooks.call("process_originate_params", params, (params, click), self.an_originate, edits=True)
        return params

    @staticmethod
    def an_originate(result):
        """What process_originate_params may answer: the same keys, each safe for AMI."""
        if not isinstance(result, dict) or set(result) != {"Channel", "Context", "Exten", "CallerID", "Timeout"}:
            raise ValueError("a dict of Channel, Context, Exten, CallerID and Timeout")
        checks = (("Channel", r"^[A-Za-z0-9/@_.\-+#*:]{3,120}$"), ("Context", r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,79}$"),
                  ("Exten", r"^[0-9+*#]{1,40}$"), ("CallerID", r"^[^\x00-\x1f\x7f]{0,120}$"))
        for key, pattern in checks:
            if not isinstance(result[key], str) or not re.match(pattern, result[key]):
                raise ValueError("%s %r is not allowed" % (key, result[key]))
        if isinstance(result["Timeout"], bool) or not isinstance(result["Timeout"], int) \
                or not 1000 <= result["Timeout"] <= 600000:
            raise ValueError("Timeout in milliseconds, 1000 to 600000")
        return result

    def _queued(self, pending):
        if pending.error is not None or pending.response is None or not pending.response.success:
            reason = pending.error or (pending.response.get("Message") if pending.response else "no answer")
            with self._lock:
                call_id, user = self._originating.pop(pending.action_id, (None, None))
            if call_id:
                log.warning("click-to-call %s: Originate refused: %s", call_id, reason)
                self._close_card(call_id, user, "603")

    def on_originate_response(self, msg):
        """OriginateResponse: a phone that never answered leaves no call to report,
        so the card Bitrix24 opened is closed here."""
        with self._lock:
            known = self._originating.pop(msg.get("ActionID"), None)
        if known is None or msg.get("Response") == "Success":
            return
        call_id, user = known
        status = _ORIGINATE_FAILURE_STATUS.get(msg.get("Reason"), "603")
        log.info("click-to-call %s: the employee's phone did not answer (reason %s)", call_id, msg.get("Reason"))
        self._outcome(call_id, "not answered (reason %s)" % msg.get("Reason"))
        self._close_card(call_id, user, status)

    def _close_card(self, call_id, user, status):
        if self.outbox is None or user is None:
            return
        self.outbox.add("click:" + call_id, "close", "telephony.externalcall.finish", collections.OrderedDict([
            ("CALL_ID", call_id), ("USER_ID", user), ("DURATION", 0), ("STATUS_CODE", status)]), PRIORITY_FINISH)

    def _refuse(self, call_id, user, number, reason, close=False):
        log.warning("click-to-call refused: %s", reason)
        if call_id is not None:
            if number is not None:
                self._outcome(call_id, "refused: " + reason)
            if close:
                self._close_card(call_id, user, "603")
        return False, reason

    def callback(self, data, source, key):
        """OnExternalCallBackStart (CRM callback form): ring callback_extension, then the
        client; no CALL_ID comes with it, the call is registered like any other."""
        group = self.settings["callback_extension"]
        if not isinstance(data, dict):
            return self._refuse(None, None, None, "%s: the callback event has no data[...]" % source)
        number = clean_phone_number(data.get("PHONE_NUMBER"))
        if number is None:
            return self._refuse(None, None, None, "%s: callback data[PHONE_NUMBER] %r is not a phone number"
                                % (source, str(data.get("PHONE_NUMBER"))[:40]))
        if not group:
            return self._refuse(None, None, None, "%s: callback for %s ignored: [click_to_call] "
                                "callback_extension is empty" % (source, number))
        if not self._claim("callback:" + key, None, number):
            return False, "already handled"
        dial = self.dial_string(number)
        channel = self.settings["phone_channel"].format(extension=group)
        try:
            ami = self.ami_for(group) if self.ami_for is not None else self.ami
            ami.originate(channel, self.settings["outbound_context"], dial,
                               caller_id='"Callback %s" <%s>' % (number, dial),
                               variables={"__" + CALLBACK_VARIABLE: "1"},
                               timeout_ms=self.settings["ring_timeout"] * 1000)
        except AmiError as exc:
            self._outcome("callback:" + key, "refused: AMI: %s" % exc)
            return False, str(exc)
        self._outcome("callback:" + key, "originated")
        log.info("callback form: %s rings first, then %s (%s)", group, dial, source)
        return True, "originated"

    def handle_event(self, event, data, source, key=""):
        event = (event or "").upper()
        if event == "ONEXTERNALCALLSTART":
            return self.start(data, source)
        if event == "ONEXTERNALCALLBACKSTART":
            return self.callback(data, source, key or hashlib.sha1(
                json.dumps(data, sort_keys=True).encode()).hexdigest())
        log.warning("click-to-call: event %r from %s is not one bx24ast handles", event[:40], source)
        return False, "unexpected event"


class EventListener(Listener):
    """Port mode: Bitrix24 POSTs events here (form-encoded, PHP-style keys); only those
    carrying our application_token are taken."""

    thread_name = "events"
    MAX_BODY = 64 * 1024

    def __init__(self, click, token, host="0.0.0.0", port=8077, cert="", key="", client=None):
        """client: the local application's BitrixClient, when there is one: it takes
        ONAPPINSTALL, and the application_token that came with it is accepted too."""
        if not token and client is None:
            raise ConfigError("[click_to_call] application_token is empty: port mode refuses every event "
                              "without it (copy it from the outbound webhook or the application)",
                              section="click_to_call", key="application_token", value="")
        self.click = click
        self.token = token
        self.client = client
        owner = self

        class Handler(listener_classes().TlsRequestHandler):
            tls = tls_context(cert, key, "click_to_call") if cert else None

            def do_GET(self):
                _json_reply(self, 405, {"error": "Bitrix24 events are POSTed here"})

            def do_POST(self):
                owner.handle_post(self)

        self.server = bounded(listener_classes().ThreadingHTTPServer((host, port), Handler), "click-to-call", 64, 16, 15.0)
        self.scheme = "https" if cert else "http"

    def handle_post(self, req):
        peer = req.client_address[0]
        try:
            length = int(req.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > self.MAX_BODY:
            REFUSALS.log(logging.WARNING, "click-to-call: refused POSTs",
                         "click-to-call: refused a POST from %s: body of %s bytes", peer, length)
            return _json_reply(req, 413, {"error": "body too large"})
        body = req.rfile.read(length).decode("utf-8", "replace")
        form = php_form(body)
        auth = form.get("auth") if isinstance(form.get("auth"), dict) else {}
        for name, value in (("event", form.get("event", "")), ("auth[application_token]",
                                                                auth.get("application_token", ""))):
            if not isinstance(value, str):
                REFUSALS.log(logging.WARNING, "click-to-call: refused POSTs",
                             "click-to-call: refused a POST from %s: %s is not a single value", peer, name)
                return _json_reply(req, 400, {"error": "%s must be a single value" % name})
        event = form.get("event", "").upper()
        if event == "ONAPPINSTALL" and self.client is not None:
            try:
                self.client.install(auth)
            except BitrixError as exc:
                log.warning("Bitrix24: ONAPPINSTALL from %s refused: %s", peer, exc)
                return _json_reply(req, 403, {"error": "install refused"})
            return _json_reply(req, 200, {"result": "installed"})
        given = auth.get("application_token") or ""
        if not any(hmac.compare_digest(given.encode("utf-8"), t.encode("utf-8")) for t in self.tokens() if t):
            REFUSALS.log(logging.WARNING, "click-to-call: refused POSTs", "click-to-call: refused an event from %s: %s",
                         peer, "wrong auth[application_token]" if given else "no auth[application_token]")
            return _json_reply(req, 403, {"error": "wrong application_token"})
        if event not in CLICK_EVENTS:
            REFUSALS.log(logging.WARNING, "click-to-call: refused POSTs",
                         "click-to-call: event %r from %s is not one bx24ast handles", event[:40], peer)
            return _json_reply(req, 400, {"error": "unexpected event"})
        # Answer at once (Bitrix24 does not retry, and slow handlers lose priority);
        # the Originate is asynchronous anyway.
        ok, reason = self.click.handle_event(event, form.get("data"), "event from %s" % peer,
                                             str(form.get("ts", "")) + str(form.get("event_handler_id", "")))
        return _json_reply(req, 200, {"result": "originated" if ok else "refused", "reason": reason})

    def tokens(self):
        """The application_tokens events may carry: the configured one, and the one
        ONAPPINSTALL brought."""
        stored = (self.client.tokens() or {}).get("application_token") if self.client is not None else None
        return [self.token, stored]

    def describe(self):
        return "click-to-call: listening for Bitrix24 events on %s://%s:%d/" % ((self.scheme,) + self.address)


class OfflineEventPoller(Worker):
    """No-port mode: fetch OnExternalCallStart from the portal's offline queue.

    event.offline.get with clear=0 reserves the records; they are cleared only
    after they were handled, so a crash in between re-reads them, and the
    clicks table stops a re-read click from dialling twice."""

    MAX_INTERVAL = 30.0
    RESERVED = "click_to_call.process_id"

    thread_name = "offline-events"

    def __init__(self, client, click, store, sender=None, interval=2.0, clock=monotonic):
        Worker.__init__(self)
        self.client = client
        self.click = click
        self.store = store
        self.sender = sender
        self.interval = interval
        self.clock = clock
        self.clear_mode = 0
        self.bound = None
        self.polls = 0

    def bind(self):
        """Make sure the offline bindings exist; logs clearly whether the portal took them."""
        for event in CLICK_EVENTS:
            try:
                fresh = bind_event(self.client, {"event": event, "event_type": "offline"})
                log.info("click-to-call: offline binding of %s %s", event,
                         "accepted by the portal" if fresh else "already in place")
                self.bound = True
            except BitrixError as exc:
                log.error("click-to-call: the portal refused the offline binding of %s: %s (offline mode "
                          "needs a local application authorised by an administrator)", event, exc)
                self.bound = self.bound or False
        return self.bound

    def run(self):
        try:
            self.bind()
        except Exception:
            log.exception("click-to-call: binding failed")
        wait = self.interval
        while not self._stop.wait(wait):
            try:
                wait = self.poll_once()
            except Exception:
                log.exception("click-to-call: offline poll failed")
                wait = self.MAX_INTERVAL

    def _get(self, params):
        """One event.offline.get, riding in the outbox's next batch when it has a
        backlog: a poll then costs no request of its own."""
        if self.sender is not None and self.sender.backlog():
            ride = self.sender.ride("event.offline.get", params)
            if ride.done.wait(10):
                if ride.error is not None:
                    raise ride.error
                return ride.result
            self.sender.unride(ride)
        return self.client.call("event.offline.get", params, wait=False)

    def poll_once(self):
        """Poll and handle; returns seconds until the next poll."""
        # The same budget pays for call cards: when it is tight, poll less often.
        fill = self.client.bucket.fill()
        if fill > 0.5:
            return min(self.MAX_INTERVAL, self.interval * (1 + 10 * (fill - 0.5)))
        params = {"limit": 50, "clear": self.clear_mode}
        # A batch reserved before a crash is only given again under its process_id.
        reserved = self.store.get_setting(self.RESERVED)
        if reserved:
            params["process_id"] = reserved
        self.polls += 1
        try:
            answer = self._get(params)
        except BitrixRateLimited:
            return self.interval * 2
        except BitrixRejected as exc:
            if reserved:
                log.warning("click-to-call: the reserved batch %s is gone (%s); reading new events", reserved, exc)
                self.store.set_setting(self.RESERVED, None)
                return 0.1
            if self.clear_mode == 0 and ("WRONG_LICENSE" in (exc.code or "") or exc.status == 403):
                log.warning("click-to-call: the portal cannot reserve offline events (%s); reading them with "
                            "clear=1, so a crash at the wrong moment can lose one click", exc)
                self.clear_mode = 1
                return 0.1
            log.warning("click-to-call: event.offline.get refused: %s", exc)
            return self.MAX_INTERVAL
        except BitrixError as exc:
            log.warning("click-to-call: event.offline.get failed: %s", exc)
            return min(self.MAX_INTERVAL, self.interval * 4)
        answer = answer if isinstance(answer, dict) else {}
        events = answer.get("events") or []
        process_id = answer.get("process_id") if self.clear_mode == 0 else None
        if process_id:
            self.store.set_setting(self.RESERVED, process_id)
        for record in events:
            if not isinstance(record, dict):
                continue
            self.click.handle_event(record.get("EVENT_NAME"), record.get("EVENT_DATA"),
                                    "offline event %s" % _agi_text(record.get("ID"), 20),
                                    _agi_text(record.get("MESSAGE_ID"), 64))
        if process_id:
            try:
                self.client.call("event.offline.clear", {"process_id": process_id})
                self.store.set_setting(self.RESERVED, None)
            except BitrixError as exc:
                # Re-read under the process_id next time; the clicks table keeps
                # them from dialling twice.
                log.warning("click-to-call: event.offline.clear failed: %s", exc)
                return min(self.MAX_INTERVAL, self.interval * 2)
        elif reserved:
            self.store.set_setting(self.RESERVED, None)
        return 0.05 if len(events) >= 50 else self.interval


def bind_event(client, params):
    """event.bind; True when bound now, False when the portal had it already."""
    try:
        client.call("event.bind", params)
        return True
    except BitrixRejected as exc:
        if "already exist" in str(exc) or "ALREADY" in (exc.code or "").upper():
            return False
        raise


def bind_events(client, config, unbind=False):
    """Bind (or unbind) OnExternalCallStart/OnExternalCallBackStart for the configured
    mode; returns the portal's list of bindings (event.get)."""
    c2c = config.section("click_to_call")
    if c2c["mode"] == "off":
        raise ConfigError("[click_to_call] mode is off: set port or offline before binding events",
                          section="click_to_call", key="mode", value="off")
    if c2c["mode"] == "port":
        config.require("click_to_call", "public_url", "bind-events needs the URL Bitrix24 should POST to")
    for event in CLICK_EVENTS:
        params = {"event": event}
        if c2c["mode"] == "port":
            params["handler"] = c2c["public_url"]
        else:
            params["event_type"] = "offline"
        if unbind:
            client.call("event.unbind", params)
        else:
            bind_event(client, params)
    return client.call("event.get")


###############################################################################
# Web wizard ##################################################################
###############################################################################
# The setup wizard the installer points the admin to: plain server-rendered
# forms at /config/master, behind a login whose password is kept only as a
# salted PBKDF2 hash.

PASSWORD_ITERATIONS = 200000
PASSWORD_MIN_LENGTH = 10


def hash_password(password, salt=None, iterations=PASSWORD_ITERATIONS):
    """pbkdf2_sha256$<iterations>$<salt>$<hash>, the only form the password is kept in."""
    if len(password) < PASSWORD_MIN_LENGTH:
        raise ValueError("the wizard password needs at least %d characters" % PASSWORD_MIN_LENGTH)
    salt = salt or base64.b64encode(os.urandom(16)).decode().rstrip("=")
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode(), iterations)
    return "pbkdf2_sha256$%d$%s$%s" % (iterations, salt, base64.b64encode(digest).decode().rstrip("="))


def verify_password(password, stored):
    try:
        scheme, iterations, salt, _digest = (stored or "").split("$")
        if scheme != "pbkdf2_sha256":
            return False
        expected = hash_password(password, salt, int(iterations)) if len(password) >= PASSWORD_MIN_LENGTH \
            else "x"
    except ValueError:
        return False
    return hmac.compare_digest(expected.encode(), stored.encode())


WIZARD_STEPS = ("language", "database", "ami", "recordings", "bitrix24", "crm", "click_to_call", "save")

# One field of a step. kind: text, wide (paths and URLs), number, secret (never sent
# back), secret_url (sent back masked), choice (a list), alternative (radio buttons
# that show the fields of the chosen alternative), flag. when: (field, values): shown
# and taken only while that alternative is chosen.
WizardField = collections.namedtuple("WizardField", "section key kind when")


def _field(section, key, kind, when=None):
    return WizardField(section, key, kind, when)


_SQLITE, _MYSQL = ("cel.backend", ("sqlite",)), ("cel.backend", ("mysql",))
_WEBHOOK, _APP = ("bitrix24.connection", ("webhook",)), ("bitrix24.connection", ("application",))
_PORT, _DIALS = ("click_to_call.mode", ("port",)), ("click_to_call.mode", ("port", "offline"))

WIZARD_FIELDS = {
    "language": [_field("wizard", "language", "alternative")],
    "database": [_field("cel", "backend", "alternative"), _field("cel", "sqlite_path", "wide", _SQLITE),
                 _field("cel", "mysql_host", "text", _MYSQL), _field("cel", "mysql_port", "number", _MYSQL),
                 _field("cel", "mysql_user", "text", _MYSQL), _field("cel", "mysql_password", "secret", _MYSQL),
                 _field("cel", "mysql_database", "text", _MYSQL),
                 _field("cel", "table", "text", ("cel.backend", ("sqlite", "mysql")))],
    "ami": [_field("ami", "host", "text"), _field("ami", "port", "number"), _field("ami", "username", "text"),
            _field("ami", "secret", "secret")],
    "recordings": [_field("recordings", "attach", "flag"), _field("recordings", "path", "wide"),
                   _field("pbx", "recording_format", "choice")],
    # bitrix24.connection is not a key of the file: a webhook, or a local application
    "bitrix24": [_field("bitrix24", "connection", "alternative"), _field("bitrix24", "webhook_url", "secret_url", _WEBHOOK),
                 _field("bitrix24", "portal_url", "wide", _APP), _field("bitrix24", "client_id", "wide", _APP),
                 _field("bitrix24", "client_secret", "secret", _APP)],
    "crm": [_field("crm", "mode", "alternative"), _field("crm", "create", "flag"), _field("crm", "missed_task", "flag"),
            _field("crm", "default_user_id", "number"), _field("routing", "agi_listen", "text"),
            _field("routing", "fallback", "text")],
    "click_to_call": [_field("click_to_call", "mode", "alternative"), _field("click_to_call", "listen", "text", _PORT),
                      _field("click_to_call", "tls_cert", "wide", _PORT), _field("click_to_call", "tls_key", "wide", _PORT),
                      _field("click_to_call", "application_token", "secret", _PORT),
                      _field("click_to_call", "public_url", "wide", _PORT),
                      _field("click_to_call", "phone_channel", "wide", _DIALS),
                      _field("click_to_call", "outbound_context", "text", _DIALS)],
}
_VIRTUAL_FIELDS = {("bitrix24", "connection"): "webhook"}

_SCHEMA_BY_KEY = dict(((row[0], row[1]), row) for row in CONFIG_SCHEMA)
_FIELD_KINDS = dict(((f.section, f.key), f.kind) for fields in WIZARD_FIELDS.values() for f in fields)
_CHOICES = {("wizard", "language"): ("en", "ru"), ("cel", "backend"): ("auto", "sqlite", "mysql", "off"),
            ("pbx", "recording_format"): ("wav", "mp3", "gsm", "wav49", "ogg"),
            ("crm", "mode"): ("leads", "contacts"), ("click_to_call", "mode"): ("off", "port", "offline"),
            ("bitrix24", "connection"): ("webhook", "application")}
# The rights bx24ast needs, and no more (no 'command', 'config' or 'user' write).
AMI_USER_READ = "system,call,agent,dialplan,reporting"
AMI_USER_WRITE = "system,call,originate,reporting"

# Every word the wizard shows, in each language. Keys: page texts; f.<section>.<key> a
# field's label, h.<section>.<key> its help; c.<section>.<key>.<value> a choice;
# "said": the messages of checks and errors (Said templates) in the other language.
WIZARD_TEXT = {
    "en": {
        "title": "bx24ast setup", "login": "Log in", "user": "Login", "password": "Password",
        "login_help": "The login and password given to the installer (bx24ast.py set-password changes them).",
        "bad_login": "Wrong login or password.", "wait": "Too many failed logins: wait %d s.",
        "logout": "Log out", "next": "Save and continue", "check": "Check", "save": "Write the configuration",
        "results": "Results", "status": "Status", "kept": "set; leave empty to keep", "back": "Back to the setup",
        "done": "done", "todo": "to do", "steps": "Steps", "language_name": "English",
        "step_language": "Language", "step_database": "CEL database", "step_ami": "Asterisk (AMI)",
        "step_recordings": "Recordings", "step_bitrix24": "Bitrix24 portal", "step_crm": "CRM logic",
        "step_click_to_call": "Click-to-call", "step_save": "Save",
        "help_language": "The language of these pages and of the missed-call tasks' wording is chosen here.",
        "help_database": "Asterisk's CEL table is the memory of every call: bx24ast reads it to report calls made "
                         "while it was not running and to finish calls whose end it missed.",
        "help_ami": "bx24ast follows calls through the Asterisk Manager Interface. Use an existing AMI user, or "
                    "create a user 'bx24' with only the rights it needs.",
        "help_recordings": "Where MixMonitor writes the call recordings; they are attached to the calls in "
                           "Bitrix24.",
        "help_bitrix24": "How bx24ast talks to your portal: an inbound webhook (quickest), or a local application "
                         "(needed for click-to-call in the offline mode).",
        "help_crm": "What an unknown caller becomes in the CRM, who gets calls nobody took, the lead source of "
                    "each called line, and routing callers to their responsible employee.",
        "help_click_to_call": "A click on a number in Bitrix24 rings the employee's phone, then dials the client.",
        "help_save": "These settings are written to the configuration file, and the service reloads it.",
        "ami_rights": "The user 'bx24' gets read = %s and write = %s, from 127.0.0.1 only.",
        "create_ami": "Create the user bx24",
        "changes": "Changes to write", "no_changes": "Nothing changed.",
        "saved": "Saved. The service has read the new configuration.",
        "saving": "Saved. The service is reading the new configuration; the results follow in a moment.",
        "not_reloaded": "Saved, but the service has not read the new configuration yet; this page refreshes "
                        "by itself.",
        "fix": "Fix the fields marked below; nothing was kept.", "what_to_do": "What to do",
        "check_result": "Check", "checked_kept": "Checked: the values are kept.",
        "check_not_kept": "The check failed: these values were not kept. Fix them and check again, or save "
                          "them anyway with the button below.",
        "found": "Found on this PBX", "none_found": "Nothing found.",
        "oauth_code": "Authorization code (local application)",
        "help_oauth_code": "Only when the portal cannot reach this host's install handler: open "
                           "https://<portal>/oauth/authorize/?client_id=<client_id> and paste the code= value.",
        "lines": "Lead source by called line (DID)", "did": "Line (DID)", "source": "Lead source",
        "lines_help": "A call to this number gets this lead source. Numbers may be typed as you like: "
                      "8 (495) 123-45-67, +7 495 123-45-67.",
        "dialplan": "Dialplan for routing callers to their responsible employee",
        "dialplan_help": "Put this into /etc/asterisk/extensions_custom.conf, add a Custom Destination "
                         "bx24-responsible,s,1 (FreePBX: Admin, Custom Destinations) and point the inbound route "
                         "at it. Plain Asterisk: Goto(bx24-responsible,s,1) from the trunk's context.",
        "dialplan_needs": "Fill in the fallback above to get the dialplan.",
        "dialplan_off": "Routing is off (the FastAGI address is empty).",
        "handler_url": "Handler URL for Bitrix24",
        "handler_help": "Bitrix24 posts the clicks to this address: give it in the outbound webhook or the "
                        "application, or run bx24ast.py bind-events once (a local application).",
        "handler_plain": "Without a certificate the listener speaks plain HTTP: put a TLS proxy in front of it, "
                         "or fill in the certificate and key.",
        "users": "Bitrix24 employees and their extensions",
        "summary_OK": "Everything works.", "summary_WARNING": "It works, with the warnings below.",
        "summary_CRITICAL": "Something does not work: see below.", "summary_UNKNOWN": "Something does not work: see below.",
        "level_OK": "OK", "level_WARNING": "Warning", "level_CRITICAL": "Failed", "level_UNKNOWN": "Unknown",
        "error_stale_login": "The login form has expired: reload the page and log in again.",
        "error_csrf": "The form is stale or was not sent by this page (CSRF token): reload the page.",
        "error_not_found": "There is no such page in the setup.",
        "error_failed": "bx24ast could not show this page; the log says why.",
        "error_too_large": "The form is too large.",
        "st_help": "What the service is doing now. The same as JSON: GET /status (with the wizard login or "
                   "[wizard] status_token).",
        "st_daemon": "Service", "st_calls_now": "Calls in progress", "st_today": "Calls today",
        "st_reported": "reported", "st_missed": "missed", "st_waiting": "waiting for Bitrix24",
        "st_outbox": "Requests to Bitrix24", "st_backlog": "waiting", "st_parked": "given up",
        "st_oldest": "the oldest waits", "st_users": "Employees and extensions", "st_users_age": "list read %s ago",
        "st_users_never": "not read yet", "st_ami": "Asterisk (AMI)", "st_portal": "Bitrix24",
        "st_warnings": "Last warnings", "st_none": "none", "st_connected": "connected",
        "st_disconnected": "not connected", "st_answers": "answers", "st_failing": "not answering since %s ago",
        "st_down": "The service is not running: the numbers below are from the state database.",
        "st_direction": "Direction", "st_number": "Number", "st_since": "For", "st_ext": "Extension",
        "st_user": "Bitrix24 user", "st_time": "Time", "st_message": "Message",
        "dir_inbound": "inbound", "dir_outbound": "outbound", "dir_internal": "internal", "dir_None": "ringing",
        "f.wizard.language": "Language",
        "h.wizard.language": "The wizard's language; the login page follows the browser until you log in.",
        "c.wizard.language.en": "English", "c.wizard.language.ru": "Русский",
        "f.cel.backend": "Where CEL is kept",
        "h.cel.backend": "Found by itself looks where FreePBX and cel.conf say; off turns recovery off.",
        "c.cel.backend.auto": "Find it by itself", "c.cel.backend.sqlite": "SQLite file",
        "c.cel.backend.mysql": "MySQL / MariaDB", "c.cel.backend.off": "No CEL (no recovery)",
        "f.cel.sqlite_path": "SQLite database file", "h.cel.sqlite_path": "What cel_sqlite3_custom writes, "
                                                                        "usually /var/log/asterisk/master.db.",
        "f.cel.mysql_host": "MySQL server", "h.cel.mysql_host": "FreePBX keeps CEL in asteriskcdrdb on localhost.",
        "f.cel.mysql_port": "MySQL port", "h.cel.mysql_port": "3306 unless the server says otherwise.",
        "f.cel.mysql_user": "MySQL user", "h.cel.mysql_user": "A user allowed to SELECT from the CEL table.",
        "f.cel.mysql_password": "MySQL password",
        "h.cel.mysql_password": "Given to the mysql client in a private file, never on its command line.",
        "f.cel.mysql_database": "Database", "h.cel.mysql_database": "The database holding the CEL table.",
        "f.cel.table": "CEL table", "h.cel.table": "Its name, cel unless you changed it.",
        "f.ami.host": "Asterisk address", "h.ami.host": "127.0.0.1 when bx24ast runs on the PBX itself.",
        "f.ami.port": "AMI port", "h.ami.port": "The port of manager.conf's [general] section, 5038 by default.",
        "f.ami.username": "AMI user", "h.ami.username": "A user of manager.conf.",
        "f.ami.secret": "AMI password", "h.ami.secret": "That user's secret.",
        "f.recordings.attach": "Attach the recordings to the calls",
        "h.recordings.attach": "Each recording is uploaded to Bitrix24 once, after the call.",
        "f.recordings.path": "Recordings folder",
        "h.recordings.path": "Searched with its subfolders (FreePBX: /var/spool/asterisk/monitor).",
        "f.pbx.recording_format": "Recording format",
        "h.pbx.recording_format": "Used when the dialplan names a recording without its extension.",
        "c.pbx.recording_format.wav": "WAV", "c.pbx.recording_format.mp3": "MP3", "c.pbx.recording_format.gsm": "GSM",
        "c.pbx.recording_format.wav49": "WAV49", "c.pbx.recording_format.ogg": "OGG",
        "f.bitrix24.connection": "Connection", "h.bitrix24.connection": "",
        "c.bitrix24.connection.webhook": "Inbound webhook", "c.bitrix24.connection.application": "Local application",
        "f.bitrix24.webhook_url": "Webhook address",
        "h.bitrix24.webhook_url": "Applications, Developer resources, Other, Inbound webhook, with the rights "
                                  "telephony, crm, user and task: https://<portal>/rest/<user>/<code>/",
        "f.bitrix24.portal_url": "Portal address", "h.bitrix24.portal_url": "https://<your portal>.bitrix24.ru/",
        "f.bitrix24.client_id": "Application ID (client_id)",
        "h.bitrix24.client_id": "From the local application's form.",
        "f.bitrix24.client_secret": "Application key (client_secret)",
        "h.bitrix24.client_secret": "From the same form.",
        "f.crm.mode": "Unknown callers become",
        "h.crm.mode": "Contacts and deals for a portal that works without leads.",
        "c.crm.mode.leads": "Leads", "c.crm.mode.contacts": "Contacts and deals",
        "f.crm.create": "Create them for unknown numbers", "h.crm.create": "Otherwise the call is only logged.",
        "f.crm.missed_task": "A task for every missed inbound call",
        "h.crm.missed_task": "For the employee responsible for the caller; none when the client got through since.",
        "f.crm.default_user_id": "Employee for calls nobody took (Bitrix24 ID)",
        "h.crm.default_user_id": "Gets the calls no mapped extension answered; 0 for nobody.",
        "f.routing.agi_listen": "FastAGI address for routing",
        "h.routing.agi_listen": "The dialplan asks here who is responsible for a caller; empty turns it off.",
        "f.routing.fallback": "Where callers go otherwise",
        "h.routing.fallback": "context,extension,priority of your usual route when no responsible is found, "
                              "for example ext-group,600,1 (a ring group) or ivr-main,s,1.",
        "f.click_to_call.mode": "Click-to-call",
        "h.click_to_call.mode": "Open port: Bitrix24 posts each click to this host. Without a port: the portal's "
                                "event queue is read (a local application with an administrator's token).",
        "c.click_to_call.mode.off": "Off", "c.click_to_call.mode.port": "Open port",
        "c.click_to_call.mode.offline": "Without an open port",
        "f.click_to_call.listen": "Listen on", "h.click_to_call.listen": "address:port, for example 0.0.0.0:8077.",
        "f.click_to_call.tls_cert": "Certificate (PEM)", "h.click_to_call.tls_cert": "Empty: plain HTTP.",
        "f.click_to_call.tls_key": "Certificate key (PEM)", "h.click_to_call.tls_key": "The certificate's key.",
        "f.click_to_call.application_token": "Application token",
        "h.click_to_call.application_token": "auth[application_token] of the outbound webhook or application; "
                                             "events without it are refused.",
        "f.click_to_call.public_url": "Address Bitrix24 posts to",
        "h.click_to_call.public_url": "How the portal reaches this host, for example "
                                      "https://pbx.example.com:8077/bitrix24.",
        "f.click_to_call.phone_channel": "The employee's phone",
        "h.click_to_call.phone_channel": "Rung first; {extension} is the employee's extension.",
        "f.click_to_call.outbound_context": "Outbound context",
        "h.click_to_call.outbound_context": "Dials the client once the employee answers (your outbound routes).",
        "said": {},
    },
    "ru": {
        "title": "Настройка bx24ast", "login": "Войти", "user": "Логин", "password": "Пароль",
        "login_help": "Логин и пароль, заданные при установке (меняются командой bx24ast.py set-password).",
        "bad_login": "Неверный логин или пароль.", "wait": "Слишком много неудачных попыток: подождите %d с.",
        "logout": "Выйти", "next": "Сохранить и дальше", "check": "Проверить", "save": "Записать настройки",
        "results": "Результаты", "status": "Состояние", "kept": "задан; оставьте пустым, чтобы не менять",
        "back": "Вернуться к настройке", "done": "готово", "todo": "не настроено", "steps": "Шаги",
        "language_name": "Русский",
        "step_language": "Язык", "step_database": "База CEL", "step_ami": "Asterisk (AMI)",
        "step_recordings": "Записи разговоров", "step_bitrix24": "Портал Битрикс24", "step_crm": "Логика CRM",
        "step_click_to_call": "Звонок из CRM", "step_save": "Сохранение",
        "help_language": "Здесь выбирается язык этих страниц и текстов задач по пропущенным звонкам.",
        "help_database": "Таблица CEL в Asterisk помнит каждый звонок: по ней bx24ast сообщает о звонках, "
                         "сделанных, пока он не работал, и завершает звонки, конец которых он пропустил.",
        "help_ami": "bx24ast следит за звонками через интерфейс AMI. Укажите существующего пользователя AMI "
                    "или создайте пользователя bx24 только с нужными правами.",
        "help_recordings": "Куда MixMonitor пишет записи разговоров; они прикрепляются к звонкам в Битрикс24.",
        "help_bitrix24": "Как bx24ast обращается к порталу: входящий вебхук (быстрее всего) или локальное "
                         "приложение (нужно для звонков из CRM без открытого порта).",
        "help_crm": "Что создаётся в CRM для неизвестного номера, кому достаются звонки, на которые никто не "
                    "ответил, источник лида для каждой линии и направление звонка ответственному сотруднику.",
        "help_click_to_call": "Щелчок по номеру в Битрикс24 звонит на телефон сотрудника, затем набирает клиента.",
        "help_save": "Настройки будут записаны в файл конфигурации, служба перечитает его.",
        "ami_rights": "Пользователь bx24 получает read = %s и write = %s, только с адреса 127.0.0.1.",
        "create_ami": "Создать пользователя bx24",
        "changes": "Что будет записано", "no_changes": "Ничего не изменено.",
        "saved": "Сохранено. Служба перечитала настройки.",
        "saving": "Сохранено. Служба перечитывает настройки; результаты проверки появятся через мгновение.",
        "not_reloaded": "Сохранено, но служба ещё не перечитала настройки; страница обновится сама.",
        "fix": "Исправьте отмеченные поля; ничего не сохранено.", "what_to_do": "Что сделать",
        "check_result": "Проверка", "checked_kept": "Проверено: значения сохранены.",
        "check_not_kept": "Проверка не прошла: эти значения не сохранены. Исправьте их и проверьте снова "
                          "или сохраните как есть кнопкой ниже.",
        "found": "Найдено на этой АТС", "none_found": "Ничего не найдено.",
        "oauth_code": "Код авторизации (локальное приложение)",
        "help_oauth_code": "Только если портал не может достучаться до обработчика установки: откройте "
                           "https://<портал>/oauth/authorize/?client_id=<client_id> и вставьте значение code=.",
        "lines": "Источник лида по линии (DID)", "did": "Линия (DID)", "source": "Источник",
        "lines_help": "Звонок на этот номер получает этот источник. Номер можно вводить как угодно: "
                      "8 (495) 123-45-67, +7 495 123-45-67.",
        "dialplan": "Диалплан: звонок клиента ответственному сотруднику",
        "dialplan_help": "Вставьте это в /etc/asterisk/extensions_custom.conf, добавьте Custom Destination "
                         "bx24-responsible,s,1 (во FreePBX: Admin, Custom Destinations) и направьте на него "
                         "входящий маршрут. В чистом Asterisk: Goto(bx24-responsible,s,1) из контекста транка.",
        "dialplan_needs": "Укажите выше, куда идут остальные звонки, и здесь появится диалплан.",
        "dialplan_off": "Маршрутизация выключена (адрес FastAGI пуст).",
        "handler_url": "Адрес обработчика для Битрикс24",
        "handler_help": "Битрикс24 присылает щелчки на этот адрес: укажите его в исходящем вебхуке или "
                        "приложении либо один раз выполните bx24ast.py bind-events (локальное приложение).",
        "handler_plain": "Без сертификата порт работает по HTTP без шифрования: поставьте перед ним TLS-прокси "
                         "или укажите сертификат и ключ.",
        "users": "Сотрудники Битрикс24 и их внутренние номера",
        "summary_OK": "Всё работает.", "summary_WARNING": "Работает, но есть предупреждения ниже.",
        "summary_CRITICAL": "Что-то не работает: подробности ниже.",
        "summary_UNKNOWN": "Что-то не работает: подробности ниже.",
        "level_OK": "ОК", "level_WARNING": "Внимание", "level_CRITICAL": "Ошибка", "level_UNKNOWN": "Неизвестно",
        "error_stale_login": "Форма входа устарела: обновите страницу и войдите снова.",
        "error_csrf": "Форма устарела или отправлена не с этой страницы (CSRF-токен): обновите страницу.",
        "error_not_found": "Такой страницы в настройке нет.",
        "error_failed": "bx24ast не смог показать эту страницу; причина записана в журнале.",
        "error_too_large": "Слишком большая форма.",
        "st_help": "Что служба делает сейчас. То же в JSON: GET /status (с логином мастера или "
                   "[wizard] status_token).",
        "st_daemon": "Служба", "st_calls_now": "Идут сейчас", "st_today": "Звонки сегодня",
        "st_reported": "переданы", "st_missed": "пропущены", "st_waiting": "ждут отправки в Битрикс24",
        "st_outbox": "Запросы к Битрикс24", "st_backlog": "ждут", "st_parked": "отложены после ошибки",
        "st_oldest": "самый старый ждёт", "st_users": "Сотрудники и внутренние номера",
        "st_users_age": "список прочитан %s назад", "st_users_never": "ещё не прочитан",
        "st_ami": "Asterisk (AMI)", "st_portal": "Битрикс24", "st_warnings": "Последние предупреждения",
        "st_none": "нет", "st_connected": "подключено", "st_disconnected": "нет подключения",
        "st_answers": "отвечает", "st_failing": "не отвечает уже %s",
        "st_down": "Служба не работает: цифры ниже взяты из базы состояния.",
        "st_direction": "Направление", "st_number": "Номер", "st_since": "Длится", "st_ext": "Внутренний номер",
        "st_user": "Пользователь Битрикс24", "st_time": "Время", "st_message": "Сообщение",
        "dir_inbound": "входящий", "dir_outbound": "исходящий", "dir_internal": "внутренний", "dir_None": "звонит",
        "f.wizard.language": "Язык",
        "h.wizard.language": "Язык мастера; страница входа следует языку браузера, пока вы не вошли.",
        "c.wizard.language.en": "English", "c.wizard.language.ru": "Русский",
        "f.cel.backend": "Где хранится CEL",
        "h.cel.backend": "«Найти самому» смотрит туда, куда указывают FreePBX и cel.conf; «Без CEL» выключает "
                         "восстановление.",
        "c.cel.backend.auto": "Найти самому", "c.cel.backend.sqlite": "Файл SQLite",
        "c.cel.backend.mysql": "MySQL / MariaDB", "c.cel.backend.off": "Без CEL (без восстановления)",
        "f.cel.sqlite_path": "Файл базы SQLite",
        "h.cel.sqlite_path": "Его пишет cel_sqlite3_custom, обычно /var/log/asterisk/master.db.",
        "f.cel.mysql_host": "Сервер MySQL", "h.cel.mysql_host": "FreePBX хранит CEL в базе asteriskcdrdb на localhost.",
        "f.cel.mysql_port": "Порт MySQL", "h.cel.mysql_port": "3306, если сервер не настроен иначе.",
        "f.cel.mysql_user": "Пользователь MySQL", "h.cel.mysql_user": "Пользователь с правом SELECT на таблицу CEL.",
        "f.cel.mysql_password": "Пароль MySQL",
        "h.cel.mysql_password": "Передаётся клиенту mysql в закрытом файле, никогда в командной строке.",
        "f.cel.mysql_database": "База данных", "h.cel.mysql_database": "База, в которой лежит таблица CEL.",
        "f.cel.table": "Таблица CEL", "h.cel.table": "Её имя, cel, если вы его не меняли.",
        "f.ami.host": "Адрес Asterisk", "h.ami.host": "127.0.0.1, если bx24ast работает на самой АТС.",
        "f.ami.port": "Порт AMI", "h.ami.port": "Порт из секции [general] файла manager.conf, обычно 5038.",
        "f.ami.username": "Пользователь AMI", "h.ami.username": "Пользователь из manager.conf.",
        "f.ami.secret": "Пароль AMI", "h.ami.secret": "Пароль (secret) этого пользователя.",
        "f.recordings.attach": "Прикреплять записи к звонкам",
        "h.recordings.attach": "Каждая запись загружается в Битрикс24 один раз, после звонка.",
        "f.recordings.path": "Папка с записями",
        "h.recordings.path": "Поиск идёт и по вложенным папкам (во FreePBX: /var/spool/asterisk/monitor).",
        "f.pbx.recording_format": "Формат записей",
        "h.pbx.recording_format": "Нужен, когда диалплан называет запись без расширения файла.",
        "c.pbx.recording_format.wav": "WAV", "c.pbx.recording_format.mp3": "MP3", "c.pbx.recording_format.gsm": "GSM",
        "c.pbx.recording_format.wav49": "WAV49", "c.pbx.recording_format.ogg": "OGG",
        "f.bitrix24.connection": "Подключение", "h.bitrix24.connection": "",
        "c.bitrix24.connection.webhook": "Входящий вебхук", "c.bitrix24.connection.application": "Локальное приложение",
        "f.bitrix24.webhook_url": "Адрес вебхука",
        "h.bitrix24.webhook_url": "Приложения, Разработчикам, Другое, Входящий вебхук, с правами telephony, crm, "
                                  "user и task: https://<портал>/rest/<пользователь>/<код>/",
        "f.bitrix24.portal_url": "Адрес портала", "h.bitrix24.portal_url": "https://<ваш портал>.bitrix24.ru/",
        "f.bitrix24.client_id": "Код приложения (client_id)",
        "h.bitrix24.client_id": "Из формы локального приложения.",
        "f.bitrix24.client_secret": "Ключ приложения (client_secret)", "h.bitrix24.client_secret": "Из той же формы.",
        "f.crm.mode": "Неизвестный номер становится",
        "h.crm.mode": "Контакт и сделка — для портала, который работает без лидов.",
        "c.crm.mode.leads": "Лидом", "c.crm.mode.contacts": "Контактом и сделкой",
        "f.crm.create": "Создавать их для неизвестных номеров", "h.crm.create": "Иначе звонок только записывается.",
        "f.crm.missed_task": "Задача по каждому пропущенному входящему",
        "h.crm.missed_task": "Ответственному за клиента; не создаётся, если клиент потом дозвонился.",
        "f.crm.default_user_id": "Сотрудник для звонков без ответа (ID в Битрикс24)",
        "h.crm.default_user_id": "Ему достаются звонки, на которые не ответил ни один известный номер; 0 — никому.",
        "f.routing.agi_listen": "Адрес FastAGI для маршрутизации",
        "h.routing.agi_listen": "Здесь диалплан спрашивает, кто ответственный за клиента; пусто — выключено.",
        "f.routing.fallback": "Куда идут остальные звонки",
        "h.routing.fallback": "контекст,номер,приоритет вашего обычного маршрута, когда ответственный не найден, "
                              "например ext-group,600,1 (группа вызова) или ivr-main,s,1.",
        "f.click_to_call.mode": "Звонок из CRM",
        "h.click_to_call.mode": "Открытый порт: Битрикс24 присылает каждый щелчок на этот сервер. Без порта: "
                                "читается очередь событий портала (локальное приложение с токеном администратора).",
        "c.click_to_call.mode.off": "Выключен", "c.click_to_call.mode.port": "Через открытый порт",
        "c.click_to_call.mode.offline": "Без открытого порта",
        "f.click_to_call.listen": "Слушать на", "h.click_to_call.listen": "адрес:порт, например 0.0.0.0:8077.",
        "f.click_to_call.tls_cert": "Сертификат (PEM)", "h.click_to_call.tls_cert": "Пусто — HTTP без шифрования.",
        "f.click_to_call.tls_key": "Ключ сертификата (PEM)", "h.click_to_call.tls_key": "Закрытый ключ сертификата.",
        "f.click_to_call.application_token": "Токен приложения",
        "h.click_to_call.application_token": "auth[application_token] исходящего вебхука или приложения; "
                                             "события без него отклоняются.",
        "f.click_to_call.public_url": "Адрес, на который пишет Битрикс24",
        "h.click_to_call.public_url": "Как портал достаёт до этого сервера, например "
                                      "https://pbx.example.com:8077/bitrix24.",
        "f.click_to_call.phone_channel": "Телефон сотрудника",
        "h.click_to_call.phone_channel": "Звонит первым; {extension} — внутренний номер сотрудника.",
        "f.click_to_call.outbound_context": "Контекст исходящих",
        "h.click_to_call.outbound_context": "Набирает клиента, когда сотрудник ответил (ваши исходящие маршруты).",
        # the names of the checks, as `check` prints them in English
        "check_daemon": "служба", "check_ami": "AMI", "check_bitrix24": "Битрикс24", "check_outbox": "запросы",
        "check_cel": "CEL", "check_storage": "хранилище", "check_listeners": "порты", "check_endpoints": "подключения",
        "check_hooks": "хуки",
        "check_recordings": "записи", "check_users": "сотрудники", "check_configuration": "настройки",
        "check_database": "база CEL", "check_crm": "CRM", "check_click_to_call": "звонок из CRM",
        "units": (("день", "дня", "дней"), ("час", "часа", "часов"), ("минута", "минуты", "минут"),
                  ("секунда", "секунды", "секунд")),
        "said": {
            # configuration values
            "a whole number from %d to %d": "целое число от %d до %d",
            "a number from %g to %g": "число от %g до %g",
            "yes or no": "yes или no",
            "a valid regular expression (%s)": "правильное регулярное выражение (%s)",
            "one of: %s": "одно из: %s",
            "a host name or IP address": "имя сервера или IP-адрес",
            "text with only {number}, {did}, {line}, {time}, {linkedid} (%s)":
                "текст только с {number}, {did}, {line}, {time}, {linkedid} (%s)",
            "empty, or address:port like 127.0.0.1:4573 or 0.0.0.0:8077":
                "пусто или адрес:порт, например 127.0.0.1:4573 или 0.0.0.0:8077",
            "a channel with {extension}, like Local/{extension}@from-internal or PJSIP/{extension}":
                "канал с {extension}, например Local/{extension}@from-internal или PJSIP/{extension}",
            "a channel with only {extension} in braces": "канал, где в фигурных скобках только {extension}",
            "a directory path": "путь к папке",
            "an http(s) URL": "адрес http(s)",
            "empty, or an http(s) URL": "пусто или адрес http(s)",
            "empty, or an inbound webhook URL like https://<portal>/rest/<user>/<token>/":
                "пусто или адрес входящего вебхука вида https://<портал>/rest/<пользователь>/<код>/",
            "empty, or the portal address like https://<portal>.bitrix24.ru/":
                "пусто или адрес портала вида https://<портал>.bitrix24.ru/",
            "a dialplan context name (letters, digits, _ and -)": "имя контекста диалплана (буквы, цифры, _ и -)",
            "a plain SQL name (letters, digits, _)": "простое имя SQL (буквы, цифры, _)",
            "digits (Bitrix24 keeps only 0-9 # * +)": "цифры (Битрикс24 хранит только 0-9 # * +)",
            "empty, or context,extension,priority like ext-group,600,1":
                "пусто или контекст,номер,приоритет, например ext-group,600,1",
            "digits, like 00 or 810": "цифры, например 00 или 810",
            "empty, or the extension or ring group number to ring": "пусто или номер сотрудника либо группы вызова",
            "a login of letters, digits, _ . @ -": "логин из букв, цифр и знаков _ . @ -",
            # the wizard's forms
            "a single value": "одно значение", "a single line": "одна строка", "expected %s": "нужно: %s",
            "the portal address with the application's client_id": "адрес портала и client_id приложения",
            "the webhook's address, https://<portal>/rest/<user>/<code>/":
                "адрес вебхука, https://<портал>/rest/<пользователь>/<код>/",
            "needed in port mode (from the webhook or application)":
                "нужен для режима с открытым портом (из вебхука или приложения)",
            "a whole number up to %d": "целое число не больше %d",
            "this line is already in the table": "эта линия уже есть в таблице",
            "%s: %d recordings, mostly .%s": "%s: записей: %d, в основном .%s",
            "%s: no recordings found there": "%s: записей там не найдено",
            "dialplan: %s = %s": "диалплан: %s = %s",
            "high": "надёжно", "medium": "вероятно", "low": "сомнительно",
            # AMI
            "AMI: %s would wait for itself in the reader thread": "AMI: %s ждало бы само себя в потоке чтения",
            "AMI: no answer to %s within %.0f s": "AMI: нет ответа на %s за %.0f с",
            "no answer from Asterisk within %.0f s": "Asterisk не ответил за %.0f с",
            "AMI: %s:%s is not an Asterisk Manager Interface (banner %r)":
                "AMI: %s:%s — это не Asterisk Manager Interface (приветствие %r)",
            "AMI: %s:%s refused the MD5 challenge: %s": "AMI: %s:%s отказал в MD5-авторизации: %s",
            "AMI: login as '%s' to %s:%s refused: %s (check [ami] username and secret against manager.conf)":
                "AMI: вход пользователя «%s» на %s:%s отклонён: %s (сверьте [ami] username и secret с manager.conf)",
            "AMI %s:%s not reachable (%s)": "AMI %s:%s недоступен (%s)", "no answer": "нет ответа",
            "no AMI user set": "пользователь AMI не задан",
            "fill in the user, or create one": "укажите пользователя или создайте его",
            "check manager.conf: the user, its secret, permit=": "проверьте manager.conf: пользователя, secret, permit=",
            "cannot connect to %s:%s: %s": "не удалось подключиться к %s:%s: %s",
            "is Asterisk running, and AMI enabled in manager.conf ([general] enabled = yes)?":
                "запущен ли Asterisk и включён ли AMI в manager.conf ([general] enabled = yes)?",
            "logged in to %s:%s as %s (%s)": "вход на %s:%s под пользователем %s выполнен (%s)",
            "trunks and phones are told apart by the [pbx] rules": "транки и телефоны различаются по правилам [pbx]",
            "Asterisk lists no PJSIP/SIP/IAX2 endpoints to this user":
                "Asterisk не показывает этому пользователю ни одного PJSIP/SIP/IAX2-подключения",
            "give the AMI user read = system, reporting, or set [pbx] trunk_channels":
                "дайте пользователю AMI read = system, reporting или задайте [pbx] trunk_channels",
            "trunks: %s": "транки: %s", "phones: %s": "телефоны: %s", "not classified: %s": "не определены: %s",
            "set [pbx] trunk_channels to name these trunks": "назовите транки в [pbx] trunk_channels",
            "registers to a provider (outbound registration)": "регистрируется у оператора (исходящая регистрация)",
            "authenticates to the far end (outbound_auth), not to us":
                "авторизуется на той стороне (outbound_auth), а не у нас",
            "extension-shaped name, logs in to us (auth)": "имя как у внутреннего номера, входит к нам (auth)",
            "extension-shaped name": "имя как у внутреннего номера",
            "extension-shaped name (host=dynamic)": "имя как у внутреннего номера (host=dynamic)",
            "logs in to us (auth) and has no outbound auth": "входит к нам (auth), исходящей авторизации нет",
            "a fixed remote contact and no login": "постоянный адрес и без входа",
            "no sign either way; the [pbx] rules decide": "признаков нет; решают правила [pbx]",
            "registers to a provider (register =>)": "регистрируется у оператора (register =>)",
            "a fixed host (%s) and not an extension": "постоянный адрес (%s), не внутренний номер",
            "registers to us but is not extension-shaped; the [pbx] rules decide":
                "регистрируется у нас, но имя не как у внутреннего номера; решают правила [pbx]",
            # CEL
            "CEL eventtime %r is not a date": "eventtime в CEL %r — не дата",
            "CEL table/column names must be plain identifiers: %r, %r":
                "имена таблицы и столбца CEL должны быть простыми: %r, %r",
            "CEL database/table/column names must be plain identifiers: %r":
                "имена базы, таблицы и столбца CEL должны быть простыми: %r",
            "CEL database %s does not exist (cel_sqlite3_custom not loaded?)":
                "базы CEL %s нет (cel_sqlite3_custom не загружен?)",
            "[cel] sqlite_path %s is not a regular file": "[cel] sqlite_path %s — не обычный файл",
            "cannot read CEL database %s: %s": "не удалось прочитать базу CEL %s: %s",
            "CEL database %s has no table '%s'": "в базе CEL %s нет таблицы «%s»",
            "CEL table %s.%s lacks columns %s": "в таблице CEL %s.%s нет столбцов %s",
            "reading CEL from %s failed: %s": "чтение CEL из %s не удалось: %s",
            "the mysql client (%s) cannot be run: %s; install mariadb-client (apt) or mariadb (yum)":
                "клиент mysql (%s) не запускается: %s; установите mariadb-client (apt) или mariadb (yum)",
            "MySQL refused [cel] mysql_user/mysql_password: %s": "MySQL не принял [cel] mysql_user/mysql_password: %s",
            "MySQL has no table %s.%s ([cel] mysql_database, table): %s":
                "в MySQL нет таблицы %s.%s ([cel] mysql_database, table): %s",
            "mysql failed (exit %d): %s": "mysql завершился с ошибкой (код %d): %s",
            "unexpected mysql output (%d fields, %d expected)": "неожиданный ответ mysql (полей: %d, нужно %d)",
            "CEL unreachable: %s": "CEL недоступен: %s",
            "CEL table is empty: is cel.conf enabled?": "таблица CEL пуста: включён ли cel.conf?",
            "no CEL event written in the last %s (the newest is %s old): calls made now could not be recovered":
                "за последние %s в CEL нет ни одного события (последнему уже %s): сегодняшние звонки нельзя "
                "будет восстановить",
            "CEL reachable (%s), the newest event %s old": "CEL доступен (%s), последнему событию %s",
            "no %s: CEL is not configured": "нет %s: CEL не настроен",
            "cel.conf: enable is not 'yes': Asterisk writes no CEL": "cel.conf: enable не «yes», Asterisk не пишет CEL",
            "cel.conf: events %s are off; recovery needs them (events=ALL)":
                "cel.conf: события %s выключены, а они нужны для восстановления (events=ALL)",
            "fix [%s] (bx24ast.py detect shows what was found)": "исправьте [%s] (bx24ast.py detect покажет, что найдено)",
            "off ([cel] backend = off)": "выключено ([cel] backend = off)", "no CEL store found": "CEL не найден",
            "recovery %s: calls made while bx24ast is down are lost":
                "восстановление: %s; звонки, сделанные пока bx24ast не работает, теряются",
            "enable CEL in cel.conf (cel_sqlite3_custom or FreePBX's MySQL), then bx24ast.py detect":
                "включите CEL в cel.conf (cel_sqlite3_custom или MySQL FreePBX), затем bx24ast.py detect",
            "is cel.conf enabled with events=ALL? bx24ast.py detect": "включён ли cel.conf с events=ALL? bx24ast.py detect",
            # recordings
            "%s does not exist": "%s не существует",
            "where does MixMonitor write? (FreePBX: /var/spool/asterisk/monitor)":
                "куда пишет MixMonitor? (во FreePBX: /var/spool/asterisk/monitor)",
            "%s is not readable by bx24ast": "bx24ast не может читать %s",
            "check its permissions": "проверьте права доступа",
            "%s has no recordings yet": "в %s пока нет записей",
            "are calls recorded (MixMonitor)? check again after a call":
                "записываются ли звонки (MixMonitor)? проверьте снова после звонка",
            # Bitrix24
            "not configured": "не настроено",
            "a webhook address, or the portal address with the application's client_id":
                "адрес вебхука или адрес портала с client_id приложения",
            "the webhook/application lacks the scopes %s": "вебхуку или приложению не хватает прав %s",
            "edit it in Bitrix24: Developer resources": "измените его в Битрикс24: Разработчикам",
            "reachable, scopes telephony crm user task granted": "доступен, права telephony crm user task есть",
            "scope: %s": "scope: %s", "user.get: %s": "user.get: %s",
            "check the address and the rights": "проверьте адрес и права",
            "%s -> user %s": "%s -> пользователь %s",
            "no user has an internal phone number (UF_PHONE_INNER)":
                "ни у одного сотрудника не указан внутренний номер (UF_PHONE_INNER)",
            "fill 'Internal phone' in the employees' profiles": "заполните «Внутренний телефон» в профилях сотрудников",
            "the webhook/application needs the user scope": "вебхуку или приложению нужны права user",
            "an authorization code is for a local application: fill portal_url, client_id, client_secret":
                "код авторизации нужен для локального приложения: заполните адрес портала, client_id и client_secret",
            "the code was refused: %s (codes are valid for 30 seconds)": "код не принят: %s (код действует 30 секунд)",
            "tokens saved for %s": "токены для %s сохранены",
            "Bitrix24 %s: %s": "Битрикс24, %s: %s",
            "Bitrix24 %s: cannot reach the portal: %s": "Битрикс24, %s: портал недоступен: %s",
            "Bitrix24 %s: connection failed: %s": "Битрикс24, %s: соединение прервалось: %s",
            "Bitrix24 %s: the answer is not JSON": "Битрикс24, %s: ответ не в формате JSON",
            "Bitrix24 %s: too many redirects": "Битрикс24, %s: слишком много перенаправлений",
            "Bitrix24: no OAuth tokens yet: install the local application on the portal or run bx24ast.py "
            "oauth-code CODE": "Битрикс24: токенов OAuth ещё нет: установите локальное приложение на портале "
                               "или выполните bx24ast.py oauth-code КОД",
            "add the scopes telephony, crm, user, task to the webhook/application":
                "добавьте вебхуку или приложению права telephony, crm, user, task",
            "check [bitrix24] webhook_url (the code may have changed)": "проверьте [bitrix24] webhook_url (код мог смениться)",
            "check [bitrix24] webhook_url and the webhook user's rights":
                "проверьте [bitrix24] webhook_url и права пользователя вебхука",
            "the application's tokens are no longer valid: reinstall the application or run bx24ast.py oauth-code":
                "токены приложения больше не действуют: переустановите приложение или выполните bx24ast.py oauth-code",
            # the AMI user
            "cannot read %s: %s": "не удалось прочитать %s: %s", "cannot write %s: %s": "не удалось записать %s: %s",
            "user bx24 written to %s, but 'manager reload' failed: %s":
                "пользователь bx24 записан в %s, но «manager reload» не удался: %s",
            "user bx24 written to %s, but 'asterisk -rx \"manager reload\"' could not run: %s":
                "пользователь bx24 записан в %s, но «asterisk -rx \"manager reload\"» не запустился: %s",
            "user bx24 written to %s and AMI reloaded": "пользователь bx24 записан в %s, AMI перечитал настройки",
            # checks
            "never ran on %s (no heartbeat)": "ни разу не запускалась с %s (нет heartbeat)",
            "start it: systemctl start bx24ast (or bx24ast.py run -f to see why it fails)":
                "запустите: systemctl start bx24ast (или bx24ast.py run -f, чтобы увидеть причину ошибки)",
            "stopped at %s": "остановлена в %s", "systemctl start bx24ast": "systemctl start bx24ast",
            "pid %s is gone (last heartbeat %s ago): it died":
                "процесса %s больше нет (последний heartbeat %s назад): служба упала",
            "see the log; systemctl restart bx24ast": "посмотрите журнал; systemctl restart bx24ast",
            "pid %s is hung: last heartbeat %s ago": "процесс %s завис: последний heartbeat %s назад",
            "systemctl restart bx24ast": "systemctl restart bx24ast",
            "running (pid %s, up %s, heartbeat %s ago)": "работает (процесс %s, %s без перезапуска, heartbeat %s назад)",
            "the daemon is not running": "служба не работает",
            "connected to %s": "подключено к %s", "not connected to %s: %s": "нет подключения к %s: %s",
            "%s: %s": "%s: %s",
            "connecting": "подключается",
            "check [%s] host/port/username/secret and manager.conf (bx24ast.py run -f shows the login)":
                "проверьте [%s] host/port/username/secret и manager.conf (bx24ast.py run -f покажет вход)",
            "set [bitrix24] webhook_url, or portal_url + client_id + client_secret":
                "задайте [bitrix24] webhook_url или portal_url + client_id + client_secret",
            "reachable (%s); the access token is due for a refresh": "доступен (%s); токен доступа пора обновить",
            "check the portal address and the webhook/application rights (telephony crm user task)":
                "проверьте адрес портала и права вебхука или приложения (telephony crm user task)",
            "is the portal reachable from this host? (DNS, firewall, proxy)":
                "доступен ли портал с этого сервера? (DNS, межсетевой экран, прокси)",
            "reachable, but the service reports: %s": "доступен, но служба сообщает: %s",
            "too many requests or an overloaded portal; it resumes by itself":
                "слишком много запросов или портал перегружен; работа продолжится сама",
            "reachable (%s)": "доступен (%s)",
            "reachable (%s): the service's last answer %s ago": "доступен (%s): последний ответ службе был %s назад",
            "the service cannot reach the portal for %s (%d attempts): %s":
                "служба не может достучаться до портала уже %s (попыток: %d): %s",
            "no state database yet at %s": "базы состояния в %s ещё нет",
            "cannot read the state database: %s": "не удалось прочитать базу состояния: %s",
            "%d request(s) due for %s and nothing sent: the sender is stuck":
                "запросов: %d — ждут уже %s, и ничего не отправлено: отправка застряла",
            "restart bx24ast (systemctl restart bx24ast) and report the log":
                "перезапустите bx24ast (systemctl restart bx24ast) и пришлите журнал",
            "%d request(s) given up (parked)": "запросов отложено после ошибки: %d",
            "bx24ast.py outbox list shows why; bx24ast.py outbox retry sends them again":
                "bx24ast.py outbox list покажет причину; bx24ast.py outbox retry отправит их снова",
            "%d request(s) waiting, the oldest for %s": "запросов ждёт: %d, самый старый %s",
            "is Bitrix24 reachable? (see the bitrix24 check)": "доступен ли Битрикс24? (см. проверку bitrix24)",
            "%d call(s) registered over %s ago and never finished (%s)":
                "звонков: %d — зарегистрированы больше %s назад и не завершены (%s)",
            "their end reached neither AMI nor CEL: is CEL enabled? (bx24ast.py detect)":
                "их конец не пришёл ни через AMI, ни через CEL: включён ли CEL? (bx24ast.py detect)",
            "%d call(s) in the last 24 h finished with uncertain values (%s: %s)":
                "звонков за сутки, завершённых с неточными данными: %d (%s: %s)",
            "enable CEL so that calls whose end bx24ast missed are finished as Asterisk recorded them":
                "включите CEL, чтобы звонки, конец которых bx24ast пропустил, завершались по записям Asterisk",
            "%d waiting, nothing given up": "ждут: %d, отложенных нет",
            ", %s MB free": ", свободно %s МБ",
            "writing the state database fails since %s ago: %s; %d call event(s) held in memory%s":
                "запись в базу состояния не удаётся уже %s: %s; событий звонков в памяти: %d%s",
            "free disk space under [storage] state_dir (df -h); nothing is lost while the daemon runs":
                "освободите место на диске [storage] state_dir (df -h); пока служба работает, ничего не теряется",
            "the disk of the state database is almost full%s (the %s MB reserve is used up)":
                "диск базы состояния почти заполнен%s (резерв %s МБ израсходован)",
            "free disk space under [storage] state_dir (df -h) before writes fail":
                "освободите место на диске [storage] state_dir (df -h), пока запись ещё работает",
            "state database writable%s": "база состояния доступна для записи%s",
            "%s: %s loaded": "%s: загружено %s",
            "%s cannot be loaded (%s): calls are reported as if there were no hooks":
                "%s не загружается (%s): звонки передаются так, как будто хуков нет",
            "fix the file, then systemctl reload bx24ast; try it with bx24ast hooks test CAPTURE":
                "исправьте файл, затем systemctl reload bx24ast; проверьте его командой bx24ast hooks test CAPTURE",
            "%s failed %d time(s) since the start (the calls went on without it)":
                "%s не сработал %d раз с запуска (звонки прошли без него)",
            "the log says why, once per hook (grep 'hooks:'); bx24ast hooks test CAPTURE replays a call through them":
                "почему — сказано в журнале, по разу на хук (grep 'hooks:'); bx24ast hooks test CAPTURE прогонит звонок через них",
            "another program holds the port: change it in [routing]/[click_to_call] or stop that program":
                "порт занят другой программой: смените его в [routing]/[click_to_call] или остановите ту программу",
            "%s on %s": "%s на %s",
            "BX24AST OK - %d checks passed": "BX24AST OK — пройдено проверок: %d",
        },
    },
}


def raw_config_values(path):
    """{(section, key): text} as written in the file, defaults for the rest."""
    values = dict(((s, k), d) for s, k, d, _c, _doc in CONFIG_SCHEMA)
    maps = dict((name, collections.OrderedDict()) for name in FREEFORM_SECTIONS)
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error:
        return values, maps
    for section in parser.sections():
        for key, value in parser.items(section):
            if section in maps:
                maps[section][key] = value
            else:
                values[(section, key)] = value
    return values, maps


def _bitrix24_connection(values):
    """Which way to the portal the values describe: a webhook, or a local application."""
    if not values.get(("bitrix24", "webhook_url")) and values.get(("bitrix24", "portal_url")) \
            and values.get(("bitrix24", "client_id")):
        return "application"
    return "webhook"


def _field_shown(field, values):
    """A field of an alternative is shown (and taken) only while that alternative is chosen."""
    if field.when is None:
        return True
    section, _, key = field.when[0].partition(".")
    return values.get((section, key)) in field.when[1]


class SetupWizard(object):
    """What each step of the wizard shows, checks and saves, apart from HTTP.

    A draft (the values posted so far) lives in the session; the configuration
    file is written once, at the save step, atomically."""

    MAX_LINES = 500     # lines (DIDs) in the lead-source table: more is not an office

    def __init__(self, config_path, root="/", asterisk_command=("asterisk", "-rx"), on_saved=None, timeout=5.0):
        self.config_path = config_path
        self.root = root
        self.asterisk_command = list(asterisk_command)
        self.on_saved = on_saved
        self.timeout = timeout

    # -- values -----------------------------------------------------------------------------------
    def current(self, draft):
        values, maps = raw_config_values(self.config_path)
        values.update((k, v) for k, v in draft.items() if isinstance(k, tuple))
        values[("bitrix24", "connection")] = draft.get(("bitrix24", "connection")) or _bitrix24_connection(values)
        if "__lines" in draft:
            maps["lines"] = draft["__lines"]
        return values, maps

    def draft_config(self, draft):
        """The configuration the draft would give (for the Check buttons)."""
        values, maps = self.current(draft)
        values = dict((k, v) for k, v in values.items() if k not in _VIRTUAL_FIELDS)
        return Config.from_text(_config_text(values, maps), self.config_path)

    def configured(self, step, draft):
        """Whether a step has what it needs, in the file or the draft (the step list's ticks)."""
        values, maps = self.current(draft)
        if step == "database":
            return values[("cel", "backend")] != "auto" or bool(detect_cel(self.root)[0])
        if step == "ami":
            return bool(values[("ami", "username")] and values[("ami", "secret")])
        if step == "recordings":
            return values[("recordings", "attach")].lower() not in _TRUE or os.path.isdir(values[("recordings", "path")])
        if step == "bitrix24":
            return bool(values[("bitrix24", "webhook_url")] or
                        (values[("bitrix24", "portal_url")] and values[("bitrix24", "client_id")]))
        if step == "click_to_call":
            return values[("click_to_call", "mode")] == "off" or bool(values[("click_to_call", "application_token")]
                                                                   or values[("click_to_call", "mode")] == "offline")
        if step == "save":
            return os.path.exists(self.config_path) and not self.changes(draft)
        return True

    def suggestions(self, step, draft):
        """(what was found on the PBX, {key: suggested value}), for the values being edited."""
        if step == "database":
            found, warnings = detect_cel(self.root)
            return [say("%s (%s): %s", c["source"], say(c["confidence"]), ", ".join(
                "%s=%s" % (k, "***" if "password" in k else v) for k, v in c["settings"].items()))
                for c in found] + warnings, (found[0]["settings"] if found else {})
        if step == "recordings":
            values, _ = self.current(draft)
            found, suggested = [], {}
            dialplan = recording_settings_in_dialplan(os.path.join(self.root, "etc", "asterisk"))
            if dialplan.get("MIXMON_DIR") and ("recordings", "path") not in draft:
                suggested["path"] = dialplan["MIXMON_DIR"].rstrip("/")
            path = suggested.get("path") or values[("recordings", "path")]
            fmt = detect_recording_format(path)
            if fmt:
                found.append(say("%s: %d recordings, mostly .%s", path, fmt[1], fmt[0]))
                suggested["recording_format"] = fmt[0]
            else:
                found.append(say("%s: no recordings found there", path))
            for name, value in sorted(dialplan.items()):
                found.append(say("dialplan: %s = %s", name, value))
            if dialplan.get("MIXMON_FORMAT") and not fmt:
                suggested["recording_format"] = dialplan["MIXMON_FORMAT"].lower()
            return found, suggested
        return [], {}

    def submit(self, step, form, draft):
        """Validate one step's form into the draft; {field: error} (empty when accepted)."""
        errors, accepted = {}, {}
        chosen = dict(self.current(draft)[0])
        for field in WIZARD_FIELDS.get(step, []):
            if field.kind == "alternative" and isinstance(form.get("%s.%s" % field[:2]), str):
                chosen[field[:2]] = form["%s.%s" % field[:2]].strip()
        for field in WIZARD_FIELDS.get(step, []):
            section, key, kind = field.section, field.key, field.kind
            name = "%s.%s" % (section, key)
            if not _field_shown(field, chosen):
                continue   # a field of an alternative not chosen: what the file has stays
            raw = form.get(name)
            if raw is None and kind == "alternative":
                raw = chosen.get((section, key))   # not posted: the alternative stays as it was
            if raw is not None and not isinstance(raw, str):
                errors[name] = say("a single value")
                continue
            value = ("yes" if raw else "no") if kind == "flag" else (raw or "").strip()
            if kind in ("secret", "secret_url") and value == "":
                continue  # blank keeps what is set
            if has_line_break(value):
                # every separator str.splitlines knows (U+2028, \x1c, \x85...): configparser
                # and editors may split there, and the next save would find a second key
                errors[name] = say("a single line")
                continue
            if (section, key) in _CHOICES and value not in _CHOICES[(section, key)]:
                errors[name] = say("one of: %s", ", ".join(_CHOICES[(section, key)]))
                continue
            if (section, key) not in _VIRTUAL_FIELDS:
                try:
                    _SCHEMA_BY_KEY[(section, key)][3](value)
                except ValueError as exc:
                    errors[name] = say("expected %s", said_of(exc))
                    continue
            accepted[(section, key)] = value
        if step == "bitrix24" and not errors:
            if accepted.get(("bitrix24", "connection")) == "application":
                accepted[("bitrix24", "webhook_url")] = ""   # the application is used only without a webhook
                if not (accepted.get(("bitrix24", "portal_url")) and accepted.get(("bitrix24", "client_id"))):
                    errors["bitrix24.portal_url"] = say("the portal address with the application's client_id")
            elif not (accepted.get(("bitrix24", "webhook_url")) or self.current(draft)[0][("bitrix24", "webhook_url")]):
                errors["bitrix24.webhook_url"] = say("the webhook's address, https://<portal>/rest/<user>/<code>/")
        if step == "click_to_call" and not errors and accepted.get(("click_to_call", "mode")) == "port":
            token = accepted.get(("click_to_call", "application_token")) or \
                self.current(draft)[0][("click_to_call", "application_token")]
            if not token:
                errors["click_to_call.application_token"] = say("needed in port mode (from the webhook or application)")
        if step == "crm":
            lines, line_errors = self._lines(form, draft)
            errors.update(line_errors)
            if not errors:
                draft["__lines"] = lines
        if not errors:
            draft.update(accepted)
        return errors

    def _lines(self, form, draft):
        """The lead-source table of the CRM step: (lines, {field: error}). A line typed the
        way people write numbers (8 (495) 123-45-67) is kept as the PBX's number plan writes it."""
        lines, errors = collections.OrderedDict(), {}
        count = form.get("line_count") or "0"
        if not is_digits(count) or int(count) > self.MAX_LINES + 3:
            return lines, {"line_count": say("a whole number up to %d", self.MAX_LINES + 3)}
        try:
            plan = PbxRules.from_config(self.draft_config(draft)).number_plan
        except ConfigError:
            plan = None
        for i in range(int(count)):
            did, source = form.get("line_did_%d" % i) or "", form.get("line_source_%d" % i) or ""
            if not isinstance(did, str) or not isinstance(source, str):
                errors["line_%d" % i] = say("a single value")
                continue
            did, source = did.strip(), source.strip()
            if not did and not source:
                continue
            number = clean_phone_number(did)
            if number is not None and plan is not None:
                did = plan.normalize(number) or number
            try:
                _lines_entry(did, source)
            except ValueError as exc:
                errors["line_%d" % i] = say("expected %s", said_of(exc))
                continue
            if did in lines:
                errors["line_%d" % i] = say("this line is already in the table")
                continue
            lines[did] = source
        return lines, errors

    def changes(self, draft):
        """[((section, key), shown value)] of what the save step will write; secrets masked."""
        before, before_maps = raw_config_values(self.config_path)
        out = []
        for key in sorted(k for k in draft if isinstance(k, tuple) and k not in _VIRTUAL_FIELDS):
            if before.get(key) != draft[key]:
                kind = _FIELD_KINDS.get(key)
                shown = "***" if kind == "secret" else mask_webhook(draft[key]) if kind == "secret_url" else draft[key]
                out.append((key, shown))
        if "__lines" in draft and draft["__lines"] != before_maps["lines"]:
            out.append((("lines", ""), ", ".join("%s = %s" % kv for kv in draft["__lines"].items()) or "-"))
        return out

    def save(self, draft):
        updates = dict((k, v) for k, v in draft.items() if isinstance(k, tuple) and k not in _VIRTUAL_FIELDS)
        maps = {"lines": draft["__lines"]} if "__lines" in draft else None
        update_config_file(self.config_path, updates, maps)
        draft.clear()
        if self.on_saved is not None:
            self.on_saved()

    # -- checks ----------------------------------------------------------------------------------------
    def check(self, step, draft):
        """[CheckResult] for the step's Check button, against the draft's values."""
        try:
            config = self.draft_config(draft)
        except ConfigError as exc:
            return [CheckResult("CRITICAL", step, said_of(exc))]
        if step == "database":
            return [check_cel(config)]
        if step == "ami":
            login = self._check_ami(config)
            return [login] + (self._check_endpoints(config) if login.level == "OK" else [])
        if step == "recordings":
            return [check_recordings(config.get("recordings", "path"))]
        if step in ("bitrix24", "crm"):
            return self._check_portal(config)
        return []

    def _check_ami(self, config):
        ami = config.section("ami")
        if not ami["username"]:
            return CheckResult("CRITICAL", "ami", say("no AMI user set"), say("fill in the user, or create one"))
        conn = AmiConnection(ami["host"], ami["port"], ami["username"], ami["secret"], lambda m: None,
                             auth=ami["auth"], connect_timeout=min(self.timeout, ami["connect_timeout"]))
        try:
            conn.try_login()
        except AmiError as exc:
            return CheckResult("CRITICAL", "ami", said_of(exc), say("check manager.conf: the user, its secret, permit="))
        except (OSError, socket.error) as exc:
            return CheckResult("CRITICAL", "ami", say("cannot connect to %s:%s: %s", ami["host"], ami["port"],
                                                      exc.strerror or exc),
                               say("is Asterisk running, and AMI enabled in manager.conf ([general] enabled = yes)?"))
        return CheckResult("OK", "ami", say("logged in to %s:%s as %s (%s)", ami["host"], ami["port"],
                                            ami["username"], conn.banner or "Asterisk"))

    def _check_endpoints(self, config):
        """What bx24ast will take for trunks and phones, as Asterisk lists them."""
        learned, error = learn_endpoints(config)
        if learned is None:
            return [CheckResult("WARNING", "endpoints", error,
                                say("trunks and phones are told apart by the [pbx] rules"))]
        if not learned:
            return [CheckResult("WARNING", "endpoints", say("Asterisk lists no PJSIP/SIP/IAX2 endpoints to this user"),
                                say("give the AMI user read = system, reporting, or set [pbx] trunk_channels"))]
        out = []
        for kind, label in (("trunk", "trunks: %s"), ("phone", "phones: %s"), (None, "not classified: %s")):
            items = [say("%s (%s)", e.device, e.why) for e in learned if e.kind == kind]
            if items:
                out.append(CheckResult("OK" if kind else "WARNING", "endpoints", say(label, said_join("; ", items)),
                                       "" if kind else say("set [pbx] trunk_channels to name these trunks")))
        return out

    def _check_portal(self, config):
        """One line per thing asked of the portal: the rights, the employees' extensions, the
        telephony methods; one failing does not hide the others."""
        if not BitrixClient.configured(config):
            return [CheckResult("CRITICAL", "bitrix24", say("not configured"),
                                say("a webhook address, or the portal address with the application's client_id"))]
        client = BitrixClient.from_config(config, StateStore(":memory:"))
        client.timeout = self.timeout
        if client.uses_oauth:
            # The daemon's tokens, read-only: the wizard must not spend its refresh token.
            try:
                store = _existing_store(config)
                client.store.set_setting(BitrixClient.TOKENS_KEY, store.get_setting(BitrixClient.TOKENS_KEY))
                store.close()
            except StorageError:
                pass
            client.may_refresh = False
        out = []
        try:
            scopes = client.call("scope")
            missing = [s for s in ("telephony", "crm", "user", "task") if s not in (scopes or [])]
            if missing:
                out.append(CheckResult("CRITICAL", "bitrix24", say("the webhook/application lacks the scopes %s",
                                                                   ", ".join(missing)),
                                       say("edit it in Bitrix24: Developer resources")))
            else:
                out.append(CheckResult("OK", "bitrix24", say("reachable, scopes telephony crm user task granted")))
        except BitrixError as exc:
            out.append(CheckResult("CRITICAL", "bitrix24", say("scope: %s", said_of(exc)),
                                   say("check the address and the rights")))
            if isinstance(exc, (BitrixUnavailable, BitrixAuthFailed)):
                return out   # nothing else can answer either
        try:
            mapping = UserDirectory(client).refresh()
            out.append(CheckResult("OK" if mapping else "WARNING", "users", said_join(", ", (
                say("%s -> user %s", ext, uid) for ext, uid in sorted(mapping.items()))) if mapping else
                say("no user has an internal phone number (UF_PHONE_INNER)"),
                "" if mapping else say("fill 'Internal phone' in the employees' profiles")))
        except BitrixError as exc:
            out.append(CheckResult("CRITICAL", "users", say("user.get: %s", said_of(exc)),
                                   say("the webhook/application needs the user scope")))
        return out

    def exchange_code(self, draft, code):
        """A local application's authorization code -> tokens in the state store (for
        hosts whose install handler the portal cannot reach). (message, ok)."""
        try:
            config = self.draft_config(draft)
        except ConfigError as exc:
            return said_of(exc), False
        b24 = config.section("bitrix24")
        if not (b24["portal_url"] and b24["client_id"] and b24["client_secret"]):
            return say("an authorization code is for a local application: fill portal_url, client_id, "
                       "client_secret"), False
        try:
            store = StateStore.open_dir(config.get("storage", "state_dir"))
        except StorageError as exc:
            return said_of(exc), False
        try:
            client = BitrixClient.from_config(config, store)
            client.timeout = self.timeout
            tokens = client.exchange_code(code)
        except BitrixError as exc:
            return say("the code was refused: %s (codes are valid for 30 seconds)", said_of(exc)), False
        finally:
            store.close()
        return say("tokens saved for %s", tokens.get("domain") or b24["portal_url"]), True

    def lead_sources(self, draft):
        """[(STATUS_ID, NAME)] from crm.status.list, or [] when the portal is not reachable."""
        try:
            config = self.draft_config(draft)
            if not BitrixClient.configured(config):
                return []
            client = BitrixClient.from_config(config, StateStore(":memory:"))
            client.timeout = self.timeout
            client.may_refresh = False
            rows = client.call("crm.status.list", {"filter": {"ENTITY_ID": "SOURCE"}})
        except (BitrixError, ConfigError):
            return []
        return [(str(r.get("STATUS_ID")), str(r.get("NAME"))) for r in rows or [] if isinstance(r, dict)]

    def dialplan(self, draft):
        """The routing snippet for this configuration, or None when routing is off or
        the fallback is not chosen yet."""
        values, _ = self.current(draft)
        try:
            agi = _as_listen(values[("routing", "agi_listen")])
        except ValueError:
            return None
        fallback = values.get(("routing", "fallback")) or ""
        if agi is None or not fallback:
            return None
        return routing_dialplan(agi, fallback, values.get(("routing", "hint_context")) or "from-internal")

    # -- AMI user -----------------------------------------------------------------------------------------
    def create_ami_user(self, draft):
        """A 'bx24' user with a new secret and only the rights bx24ast needs, in
        manager_custom.conf on FreePBX (manager.conf is rewritten there), manager.conf
        otherwise; then 'manager reload'. Returns (message, ok)."""
        etc = os.path.join(self.root, "etc", "asterisk")
        freepbx = os.path.exists(os.path.join(self.root, "etc", "freepbx.conf")) or \
            os.path.exists(os.path.join(etc, "manager_custom.conf"))
        path = os.path.join(etc, "manager_custom.conf" if freepbx else "manager.conf")
        secret = base64.b32encode(os.urandom(15)).decode().lower()
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            return say("cannot read %s: %s", path, exc.strerror), False
        # Replace an earlier [bx24] section of ours, keep everything else.
        text = re.sub(r"(?ms)^\[bx24\][^\n]*\n.*?(?=^\[|\Z)", "", text).rstrip("\n")
        block = ("\n\n[bx24]\n; written by the bx24ast wizard\nsecret = %s\ndeny = 0.0.0.0/0.0.0.0\n"
                 "permit = 127.0.0.1/255.255.255.255\nread = %s\nwrite = %s\nwriteTimeout = 5000\n"
                 % (secret, AMI_USER_READ, AMI_USER_WRITE))
        try:
            replace_keeping_mode(path, text + block)
        except OSError as exc:
            return say("cannot write %s: %s", path, exc.strerror), False
        draft[("ami", "username")] = "bx24"
        draft[("ami", "secret")] = secret
        if ("ami", "host") not in draft:
            draft[("ami", "host")] = "127.0.0.1"
        try:
            proc = subprocess.Popen(self.asterisk_command + ["manager reload"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            output = proc.communicate(timeout=15)[0].decode("utf-8", "replace").strip()
            if proc.returncode != 0:
                return say("user bx24 written to %s, but 'manager reload' failed: %s", path, output), False
        except (OSError, subprocess.TimeoutExpired) as exc:
            return say("user bx24 written to %s, but 'asterisk -rx \"manager reload\"' could not run: %s",
                       path, exc), False
        return say("user bx24 written to %s and AMI reloaded", path), True


def routing_dialplan(agi, fallback, dial_context="from-internal"):
    """The dialplan that sends a caller to their responsible employee (README: Routing).
    agi: the (host, port) FastAGI listens on; fallback: context,exten,priority."""
    host, port = agi
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return ("[bx24-responsible]\n"
            "exten => s,1,AGI(agi://%s:%d/responsible,${CALLERID(num)},${FROM_DID})\n"
            " same => n,GotoIf($[\"${BX24_RESPONSIBLE_EXT}\" = \"\"]?normal)\n"
            " same => n,Dial(Local/${BX24_RESPONSIBLE_EXT}@%s,20)\n"
            " same => n(normal),Goto(%s)" % (host, port, dial_context, fallback))


def replace_keeping_mode(path, text, new_mode=0o640):
    """Write a file of someone else's (manager.conf) atomically with the mode and owner
    it had: it holds every AMI secret, and a rewrite must not make it world-readable.
    A new file gets new_mode and the group of its directory (asterisk's)."""
    try:
        st = os.stat(path)
        mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    except FileNotFoundError:
        st_dir = os.stat(os.path.dirname(os.path.abspath(path)))
        mode, uid, gid = new_mode, -1, st_dir.st_gid
    tmp = path + ".bx24ast.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # never readable on the way
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if os.geteuid() == 0 or uid == -1:
            try:
                os.chown(tmp, uid, gid)
            except OSError:
                pass   # not ours to give away: the mode still holds
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _config_text(values, maps):
    sections = collections.OrderedDict()
    for (section, key), value in values.items():
        sections.setdefault(section, []).append("%s = %s" % (key, value))
    for name, entries in maps.items():
        sections[name] = ["%s = %s" % kv for kv in entries.items()]
    return "".join("[%s]\n%s\n" % (name, "\n".join(lines)) for name, lines in sections.items())


def recording_settings_in_dialplan(asterisk_etc):
    """MIXMON_FORMAT / MIXMON_DIR as the dialplan sets them (FreePBX writes them in
    globals), {} when not set."""
    found = {}
    try:
        names = sorted(n for n in os.listdir(asterisk_etc) if n.startswith(("extensions", "globals")))
    except OSError:
        return found
    for name in names:
        try:
            with open(os.path.join(asterisk_etc, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for m in re.finditer(r"(?m)^\s*(MIXMON_FORMAT|MIXMON_DIR)\s*=>?\s*([^\s;]+)", text):
            found.setdefault(m.group(1), m.group(2))
    return found


def detect_recording_format(path, limit=2000):
    """(extension, count) most common among the recordings under path, or None."""
    counts = collections.Counter()
    seen = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            m = _RECORDING_EXT.search(name)
            if m:
                counts[m.group(1).lower()] += 1
            seen += 1
            if seen >= limit:
                break
        if seen >= limit:
            break
    if not counts:
        return None
    ext, n = counts.most_common(1)[0]
    return ext, sum(counts.values())


def check_recordings(path, now=None):
    if not os.path.isdir(path):
        return CheckResult("CRITICAL", "recordings", say("%s does not exist", path),
                           say("where does MixMonitor write? (FreePBX: /var/spool/asterisk/monitor)"))
    if not os.access(path, os.R_OK | os.X_OK):
        return CheckResult("CRITICAL", "recordings", say("%s is not readable by bx24ast", path),
                           say("check its permissions"))
    found = detect_recording_format(path)
    if not found:
        return CheckResult("WARNING", "recordings", say("%s has no recordings yet", path),
                           say("are calls recorded (MixMonitor)? check again after a call"))
    return CheckResult("OK", "recordings", say("%s: %d recordings, mostly .%s", path, found[1], found[0]))


class WizardLanguage(object):
    """The wizard's words in one language, and messages (Said) said in it. The values
    inside a message (paths, numbers, what Asterisk or the portal answered) are set
    apart (class v): they are the admin's data, not words to translate."""

    _PLACEHOLDER = LazyPattern(r"%(?:[-+ #0]*\d*(?:\.\d+)?[sdrfgx]|%)")

    def __init__(self, lang):
        self.lang = lang if lang in WIZARD_TEXT else "en"
        self.words = WIZARD_TEXT[self.lang]

    def __getitem__(self, key):
        return self.words[key] if key in self.words else WIZARD_TEXT["en"][key]

    def get(self, key, default=""):
        return self.words.get(key, WIZARD_TEXT["en"].get(key, default))

    def label(self, section, key):
        return self.get("f.%s.%s" % (section, key)) or key

    def choice(self, section, key, value):
        return self.get("c.%s.%s.%s" % (section, key, value)) or value

    def span(self, seconds):
        units = self.words.get("units")
        if units is None:
            return str(Span(seconds))
        words = []
        for n, i in Span(seconds).parts():
            forms = units[i]
            form = 0 if n % 10 == 1 and n % 100 != 11 else 1 if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14 else 2
            words.append("%d %s" % (n, forms[form]))
        return " ".join(words)

    def text(self, message):
        """A message as plain text in this language (for JSON and titles)."""
        return html.unescape(re.sub(r"<[^>]+>", "", self.html(message)))

    def html(self, message):
        if message is None or message == "":
            return ""
        if isinstance(message, Span):
            return _h(self.span(message))
        if not isinstance(message, Said):
            return _h(message)
        template = self.words.get("said", {}).get(message.template, message.template)
        args, out, pos = list(message.args), [], 0
        for m in self._PLACEHOLDER.finditer(template):
            out.append(_h(template[pos:m.start()]))
            pos = m.end()
            if m.group(0) == "%%":
                out.append("%")
                continue
            value = args.pop(0) if args else ""
            if isinstance(value, (Said, Span)):
                out.append(self.html(value))
            else:
                out.append("<span class=v>%s</span>" % _h(m.group(0) % (value,)))
        out.append(_h(template[pos:]))
        return "".join(out)


def browser_language(header, default="en"):
    """The first of our languages the browser asks for (Accept-Language, by q)."""
    best, best_q = None, -1.0
    for i, part in enumerate((header or "").split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        m = re.search(r"q=([0-9.]+)", params)
        if m:
            try:
                q = float(m.group(1))
            except ValueError:
                q = 0.0
        lang = tag.strip().lower()[:2]
        if lang in WIZARD_TEXT and q > best_q:
            best, best_q = lang, q
    return best or default


class StatusReport(object):
    """What the status page and GET /status show: the service as it runs (or its last
    heartbeat), today's calls and the outbox from the state database."""

    def __init__(self, config, live=None):
        self.config = config
        self.live = live

    def collect(self, now=None):
        now = time.time() if now is None else now
        state_dir = self.config.get("storage", "state_dir")
        daemon, beat, _dead = check_daemon(state_dir, now)
        if self.live is not None:
            beat = self.live()
        running = daemon.level == "OK" or self.live is not None
        out = collections.OrderedDict([("time", now), ("running", running), ("daemon", daemon.message)])
        beat = beat or {}
        out["pid"] = beat.get("pid")
        out["up_seconds"] = now - beat["started_at"] if beat.get("started_at") and running else None
        out["ami"] = beat.get("ami") or {}
        out["pbxs"] = beat.get("pbxs") or []
        out["bitrix24"] = beat.get("bitrix24") or {}
        out["calls_in_progress"] = beat.get("calls") or [] if running else []
        users = beat.get("users") or {}
        mapping = dict(users.get("map") or {})
        mapping.update(dict((k, Employee.user_id_of(v)) for k, v in self.config.maps.get("users", {}).items()))
        out["users"] = {"map": collections.OrderedDict(sorted(mapping.items())), "loaded_at": users.get("loaded_at")}
        out["warnings"] = beat.get("warnings") or []
        out["today"], out["outbox"] = self._from_the_state(now)
        return out

    def _from_the_state(self, now):
        midnight = time.mktime(time.localtime(now)[:3] + (0, 0, 0, 0, 0, -1))
        today = {"calls": 0, "reported": 0, "missed": 0, "waiting": 0}
        outbox = {"pending": 0, "parked": 0, "oldest_seconds": None}
        try:
            store = _existing_store(self.config)
        except StorageError:
            return today, outbox
        try:
            row = store.query(
                "SELECT COUNT(*) AS calls, SUM(finished_at IS NOT NULL) AS reported, "
                "SUM(direction = 'inbound' AND ended_at IS NOT NULL AND NOT COALESCE(answered, 0)) AS missed, "
                "SUM(finished_at IS NULL) AS waiting FROM calls WHERE source IS NOT NULL AND started_at >= ?",
                (midnight,))[0]
            today = dict((k, int(row[k] or 0)) for k in today)
            counts = Outbox(store).counts()
            oldest = store.query("SELECT MIN(created_at) AS t FROM outbox WHERE state = 'pending'")[0]["t"]
            outbox = {"pending": counts.get("pending", 0), "parked": counts.get("parked", 0),
                      "oldest_seconds": now - oldest if oldest else None}
        except sqlite3.Error as exc:
            log.warning("status: cannot read the state database: %s", exc)
        finally:
            store.close()
        return today, outbox


class WizardServer(Listener):
    """The wizard over HTTP(S): login, sessions, CSRF, brute-force delay, pages, and
    the status page (also GET /status as JSON for monitoring)."""

    thread_name = "wizard"
    SESSION_SECONDS = 8 * 3600
    IDLE_SECONDS = 30 * 60       # a session left alone that long has to log in again
    FAILS_PER_MINUTE = 5
    RELOAD_WAIT = 12.0           # how long Results waits for the service to read a saved file
    PREFIX = "/config/master"
    sessions = {}
    failures = {}
    _class_lock = []     # one lock for the class's sessions, made by the first server

    def __init__(self, wizard, user, password_hash, host="0.0.0.0", port=8078, cert="", key="", language="en",
                 check_config=None, live_status=None, status_token="", state_dir=None, metrics=None, metrics_token=""):
        if not password_hash:
            raise ConfigError("[wizard] password_hash is empty: set a login with bx24ast.py set-password "
                              "(the installer does)", section="wizard", key="password_hash", value="")
        self.wizard = wizard
        self.user = user
        self.password_hash = password_hash
        self.language = language
        self.check_config = check_config   # () -> Config for the results page
        self.live_status = live_status     # () -> the running daemon's status, when it serves the wizard
        self.status_token = status_token
        self.state_dir = state_dir
        self.metrics = metrics
        self.metrics_token = metrics_token
        self.secure = bool(cert)
        # Kept by the class: a save reloads the service, which makes a new server,
        # and the admin must stay logged in to see the results.
        self.sessions = WizardServer.sessions
        self.failures = WizardServer.failures
        if not WizardServer._class_lock:
            WizardServer._class_lock.append(threading.Lock())
        self._lock = WizardServer._class_lock[0]
        owner = self

        class Handler(listener_classes().TlsRequestHandler):
            tls = tls_context(cert, key, "wizard") if cert else None

            def do_GET(self):
                owner.serve(self, "GET")

            def do_POST(self):
                owner.serve(self, "POST")

        self.server = bounded(listener_classes().ThreadingHTTPServer((host, port), Handler), "wizard", 32, 12, 30.0)

    def describe(self):
        return "wizard: %s://%s:%d%s" % (("https" if self.secure else "http",) + self.address + (self.PREFIX,))

    # -- plumbing ----------------------------------------------------------------------------------
    def _cookies(self, req):
        out = {}
        for part in (req.headers.get("Cookie") or "").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep:
                out[name] = value
        return out

    def _cookie(self, name, value, max_age=None):
        attrs = ["%s=%s" % (name, value), "Path=%s" % self.PREFIX, "HttpOnly", "SameSite=Strict"]
        if self.secure:
            attrs.append("Secure")
        if max_age is not None:
            attrs.append("Max-Age=%d" % max_age)
        return "; ".join(attrs)

    def _send(self, req, status, body="", headers=(), content_type="text/html; charset=utf-8"):
        data = body.encode("utf-8")
        req.send_response(status)
        req.send_header("Content-Type", content_type)
        req.send_header("Content-Length", str(len(data)))
        req.send_header("Cache-Control", "no-store")
        req.send_header("X-Frame-Options", "DENY")
        req.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'")
        for name, value in headers:
            req.send_header(name, value)
        req.end_headers()
        req.wfile.write(data)

    def _redirect(self, req, where, headers=()):
        self._send(req, 303, "", [("Location", where)] + list(headers))

    def _form(self, req):
        try:
            length = int(req.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > 256 * 1024:
            return None
        body = req.rfile.read(length).decode("utf-8", "replace") if length > 0 else ""
        return dict(urllib.parse.parse_qsl(body, keep_blank_values=True))

    def _session(self, req):
        token = self._cookies(req).get("bx24ast_session")
        now = time.time()
        with self._lock:
            session = self.sessions.get(token) if token else None
            if session is not None and (session["expires"] < now or now - session["seen"] > self.IDLE_SECONDS):
                del self.sessions[token]
                session = None
            if session is not None:
                session["seen"] = now
        return session

    def _language(self, req, session=None):
        """The session's language; before login the one picked on the login page, else
        the browser's (Accept-Language), else the configured one."""
        if session is not None:
            return WizardLanguage(session["lang"])
        picked = self._cookies(req).get("bx24ast_lang")
        if picked in WIZARD_TEXT:
            return WizardLanguage(picked)
        return WizardLanguage(browser_language(req.headers.get("Accept-Language"), self.language))

    # -- requests --------------------------------------------------------------------------------------
    def serve(self, req, verb):
        try:
            self.handle(req, verb)
        except listener_classes().CLIENT_GONE as exc:
            log.debug("wizard: %s went away during %s %s: %s", req.client_address[0], verb, req.path[:80], exc)
        except Exception:
            log.exception("wizard: %s %s failed", verb, req.path[:80])
            try:
                self._error(req, 500, self._language(req), "failed")
            except listener_classes().CLIENT_GONE:
                pass

    def _error(self, req, status, t, what):
        """A styled page in the admin's language for 403, 404, 413, 429 and 500."""
        body = "<p class=lead>%s</p><p><a class=button href='%s/language'>%s</a></p>" % (
            _h(t["error_" + what]), self.PREFIX, _h(t["back"]))
        return self._send(req, status, self._page(t, "%d" % status, body, None, None))

    def handle(self, req, verb):
        url = urllib.parse.urlsplit(req.path)
        path = url.path.rstrip("/")
        query = dict(urllib.parse.parse_qsl(url.query))
        peer = req.client_address[0]
        if path == "/status" and verb == "GET":
            return self._status_json(req, peer)
        if path == "/metrics" and verb == "GET":
            return self._metrics(req, peer)
        if not path.startswith(self.PREFIX):
            return self._redirect(req, self.PREFIX)
        if path == self.PREFIX + "/login":
            return self._login(req, verb, peer, query)
        session = self._session(req)
        if session is None:
            return self._redirect(req, self.PREFIX + "/login")
        if query.get("lang") in WIZARD_TEXT and verb == "GET":
            session["lang"] = query["lang"]
            return self._redirect(req, path, [("Set-Cookie", self._cookie("bx24ast_lang", session["lang"],
                                                                          365 * 86400))])
        t = WizardLanguage(session["lang"])
        form = {}
        if verb == "POST":
            form = self._form(req)
            if form is None:
                return self._error(req, 413, t, "too_large")
            if not hmac.compare_digest((form.get("csrf") or "").encode(), session["csrf"].encode()):
                REFUSALS.log(logging.WARNING, "wizard: forms refused",
                             "wizard: a form from %s without the right CSRF token was refused", peer)
                return self._error(req, 403, t, "csrf")
        if path == self.PREFIX + "/logout" and verb == "POST":
            with self._lock:
                self.sessions.pop(self._cookies(req).get("bx24ast_session"), None)
            return self._redirect(req, self.PREFIX + "/login",
                                  [("Set-Cookie", self._cookie("bx24ast_session", "", 0))])
        if path == self.PREFIX:
            return self._redirect(req, self.PREFIX + "/language")
        if path == self.PREFIX + "/results":
            return self._results(req, session, query.get("saved"))
        if path == self.PREFIX + "/status":
            return self._status_page(req, session)
        if path == self.PREFIX + "/status.json":
            return self._send(req, 200, json.dumps(self._status(t), ensure_ascii=False, indent=1),
                              content_type="application/json; charset=utf-8")
        step = path[len(self.PREFIX) + 1:]
        if step not in WIZARD_STEPS:
            return self._error(req, 404, t, "not_found")
        return self._step(req, verb, session, step, form)

    def _login(self, req, verb, peer, query):
        if query.get("lang") in WIZARD_TEXT:
            return self._redirect(req, self.PREFIX + "/login",
                                  [("Set-Cookie", self._cookie("bx24ast_lang", query["lang"], 365 * 86400))])
        t = self._language(req)
        login_csrf = self._cookies(req).get("bx24ast_login")
        error = ""
        if verb == "POST":
            form = self._form(req) or {}
            now = time.time()
            if not login_csrf or not hmac.compare_digest((form.get("csrf") or "").encode(), login_csrf.encode()):
                return self._error(req, 403, t, "stale_login")
            wait = self._count_attempt(peer, now)
            if wait:
                return self._login_page(req, 429, t, "<p class=error>%s</p>" % _h(t["wait"] % wait),
                                        [("Retry-After", str(wait))])
            user_ok = hmac.compare_digest((form.get("user") or "").encode(), self.user.encode())
            password_ok = verify_password(form.get("password") or "", self.password_hash)
            if user_ok and password_ok:
                self._forgive(peer, now)
                token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
                with self._lock:
                    self.sessions[token] = {"csrf": base64.urlsafe_b64encode(os.urandom(18)).decode().rstrip("="),
                                            "expires": now + self.SESSION_SECONDS, "seen": now, "draft": {},
                                            "lang": t.lang, "visited": set()}
                log.info("wizard: %s logged in from %s", self.user, peer)
                return self._redirect(req, self.PREFIX + "/language",
                                      [("Set-Cookie", self._cookie("bx24ast_session", token))])
            REFUSALS.log(logging.WARNING, "wizard: failed logins", "wizard: failed login as %r from %s",
                         (form.get("user") or "")[:40], peer)
            error = "<p class=error>%s</p>" % _h(t["bad_login"])
        return self._login_page(req, 200, t, error)

    def _login_page(self, req, status, t, error, headers=()):
        # the form's token travels in a cookie of its own: a login needs both
        csrf = base64.urlsafe_b64encode(os.urandom(18)).decode().rstrip("=")
        body = ("<p class=lead>%s</p>%s<form method=post action='%s/login' class=login>"
                "<input type=hidden name=csrf value='%s'>"
                "<div class=field><label for=f-user>%s</label><input id=f-user name=user autocomplete=username "
                "required autofocus></div>"
                "<div class=field><label for=f-password>%s</label><input id=f-password type=password name=password "
                "autocomplete=current-password required></div>"
                "<div class=actions><button class=primary>%s</button></div></form>"
                % (_h(t["login_help"]), error, self.PREFIX, csrf, _h(t["user"]), _h(t["password"]), _h(t["login"])))
        return self._send(req, status, self._page(t, t["login"], body, None, None),
                          [("Set-Cookie", self._cookie("bx24ast_login", csrf))] + list(headers))

    def _count_attempt(self, peer, now):
        """Count a login attempt before its password is looked at, in one step with the
        look at the count, so that parallel guesses cannot slip in under the limit.
        Seconds to wait, or 0 when this attempt may go on."""
        with self._lock:
            if len(self.failures) > 1000:   # many addresses: forget the ones past their minute
                for address in [a for a, times in self.failures.items() if now - times[-1] >= 60]:
                    del self.failures[address]
            recent = [t for t in self.failures.get(peer, []) if now - t < 60]
            allowed = len(recent) < self.FAILS_PER_MINUTE
            if allowed:
                recent.append(now)
            self.failures[peer] = recent
        if allowed:
            return 0
        wait = int(60 - (now - recent[0])) + 1
        REFUSALS.log(logging.WARNING, "wizard: logins refused", "wizard: too many failed logins from %s; "
                     "refused for %d s", peer, wait)
        return wait

    def _forgive(self, peer, now):
        with self._lock:
            if now in self.failures.get(peer, []):
                self.failures[peer].remove(now)

    # -- the steps -------------------------------------------------------------------------------------
    def _step(self, req, verb, session, step, form):
        draft = session["draft"]
        t = WizardLanguage(session["lang"])
        messages, errors, checks, posted = [], {}, [], None
        if verb == "POST":
            action = form.get("action") or "next"
            if step == "save":
                if action == "save":
                    try:
                        self.wizard.save(draft)
                    except ConfigError as exc:
                        messages.append(("error", said_of(exc)))
                    else:
                        log.info("wizard: configuration written by %s", self.user)
                        return self._redirect(req, "%s/results?saved=%d" % (self.PREFIX, int(time.time())))
            elif action == "create_ami_user":
                message, ok = self.wizard.create_ami_user(draft)
                messages.append(("ok" if ok else "error", message))
            elif action == "check":
                trial = dict(draft)
                errors = self.wizard.submit(step, form, trial)
                posted = form
                if errors:
                    messages.append(("error", t["fix"]))
                else:
                    checks = self.wizard.check(step, trial)
                    if all(c.level != "CRITICAL" for c in checks):
                        draft.clear()
                        draft.update(trial)
                        messages.append(("ok", t["checked_kept"]))
                        posted = None
                    else:
                        messages.append(("error", t["check_not_kept"]))
            else:
                errors = self.wizard.submit(step, form, draft)
                code = (form.get("oauth_code") or "").strip() if step == "bitrix24" else ""
                if errors:
                    posted = form
                    messages.append(("error", t["fix"]))
                elif code:
                    message, ok = self.wizard.exchange_code(draft, code)
                    messages.append(("ok" if ok else "error", message))
                    if not ok:
                        errors = {"oauth_code": message}
                else:
                    session["visited"].add(step)
                    if step == "language":
                        session["lang"] = draft.get(("wizard", "language"), session["lang"])
                    following = WIZARD_STEPS[WIZARD_STEPS.index(step) + 1]
                    return self._redirect(req, "%s/%s" % (self.PREFIX, following),
                                          [("Set-Cookie", self._cookie("bx24ast_lang", session["lang"],
                                                                       365 * 86400))])
        body = self._step_body(t, session, step, posted, errors, checks, messages)
        return self._send(req, 400 if errors else 200, self._page(t, t["step_" + step], body, session, step))

    def _step_body(self, t, session, step, posted, errors, checks, messages):
        draft = session["draft"]
        values, maps = self.wizard.current(draft)
        if ("wizard", "language") not in draft:
            values[("wizard", "language")] = session["lang"]   # as picked at the login
        if posted is not None:
            for field in WIZARD_FIELDS.get(step, []):
                name = "%s.%s" % field[:2]
                if field.kind == "flag":
                    values[field[:2]] = "yes" if posted.get(name) else "no"
                elif field.kind not in ("secret", "secret_url") and isinstance(posted.get(name), str):
                    values[field[:2]] = posted[name]
        parts = ["<p class=lead>%s</p>" % _h(t["help_" + step])]
        parts.extend("<p class='message %s'>%s</p>" % (kind, t.html(message)) for kind, message in messages)
        if step == "save":
            return "".join(parts) + self._save_body(t, session)
        typed = dict(draft)
        if posted is not None:   # what the admin typed, also where nothing was kept
            typed.update((k, v) for k, v in values.items() if k in _FIELD_KINDS and k not in _VIRTUAL_FIELDS)
        found, suggested = self.wizard.suggestions(step, typed)
        if step in ("database", "recordings"):
            parts.append("<section class=found><h2>%s</h2>%s</section>" % (_h(t["found"]), "<ul>%s</ul>" % "".join(
                "<li>%s</li>" % t.html(f) for f in found) if found else "<p>%s</p>" % _h(t["none_found"])))
        parts.append("<form method=post><input type=hidden name=csrf value='%s'>" % session["csrf"])
        if step == "ami":
            parts.append("<div class=aside><p>%s</p><button class=secondary name=action value=create_ami_user>%s"
                         "</button></div>" % (_h(t["ami_rights"] % (AMI_USER_READ, AMI_USER_WRITE)), _h(t["create_ami"])))
        extra = ""
        if step == "bitrix24":
            extra = "<div class='field alt bitrix24-connection-application'><label for=f-oauth_code>%s</label>" \
                    "<input id=f-oauth_code name=oauth_code value='' autocomplete=off class=wide>%s" \
                    "<p class=help>%s</p></div>" % (
                        _h(t["oauth_code"]), "<p class=error>%s</p>" % t.html(errors["oauth_code"])
                        if errors.get("oauth_code") else "", _h(t["help_oauth_code"]))
        if step == "click_to_call":
            extra = "<div class='alt click_to_call-mode-port'>%s</div>" % self._handler_url(t, values)
        parts.append(self._fields(t, step, values, draft, suggested, posted, errors, extra))
        if step == "crm":
            parts.append(self._lines_table(t, session, maps["lines"], posted, errors))
            snippet = self.wizard.dialplan(typed)
            note = t["dialplan_help"] if snippet else t["dialplan_off"] if not values.get(("routing", "agi_listen")) \
                else t["dialplan_needs"]
            parts.append("<section class=snippet><h2>%s</h2><p class=help>%s</p>%s</section>" % (
                _h(t["dialplan"]), _h(note), "<pre>%s</pre>" % _h(snippet) if snippet else ""))
        if checks:
            parts.append(_checks_table(t, checks, t["check_result"]))
        buttons = ["<button class=primary name=action value=next>%s</button>" % _h(t["next"])]
        if step in ("database", "ami", "recordings", "bitrix24", "crm"):
            buttons.append("<button class=secondary name=action value=check>%s</button>" % _h(t["check"]))
        parts.append("<div class=actions>%s</div></form>" % "".join(buttons))
        return "".join(parts)

    def _fields(self, t, step, values, draft, suggested, posted, errors, extra=""):
        """The step's fields; those of an alternative sit in a block that CSS shows only
        while its radio button is checked (no script needed). extra: more of the group."""
        out, group = [], None
        for field in WIZARD_FIELDS.get(step, []):
            section, key, kind = field.section, field.key, field.kind
            value = values.get((section, key), "")
            if posted is None and (section, key) not in draft and key in suggested and \
                    value == _SCHEMA_BY_KEY.get((section, key), (0, 0, None))[2]:
                value = suggested[key]
            error = errors.get("%s.%s" % (section, key))
            in_group = group is not None and field.when is not None and field.when[0] == "%s.%s" % group[:2]
            if group is not None and (kind == "alternative" or not in_group):
                out.append("%s</fieldset>" % extra)
                group = extra = None
            if kind == "alternative":
                out.append("<fieldset class=choice>")
                group = field
                out.append(self._radios(t, section, key, value, error))
                continue
            classes = "field" + (" has-error" if error else "")
            if in_group:
                classes += " alt " + " ".join("%s-%s" % (field.when[0].replace(".", "-"), v) for v in field.when[1])
            out.append("<div class='%s'>%s</div>" % (classes, self._control(t, section, key, kind, value, error)))
        if group is not None:
            out.append("%s</fieldset>" % (extra or ""))
        return "".join(out)

    def _radios(self, t, section, key, value, error):
        name = "%s.%s" % (section, key)
        items = []
        for choice in _CHOICES[(section, key)]:
            ident = "%s-%s-%s" % (section, key, choice)
            items.append("<input type=radio name='%s' value='%s' id='%s'%s><label for='%s' class=option>%s</label>"
                         % (_h(name), _h(choice), _h(ident), " checked" if choice == value else "", _h(ident),
                            _h(t.choice(section, key, choice))))
        help_text = t.get("h.%s.%s" % (section, key))
        return "<legend>%s</legend>%s%s%s" % (
            _h(t.label(section, key)), "".join(items), "<p class=error>%s</p>" % t.html(error) if error else "",
            "<p class=help>%s</p>" % _h(help_text) if help_text else "")

    def _control(self, t, section, key, kind, value, error):
        name = "%s.%s" % (section, key)
        ident = "f-%s-%s" % (section, key)
        if kind == "choice":
            control = "<select id='%s' name='%s'>%s</select>" % (_h(ident), _h(name), "".join(
                "<option value='%s'%s>%s</option>" % (_h(c), " selected" if c == value else "",
                                                      _h(t.choice(section, key, c)))
                for c in _CHOICES[(section, key)]))
        elif kind == "flag":
            control = "<input type=checkbox id='%s' name='%s' value=yes%s>" % (
                _h(ident), _h(name), " checked" if str(value).lower() in _TRUE else "")
        elif kind == "secret":
            # A secret already set is never sent back to the browser.
            control = "<input type=password id='%s' name='%s' value='' placeholder='%s' autocomplete=new-password " \
                      "class=wide>" % (_h(ident), _h(name), _h(t["kept"]) if value else "")
        elif kind == "secret_url":
            # The webhook's code is its password: shown masked, blank keeps it.
            control = "<input id='%s' name='%s' value='' placeholder='%s' autocomplete=off class=wide>" % (
                _h(ident), _h(name), _h("%s (%s)" % (mask_webhook(value), t["kept"])) if value else "")
        else:
            width = {"wide": " class=wide", "number": " class=narrow inputmode=numeric"}.get(kind, "")
            control = "<input id='%s' name='%s' value='%s'%s>" % (_h(ident), _h(name), _h(value), width)
        label = "<label for='%s'>%s</label>" % (_h(ident), _h(t.label(section, key)))
        if kind == "flag":
            label, control = "<label class=check for='%s'>%s %s</label>" % (
                _h(ident), control, _h(t.label(section, key))), ""
        help_text = t.get("h.%s.%s" % (section, key))
        return "%s%s%s%s<p class=key><code>[%s] %s</code></p>" % (
            label, control, "<p class=error>%s</p>" % t.html(error) if error else "",
            "<p class=help>%s</p>" % _h(help_text) if help_text else "", _h(section), _h(key))

    def _lines_table(self, t, session, lines, posted, errors):
        sources = self.wizard.lead_sources(session["draft"])
        count = posted.get("line_count") if posted is not None else None
        count = min(int(count), SetupWizard.MAX_LINES) if is_digits(count) else 0
        rows = list(lines.items()) if posted is None else [
            (posted.get("line_did_%d" % i, ""), posted.get("line_source_%d" % i, "")) for i in range(count)]
        while rows and rows[-1] == ("", ""):
            rows.pop()   # the blank rows of the last render: three are added again
        rows += [("", "")] * 3
        out = ["<section class=lines><h2>%s</h2><p class=help>%s</p>%s<input type=hidden name=line_count value=%d>"
               "<table><tr><th>%s</th><th>%s</th></tr>" % (
                   _h(t["lines"]), _h(t["lines_help"]), "<p class=error>%s</p>" % t.html(errors["line_count"])
                   if errors.get("line_count") else "", len(rows), _h(t["did"]), _h(t["source"]))]
        for i, (did, source) in enumerate(rows):
            if sources:
                options = [("", "")] + sources
                if source and source not in [s for s, _ in sources]:
                    options.append((source, source))
                control = "<select name=line_source_%d>%s</select>" % (i, "".join(
                    "<option value='%s'%s>%s</option>" % (_h(s), " selected" if s == source else "", _h(n or s))
                    for s, n in options))
            else:
                control = "<input name=line_source_%d value='%s'>" % (i, _h(source))
            err = errors.get("line_%d" % i)
            out.append("<tr%s><td><input name=line_did_%d value='%s'></td><td>%s%s</td></tr>" % (
                " class=has-error" if err else "", i, _h(did), control,
                "<p class=error>%s</p>" % t.html(err) if err else ""))
        out.append("</table></section>")
        return "".join(out)

    def _handler_url(self, t, values):
        try:
            port = (_as_listen(values.get(("click_to_call", "listen")) or "") or ("", 8077))[1]
        except ValueError:
            port = 8077
        tls = bool(values.get(("click_to_call", "tls_cert")))
        url = values.get(("click_to_call", "public_url")) or "%s://<%s>:%d/bitrix24" % (
            "https" if tls else "http", "this host" if t.lang == "en" else "адрес АТС", port)
        return "<section class=snippet><h2>%s</h2><pre>%s</pre><p class=help>%s</p>%s</section>" % (
            _h(t["handler_url"]), _h(url), _h(t["handler_help"]),
            "" if tls else "<p class=help>%s</p>" % _h(t["handler_plain"]))

    def _save_body(self, t, session):
        changes = self.wizard.changes(session["draft"])
        parts = ["<h2>%s</h2>" % _h(t["changes"])]
        if changes:
            parts.append("<table class=changes>%s</table>" % "".join(
                "<tr><td>%s <code>[%s]%s</code></td><td><span class=v>%s</span></td></tr>" % (
                    _h(t.label(*key) if key[1] else t["lines"]), _h(key[0]), " " + _h(key[1]) if key[1] else "",
                    _h(shown)) for key, shown in changes))
        else:
            parts.append("<p>%s</p>" % _h(t["no_changes"]))
        parts.append("<form method=post><input type=hidden name=csrf value='%s'><div class=actions>"
                     "<button class=primary name=action value=save>%s</button></div></form>"
                     % (session["csrf"], _h(t["save"])))
        return "".join(parts)

    # -- results and status -------------------------------------------------------------------------
    def _reloaded(self, saved_at):
        """Wait (a little) for the service to have read the file saved at saved_at: the
        results are those of the new configuration, not of the one it replaced."""
        if self.state_dir is None:
            return True
        heartbeat = Heartbeat(self.state_dir)
        deadline = monotonic() + self.RELOAD_WAIT
        while True:
            beat = heartbeat.read() or {}
            started = beat.get("started_at") or 0
            if started >= saved_at - 1 and (beat.get("ami") or {}).get("connected") or \
                    started >= saved_at - 1 and time.time() - started > 5:
                return True
            if monotonic() >= deadline:
                return False
            time.sleep(0.3)

    def _results(self, req, session, saved):
        t = WizardLanguage(session["lang"])
        refresh, note = None, ""
        if is_digits(saved):
            if self._reloaded(int(saved)):
                note = "<p class='message ok'>%s</p>" % _h(t["saved"])
            else:
                note, refresh = "<p class='message warn'>%s</p>" % _h(t["not_reloaded"]), 3
        try:
            config = self.check_config() if self.check_config else Config.load(self.wizard.config_path)
            results = run_checks(config)
        except ConfigError as exc:
            results = [CheckResult("UNKNOWN", "configuration", said_of(exc))]
        worst, _summary = summarize(results)
        body = "%s<p class='summary %s'>%s</p>%s" % (note, worst, _h(t["summary_" + worst]), _checks_table(t, results))
        return self._send(req, 200, self._page(t, t["results"], body, session, "results", refresh=refresh))

    def _status(self, t):
        try:
            config = self.check_config() if self.check_config else Config.load(self.wizard.config_path)
        except ConfigError as exc:
            return {"error": t.text(said_of(exc))}
        return StatusReport(config, self.live_status).collect()

    def _status_json(self, req, peer):
        """GET /status for monitoring: with [wizard] status_token (Authorization: Bearer)
        or the wizard's login (Basic, counted like a login)."""
        auth = req.headers.get("Authorization") or ""
        scheme, _, credentials = auth.partition(" ")
        allowed = False
        if scheme.lower() == "bearer" and self.status_token:
            allowed = hmac.compare_digest(credentials.strip().encode(), self.status_token.encode())
        elif scheme.lower() == "basic":
            now = time.time()
            wait = self._count_attempt(peer, now)
            if wait:
                return _json_reply(req, 429, {"error": "too many failed logins: wait %d s" % wait})
            try:
                user, _, password = base64.b64decode(credentials.strip()).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            allowed = hmac.compare_digest(user.encode(), self.user.encode()) and \
                verify_password(password, self.password_hash)
            if allowed:
                self._forgive(peer, now)
        if not allowed:
            REFUSALS.log(logging.WARNING, "status: refused", "status: refused a request from %s", peer)
            req.send_response(401)
            req.send_header("WWW-Authenticate", 'Basic realm="bx24ast", charset="UTF-8"')
            req.send_header("Content-Type", "application/json; charset=utf-8")
            body = b'{"error": "log in with the wizard login, or Authorization: Bearer <[wizard] status_token>"}'
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
            return None
        return _json_reply(req, 200, self._status(WizardLanguage("en")))

    def _metrics(self, req, peer):
        """GET /metrics with Authorization: Bearer <[metrics] token>; not served here
        without a token (a public port must not tell call counts to anyone)."""
        if not self.metrics_token or self.metrics is None:
            return _json_reply(req, 404, {"error": "/metrics is not served here: set [metrics] token, "
                                                   "or [metrics] listen for a local port"})
        scheme, _, credentials = (req.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(),
                                                                  self.metrics_token.encode()):
            REFUSALS.log(logging.WARNING, "metrics: refused", "metrics: refused a request from %s", peer)
            return _json_reply(req, 401, {"error": "Authorization: Bearer <[metrics] token> is needed"})
        return metrics_reply(req, self.metrics)

    def _status_page(self, req, session):
        t = WizardLanguage(session["lang"])
        st = self._status(t)
        if "error" in st:
            return self._send(req, 200, self._page(t, t["status"], "<p class=error>%s</p>" % _h(st["error"]),
                                                   session, "status"))
        now = st["time"]
        ami, b24 = st["ami"], st["bitrix24"]
        outage = b24.get("outage") or {}

        def line(label, value):
            return "<tr><th>%s</th><td>%s</td></tr>" % (_h(label), value)

        rows = [line(t["st_daemon"], t.html(st["daemon"]))]
        if st["running"]:
            # one row per PBX: [ami], then each [ami:NAME] by its name
            for pbx in [dict(ami, name="")] + st["pbxs"][1:]:
                rows.append(line(t["st_ami"] + (" %s" % pbx["name"] if pbx["name"] else ""),
                                 "%s <span class=v>%s:%s</span>%s" % (
                                     _h(t["st_connected"] if pbx.get("connected") else t["st_disconnected"]),
                                     _h(pbx.get("host")), _h(pbx.get("port")),
                                     "" if pbx.get("connected") or not pbx.get("last_error") else
                                     " &mdash; %s" % t.html(pbx.get("last_error")))))
            portal = _h(t["st_answers"]) if not outage.get("failing_since") else _h(
                t["st_failing"] % t.span(now - outage["failing_since"]))
            if b24.get("alert"):
                portal += " &mdash; <span class=v>%s</span>" % _h(b24["alert"])
            rows.append(line(t["st_portal"], portal))
        today = st["today"]
        rows.append(line(t["st_today"], "%d: %s %d, %s %d, %s %d" % (
            today["calls"], _h(t["st_reported"]), today["reported"], _h(t["st_missed"]), today["missed"],
            _h(t["st_waiting"]), today["waiting"])))
        ob = st["outbox"]
        rows.append(line(t["st_outbox"], "%s %d, %s %d%s" % (
            _h(t["st_backlog"]), ob["pending"], _h(t["st_parked"]), ob["parked"],
            ", %s %s" % (_h(t["st_oldest"]), _h(t.span(ob["oldest_seconds"]))) if ob["oldest_seconds"] else "")))
        parts = ["<p class=lead>%s</p>" % _h(t["st_help"])]
        if not st["running"]:
            parts.append("<p class='message warn'>%s</p>" % _h(t["st_down"]))
        parts.append("<table class=status>%s</table>" % "".join(rows))
        calls = st["calls_in_progress"]
        parts.append("<h2>%s: %d</h2>" % (_h(t["st_calls_now"]), len(calls)))
        if calls:
            parts.append("<table><tr><th>%s</th><th>%s</th><th>%s</th><th>%s</th></tr>%s</table>" % (
                _h(t["st_direction"]), _h(t["st_number"]), _h(t["st_ext"]), _h(t["st_since"]), "".join(
                    "<tr><td>%s</td><td class=v>%s</td><td class=v>%s</td><td>%s</td></tr>" % (
                        _h(t.get("dir_%s" % c.get("direction"), c.get("direction"))), _h(c.get("number") or ""),
                        _h(c.get("extension") or "") + (" (%s)" % _h(c["pbx"]) if c.get("pbx") else ""),
                        _h(t.span(now - (c.get("since") or now)))) for c in calls)))
        users = st["users"]
        age = _h(t["st_users_age"] % t.span(now - users["loaded_at"])) if users.get("loaded_at") else \
            _h(t["st_users_never"])
        parts.append("<h2>%s</h2><p class=help>%s</p>" % (_h(t["st_users"]), age))
        if users["map"]:
            parts.append("<table><tr><th>%s</th><th>%s</th></tr>%s</table>" % (
                _h(t["st_ext"]), _h(t["st_user"]), "".join("<tr><td class=v>%s</td><td class=v>%s</td></tr>" % (
                    _h(ext), _h(uid)) for ext, uid in users["map"].items())))
        warnings = st["warnings"][-20:]
        parts.append("<h2>%s</h2>" % _h(t["st_warnings"]))
        parts.append("<table>%s</table>" % "".join(
            "<tr><td class=v>%s</td><td class=v>%s</td></tr>" % (
                _h(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w.get("time") or 0))), _h(w.get("message")))
            for w in reversed(warnings)) if warnings else "<p>%s</p>" % _h(t["st_none"]))
        return self._send(req, 200, self._page(t, t["status"], "".join(parts), session, "status", refresh=15))

    # -- the frame --------------------------------------------------------------------------------------
    def _page(self, t, title, body, session, current, refresh=None):
        langs = " ".join("<a href='?lang=%s'%s lang=%s>%s</a>" % (code, " class=here" if code == t.lang else "",
                                                                  code, _h(WIZARD_TEXT[code]["language_name"]))
                         for code in WIZARD_TEXT)
        logout, aside = "", ""
        if session is not None:
            logout = "<form method=post action='%s/logout' class=logout><input type=hidden name=csrf value='%s'>" \
                     "<button class=link>%s</button></form>" % (self.PREFIX, session["csrf"], _h(t["logout"]))
            items = []
            for n, step in enumerate(WIZARD_STEPS, 1):
                done = step in session["visited"] or self.wizard.configured(step, session["draft"])
                items.append("<li class='%s%s'><a href='%s/%s'><span class=num>%d</span> %s <span class=state>%s"
                             "</span></a></li>" % ("done" if done else "todo", " here" if step == current else "",
                                                   self.PREFIX, step, n, _h(t["step_" + step]),
                                                   _h(t["done"] if done else t["todo"])))
            aside = "<aside><h2>%s</h2><ol class=steps>%s</ol><ul class=more><li%s><a href='%s/results'>%s</a></li>" \
                    "<li%s><a href='%s/status'>%s</a></li></ul></aside>" % (
                        _h(t["steps"]), "".join(items), " class=here" if current == "results" else "", self.PREFIX,
                        _h(t["results"]), " class=here" if current == "status" else "", self.PREFIX, _h(t["status"]))
        headers = "<meta http-equiv=refresh content=%d>" % refresh if refresh else ""
        page = ("<!doctype html><html lang=%s><head><meta charset=utf-8>"
                "<meta name=viewport content='width=device-width, initial-scale=1'>%s<title>%s - %s</title>"
                "<style>%s</style></head><body><header class=top><span class=brand>bx24ast</span>"
                "<span class=product>%s</span><nav class=langs>%s</nav>%s</header>"
                "<div class='layout%s'>%s<main><h1>%s</h1>%s</main></div></body></html>"
                % (t.lang, headers, _h(title), _h(t["title"]), _WIZARD_CSS, _h(t["title"]), langs, logout,
                   "" if aside else " narrow", aside, _h(title), body))
        return page


def _h(value):
    return html.escape(str(value), quote=True)


def _checks_table(t, results, heading=None):
    """Check results as the admin reads them: a badge, the message, what to do."""
    items = "".join(
        "<li class=%s><span class='badge %s'>%s</span> <span class=name>%s</span> %s%s</li>" % (
            r.level, r.level, _h(t["level_" + r.level]), _h(t.words.get("check_" + r.name, r.name)), t.html(r.message),
            "<p class=advice>%s: %s</p>" % (_h(t["what_to_do"]), t.html(r.advice)) if r.advice else "")
        for r in results)
    return "<section class=checks>%s<ul>%s</ul></section>" % ("<h2>%s</h2>" % _h(heading) if heading else "", items)


_WIZARD_BASE_CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:#1f2933;background:#f3f5f8}
header.top{display:flex;align-items:center;gap:1em;padding:.7em 1.5em;background:#1f2d3d;color:#fff}
header .brand{font-weight:700;font-size:1.1em;letter-spacing:.02em}
header .product{color:#b8c4d0}
header nav.langs{margin-left:auto}
header nav.langs a{color:#b8c4d0;margin-left:.8em;text-decoration:none}
header nav.langs a.here{color:#fff;font-weight:600}
header form.logout{margin:0}
button.link{background:none;border:0;color:#b8c4d0;cursor:pointer;font:inherit;padding:0}
.layout{display:flex;gap:2em;max-width:72em;margin:2em auto;padding:0 1.5em}
.layout.narrow{max-width:34em}
aside{flex:0 0 17em}
aside h2{font-size:.8em;text-transform:uppercase;color:#6b7785;letter-spacing:.06em;margin:0 0 .6em}
ol.steps,ul.more{list-style:none;margin:0;padding:0}
ol.steps li a,ul.more li a{display:flex;align-items:center;gap:.6em;padding:.45em .6em;border-radius:6px;
color:#1f2933;text-decoration:none}
ol.steps li a:hover,ul.more li a:hover{background:#e4e9ef}
ol.steps li.here a,ul.more li.here a{background:#fff;box-shadow:0 1px 3px rgba(0,0,0,.08);font-weight:600}
.num{display:inline-flex;width:1.6em;height:1.6em;border-radius:50%;align-items:center;justify-content:center;
background:#d7dee6;font-size:.85em}
li.done .num{background:#2e9d5b;color:#fff}
.state{margin-left:auto;font-size:.75em;color:#6b7785;white-space:nowrap}
li.done .state{color:#2e9d5b}
ul.more{margin-top:1em;border-top:1px solid #dde3ea;padding-top:.6em}
main{flex:1;min-width:0;background:#fff;border-radius:10px;box-shadow:0 1px 4px rgba(0,0,0,.08);padding:1.6em 2em}
h1{margin:0 0 .4em;font-size:1.5em}
h2{font-size:1.1em;margin:1.4em 0 .5em}
p.lead{color:#52606d;margin-top:0}
.field{margin:1em 0}
.field label{display:block;font-weight:600;margin-bottom:.25em}
.field label.check{font-weight:600;display:flex;align-items:center;gap:.5em}
input,select{font:inherit;padding:.45em .6em;border:1px solid #c3ccd6;border-radius:6px;background:#fff;
width:24em;max-width:100%}
input.wide{width:100%}
input.narrow{width:8em}
input[type=checkbox],input[type=radio]{width:auto}
input:focus,select:focus{outline:2px solid #2684ff;outline-offset:1px}
.has-error input,.has-error select{border-color:#c62828}
p.help{margin:.25em 0 0;color:#6b7785;font-size:.9em}
p.key{margin:.15em 0 0;font-size:.8em;color:#9aa5b1}
p.error{margin:.25em 0 0;color:#c62828;font-weight:600}
fieldset.choice{border:1px solid #dde3ea;border-radius:8px;padding:.8em 1.2em 1em;margin:1em 0}
fieldset.choice legend{font-weight:600;padding:0 .4em}
label.option{display:inline;margin-left:.4em;font-weight:500}
label.option::after{content:"";display:block;margin-bottom:.35em}
.alt{display:none}
.actions{display:flex;gap:.8em;margin-top:1.6em;flex-wrap:wrap}
button,a.button{font:inherit;padding:.55em 1.2em;border-radius:6px;border:1px solid transparent;cursor:pointer;
text-decoration:none;display:inline-block}
button.primary,a.button{background:#2367d1;color:#fff}
button.primary:hover{background:#1b54ad}
button.secondary{background:#fff;color:#2367d1;border-color:#2367d1}
.aside{background:#f6f8fb;border-radius:8px;padding:.8em 1.2em;margin:1em 0}
.message{padding:.7em 1em;border-radius:6px}
.message.ok{background:#e6f4ea;color:#1e6b3a}
.message.error{background:#fdecea;color:#a12622}
.message.warn{background:#fff4e0;color:#8a5300}
section.checks ul{list-style:none;padding:0}
section.checks li{padding:.6em .8em;border-left:4px solid #c3ccd6;background:#f9fafb;margin:.4em 0;border-radius:4px}
section.checks li.OK{border-color:#2e9d5b}
section.checks li.WARNING{border-color:#e0a100}
section.checks li.CRITICAL,section.checks li.UNKNOWN{border-color:#c62828}
.badge{display:inline-block;min-width:5.5em;text-align:center;font-size:.75em;font-weight:700;padding:.1em .5em;
border-radius:4px;background:#d7dee6;text-transform:uppercase}
.badge.OK{background:#2e9d5b;color:#fff}
.badge.WARNING{background:#e0a100;color:#fff}
.badge.CRITICAL,.badge.UNKNOWN{background:#c62828;color:#fff}
.name{color:#6b7785;font-size:.85em}
p.advice{margin:.3em 0 0;color:#52606d;font-size:.9em}
p.summary{font-weight:600}
table{border-collapse:collapse;width:100%}
td,th{padding:.4em .6em;text-align:left;border-bottom:1px solid #edf0f3;vertical-align:top}
th{color:#52606d;font-weight:600}
table.status th{width:14em}
pre{background:#1f2d3d;color:#e4e9ef;padding:1em;border-radius:6px;overflow-x:auto;font-size:.9em}
code{font-size:.9em}
.v{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}
form.login .field input{width:100%}
@media (max-width:800px){.layout{flex-direction:column}aside{flex:none}}
"""


def _alternative_css():
    """The rules that show an alternative's fields while its radio button is checked."""
    rules = []
    for fields in WIZARD_FIELDS.values():
        for field in fields:
            if field.kind == "alternative":
                for choice in _CHOICES[(field.section, field.key)]:
                    ident = "%s-%s-%s" % (field.section, field.key, choice)
                    rules.append("#%s:checked~.alt.%s{display:block}" % (ident, ident))
    return "\n".join(rules)


_WIZARD_CSS = re.sub(r"\n", "", _WIZARD_BASE_CSS) + _alternative_css()


###############################################################################
# Captures ####################################################################
###############################################################################
# A capture is what bx24ast record-ami writes and what support asks a customer
# for: the raw AMI bytes (ami.log) and a sidecar with the arrival time and byte
# range of every recv() (ami.timestamps.jsonl).

class Capture(object):
    """An AMI capture on disk; a directory holding ami.log or the log file itself."""

    def __init__(self, path):
        if os.path.isdir(path):
            path = os.path.join(path, "ami.log")
        self.path = path
        base = path[:-4] if path.endswith(".log") else path
        self.sidecar_path = base + ".timestamps.jsonl"
        if not os.path.exists(self.sidecar_path):
            self.sidecar_path = None

    def read(self):
        with open(self.path, "rb") as f:
            return f.read()

    def sidecar(self):
        """The timing records: [{t, offset, len, wall?}], or [] without a sidecar."""
        if self.sidecar_path is None:
            return []
        records = []
        with open(self.sidecar_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    records.append((int(rec["offset"]), int(rec["len"]), float(rec["t"]), rec.get("wall")))
                except (ValueError, KeyError, TypeError):
                    raise ValueError("%s:%d: not a {t, offset, len} record" % (self.sidecar_path, lineno))
        return records

    def reads(self, data=None, records=None):
        """(bytes, seconds since connect or None, wall clock or None) per recorded recv()."""
        data = self.read() if data is None else data
        records = self.sidecar() if records is None else records
        if not records:
            yield data, None, None
            return
        used = 0
        for offset, length, t, wall in records:
            yield data[offset:offset + length], t, wall
            used = max(used, offset + length)
        if used < len(data):
            yield data[used:], None, None

    def wall_clock_base(self, data=None, records=None):
        """Wall-clock time of t = 0: from the sidecar's 'wall' (record-ami writes it), else
        anchored on the first event that carries its own time (EventTV of security
        events, or Timestamp when timestampevents = yes)."""
        data = self.read() if data is None else data
        records = self.sidecar() if records is None else records
        if not records:
            return None
        offset, length, t, wall = records[0]
        if wall is not None:
            return float(wall) - t
        hit = re.search(rb"\r\n(EventTV|Timestamp): ([^\r\n]+)", data)
        if hit is None:
            return self._uniqueid_base(data, records)
        try:
            if hit.group(1) == b"Timestamp":
                stamp = float(hit.group(2))
            else:
                stamp = parse_iso_time(hit.group(2).decode("ascii", "replace"))
        except ValueError:
            return None
        for offset, length, t, wall in records:
            if offset + length > hit.start():
                return stamp - t
        return None

    def _uniqueid_base(self, data, records):
        """An AMI user without 'system'/'security' read rights gets no event with a time
        of its own; the Uniqueid of the first Newchannel is Asterisk's clock at that
        moment (epoch.sequence), else the file's own modification time."""
        hit = re.search(rb"Event: Newchannel\r\n(?:[^\r\n]+\r\n)*?Uniqueid: (?:[^\r\n]*-)?(\d{9,})\.\d+", data)
        if hit is not None:
            for offset, length, t, wall in records:
                if offset + length > hit.start():
                    return int(hit.group(1)) + 0.5 - t
        try:
            return os.path.getmtime(self.path) - records[-1][2]
        except (OSError, IndexError):
            return None


def replay_capture(capture, tracker, parser=None, on_time=None):
    """Feed a capture through the same AmiStream a live connection uses.

    Times come from the sidecar (anchored to the wall clock when possible), else
    from the events' Timestamp headers, else from the Uniqueids (Asterisk's clock
    when each channel was made; seconds only), never 0. Returns True when the events
    had real times.
    """
    parser = parser or AmiParser(wanted_events=tracker.WANTED_EVENTS | {b"FullyBooted"},
                                 wanted_variables=tracker.wanted_variables())
    timed = {"value": False}
    last = {"time": None}

    def on_event(msg):
        if msg.time is None:
            stamp = msg.get("Timestamp")
            try:
                msg.time = float(stamp) if stamp else None
                timed["value"] = timed["value"] or msg.time is not None
            except ValueError:
                msg.time = None
            if msg.time is None:
                seconds = _uniqueid_seconds(msg.get("Uniqueid"))
                if seconds is not None and (last["time"] is None or seconds > last["time"]):
                    last["time"] = float(seconds)
                    timed["value"] = True
                msg.time = last["time"] if last["time"] is not None else _file_time(capture.path)
            else:
                last["time"] = max(last["time"] or 0.0, msg.time)
        tracker.handle(msg)

    stream = AmiStream(on_event, parser)
    data, records = capture.read(), capture.sidecar()
    base = capture.wall_clock_base(data, records)
    for chunk, t, wall in capture.reads(data, records):
        if wall is not None and t is not None:
            base = float(wall) - t
        when = None
        if t is not None:
            when = (base or 0.0) + t
            timed["value"] = True
        stream.feed(chunk, when)
        if on_time is not None and when is not None:
            on_time(when)
    return timed["value"]


def _uniqueid_seconds(uid):
    """1795668067 for 1795668067.574 (or systemname-1795668067.574)."""
    if isinstance(uid, list):
        uid = uid[-1]
    head = (uid or "").rpartition("-")[2].partition(".")[0]
    return int(head) if len(head) >= 9 and head.isdigit() else None


def _file_time(path):
    try:
        return os.path.getmtime(path)
    except OSError:
        return time.time()


class CaptureWriter(object):
    """Writes ami.log and its timing sidecar as record-ami and the fixtures do."""

    def __init__(self, path):
        self.path = path
        base = path[:-4] if path.endswith(".log") else path
        self._log = open(path, "wb")
        self._sidecar = open(base + ".timestamps.jsonl", "w", encoding="utf-8")
        self._t0 = monotonic()
        self._offset = 0
        self._lock = threading.Lock()

    def write(self, data):
        with self._lock:
            t = monotonic() - self._t0
            self._log.write(data)
            self._log.flush()
            self._sidecar.write(json.dumps({"t": round(t, 6), "offset": self._offset,
                                            "len": len(data), "wall": round(time.time(), 6)}) + "\n")
            self._sidecar.flush()
            self._offset += len(data)

    def close(self):
        with self._lock:
            self._log.close()
            self._sidecar.close()


def is_reportable(call, rules, include_internal=False):
    """Whether the CRM side should hear about this call at all."""
    if call.direction == "internal":
        return include_internal
    if call.direction not in ("inbound", "outbound"):
        return False
    number = call.external_number
    return not rules.is_ignored_number(number, rules.number_plan.normalize(number))


###############################################################################
# Metrics #####################################################################
###############################################################################
# GET /metrics in Prometheus's text format, for the graphs and alerts of an office's
# monitoring: calls by direction and outcome, how fast cards reach the portal, the
# outbox backlog, REST answers by method and code, AMI reconnects, CEL recoveries,
# hook errors. Counted where they happen; read from the parts at each scrape.

class Histogram(object):
    """A Prometheus histogram: cumulative counts per upper bound, the sum and count."""

    BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self, bounds=BOUNDS):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value):
        with self._lock:
            self.sum += value
            self.count += 1
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self.counts[i] += 1

    def samples(self, name, labels=""):
        with self._lock:
            counts, total, count = list(self.counts), self.sum, self.count
        sep = "," if labels else ""
        out = ['%s_bucket{%s%sle="%g"} %d' % (name, labels, sep, bound, n) for bound, n in zip(self.bounds, counts)]
        out.append('%s_bucket{%s%sle="+Inf"} %d' % (name, labels, sep, count))
        out.append("%s_sum%s %.6f" % (name, "{%s}" % labels if labels else "", total))
        out.append("%s_count%s %d" % (name, "{%s}" % labels if labels else "", count))
        return out


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**pairs):
    return ",".join('%s="%s"' % (k, _label(v)) for k, v in sorted(pairs.items()))


OUTCOMES = {"ANSWERED": "answered", "NO ANSWER": "missed", "BUSY": "busy", "FAILED": "failed"}


class Metrics(object):
    """What /metrics shows for a running daemon."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.started = time.time()
        self.calls = collections.Counter()   # (pbx, direction, outcome) -> calls ended
        self._lock = threading.Lock()

    def counter(self, pbx):
        """The call-event handler of one PBX: counts each reported call once, at its end."""
        def on_call_event(kind, call, extension):
            if kind == "ended" and call.direction in ("inbound", "outbound"):
                with self._lock:
                    self.calls[(pbx, call.direction, OUTCOMES.get(call.disposition, "failed"))] += 1
        return on_call_event

    def render(self):
        out = []

        def family(name, kind, text, samples):
            out.append("# HELP %s %s" % (name, text))
            out.append("# TYPE %s %s" % (name, kind))
            out.extend(samples)

        d = self.daemon
        family("bx24ast_up", "gauge", "1 while the daemon runs.", ["bx24ast_up 1"])
        family("bx24ast_start_time_seconds", "gauge", "When the daemon started (Unix time).",
               ["bx24ast_start_time_seconds %d" % self.started])
        with self._lock:
            calls = sorted(self.calls.items())
        family("bx24ast_calls_total", "counter", "External calls ended, by PBX, direction and outcome.",
               ["bx24ast_calls_total{%s} %d" % (_labels(pbx=p, direction=dr, outcome=o), n)
                for (p, dr, o), n in calls])
        pbxs = d.pbx_list()
        family("bx24ast_calls_in_progress", "gauge", "Calls Asterisk has up now, by PBX.",
               ["bx24ast_calls_in_progress{%s} %d" % (_labels(pbx=p.name), p.calls_in_progress()) for p in pbxs])
        family("bx24ast_ami_connected", "gauge", "1 while the AMI connection is up, by PBX.",
               ["bx24ast_ami_connected{%s} %d" % (_labels(pbx=p.name), p.ami.connected.is_set()) for p in pbxs])
        family("bx24ast_ami_connects_total", "counter", "AMI logins since start (reconnects are the ones after "
               "the first), by PBX.", ["bx24ast_ami_connects_total{%s} %d" % (_labels(pbx=p.name), p.ami.connects)
                                       for p in pbxs])
        family("bx24ast_cel_recovered_calls_total", "counter", "Calls reported or finished from CEL, by PBX and how.",
               ["bx24ast_cel_recovered_calls_total{%s} %d" % (_labels(pbx=p.name, how=how), n)
                for p in pbxs for how, n in sorted(p.cel_recovered().items())])
        bridge = d.bridge
        if bridge is not None:
            counts = bridge.outbox.counts()
            family("bx24ast_outbox_requests", "gauge", "Requests in the outbox by state (pending: waiting to be "
                   "sent; parked: given up, see outbox list).",
                   ["bx24ast_outbox_requests{%s} %d" % (_labels(state=s), counts.get(s, 0))
                    for s in ("pending", "parked")])
            oldest = bridge.outbox.oldest_pending()
            family("bx24ast_outbox_oldest_pending_seconds", "gauge", "Age of the oldest request waiting to be sent.",
                   ["bx24ast_outbox_oldest_pending_seconds %.3f" % (max(0.0, time.time() - oldest) if oldest else 0)])
            family("bx24ast_card_latency_seconds", "histogram", "From the phone ringing to its card's request "
                   "on the wire (register or show).", bridge.sender.card_latency.samples("bx24ast_card_latency_seconds"))
            family("bx24ast_rest_requests_total", "counter", "Bitrix24 REST answers by method and code (200, an "
                   "error code such as QUERY_LIMIT_EXCEEDED, or unreachable); a batch's commands each count.",
                   ["bx24ast_rest_requests_total{%s} %d" % (_labels(method=m, code=c), n)
                    for (m, c), n in sorted(bridge.client.answers.items())])
            hooks = bridge.hooks
            family("bx24ast_hook_errors_total", "counter", "Hooks that raised, timed out or returned what "
                   "bx24ast cannot use, by hook.",
                   ["bx24ast_hook_errors_total{%s} %d" % (_labels(hook=h), n) for h, n in sorted(hooks.errors.items())])
            family("bx24ast_hook_calls_total", "counter", "Hook calls, by hook.",
                   ["bx24ast_hook_calls_total{%s} %d" % (_labels(hook=h), n) for h, n in sorted(hooks.calls.items())])
        return "\n".join(out) + "\n"


def metrics_reply(handler, metrics):
    body = metrics.render().encode("utf-8")
    handler.send_response(200)
    handler.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class MetricsHttpServer(Listener):
    """GET /metrics on [metrics] listen, for local clients only (a Prometheus agent or
    node_exporter's proxy on the PBX)."""

    thread_name = "metrics"

    def __init__(self, metrics, host="127.0.0.1", port=9178):
        owner = self

        class Handler(listener_classes().QuietRequestHandler):
            def do_GET(self):
                if not _is_loopback(self.client_address[0]):
                    return _json_reply(self, 403, {"error": "/metrics answers only local clients"})
                if urllib.parse.urlsplit(self.path).path.rstrip("/") != "/metrics":
                    return _json_reply(self, 404, {"error": "only /metrics is served here"})
                return metrics_reply(self, owner.metrics)

        self.metrics = metrics
        self.server = bounded(listener_classes().ThreadingHTTPServer((host, port), Handler), "metrics", 16, 16, 10.0)

    def describe(self):
        return "metrics: http://%s:%d/metrics" % self.address


###############################################################################
# Service #####################################################################
###############################################################################

def setup_logging(level="info", path=""):
    """stderr (foreground), a file, or syslog ([log] file = syslog)."""
    if path == "syslog":
        address = "/dev/log" if os.path.exists("/dev/log") else ("127.0.0.1", 514)
        syslog = importlib.import_module("logging.handlers").SysLogHandler
        handler = syslog(address=address, facility=syslog.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("bx24ast[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def describe_call_event(kind, call, extension, rules, pbx=""):
    """One log line for a lifecycle event, always with the linkedid (and the PBX's name
    when the daemon reports several)."""
    number = rules.number_plan.normalize(call.external_number) if call.direction != "internal" else None
    parts = ["call %s%s %s" % ("%s:" % pbx if pbx else "", call.linkedid, kind), "direction=%s" % call.direction]
    if number:
        parts.append("number=%s" % number)
    if call.did and call.direction == "inbound":
        parts.append("did=%s" % call.did)
    if extension:
        parts.append("extension=%s" % extension)
    if kind == "ended":
        parts.append("disposition=%s billsec=%d" % (call.disposition, call.billsec))
        if call.ended_with:
            parts.append("ended_with=%s" % call.ended_with)
        if call.recording:
            parts.append("recording=%s" % call.recording)
    if call.call_id:
        parts.append("CALL_ID=%s" % call.call_id)
    return " ".join(parts)


class Bridge(object):
    """The Bitrix24 side assembled from the configuration: store, outbox, client,
    users, hooks and the sender thread, shared by every PBX; CRM flows and a CEL
    watcher of each PBX's own (the [ami] one built here, [ami:NAME] ones by attach)."""

    def __init__(self, config, rules, store=None, client=None):
        self.config = config
        self.store = store or StateStore.open_dir(config.get("storage", "state_dir"))
        self.reserve = DiskReserve(config.get("storage", "state_dir"), config.get("storage", "reserve_mb"))
        self.outbox = Outbox(self.store)
        self.records = CallRecords(self.store)
        self.client = client if client is not None else BitrixClient.from_config(config, self.store)
        crm = config.section("crm")
        self.users = UserDirectory(self.client, config.maps["users"], crm["default_user_id"],
                                   config.get("bitrix24", "users_refresh_minutes") * 60)
        self.hooks = Hooks.from_config(config)
        rec = config.section("recordings")
        self.recordings = RecordingFiles(rec["path"], rec["settle_seconds"],
                                         int(rec["inline_max_mb"] * 1024 * 1024))
        self.sender = OutboxSender(self.outbox, self.records, self.client, self.users, self.recordings,
                                   crm["default_user_id"],
                                   unanswered_retry=config.get("bitrix24", "unanswered_retry_seconds"),
                                   hooks=self.hooks)
        self.flows = collections.OrderedDict()   # PBX name -> (CrmFlows, CelWatcher or None)
        self.crm, self.cel = self.attach("", rules)

    def attach(self, pbx, rules):
        """The CRM flows and CEL watcher of one PBX ("" is [ami]); its CEL is [cel:NAME]."""
        section = "cel:%s" % pbx if pbx else "cel"
        try:
            source = open_cel_source(self.config, section=section) if not pbx or pbx in self.config.names("ami") \
                else None
        except CelError as exc:
            log.warning("CEL%s: %s", " of " + pbx if pbx else "", exc)
            source = None
        crm = CrmFlows(self.config, self.outbox, self.records, rules, ledger=source is not None,
                       hooks=self.hooks, pbx=pbx)
        cel = None
        if source is not None:
            recovery = CelRecovery(source, self.store, rules, crm, self.recordings, pbx=pbx)
            cel = CelWatcher(recovery, self.config.get(section, "recover_interval_minutes") * 60,
                             self.config.get(section, "recover_hours_without_state"))
            crm.on_awaiting = cel.kick
        self.flows[pbx] = (crm, cel)
        return crm, cel

    def maintain(self):
        """Every few seconds from the daemon's loop: the disk reserve, events a failed
        write left in memory, and the WAL folded back now and then."""
        self.reserve.check()
        try:
            self.client.save_bucket()
        except sqlite3.Error:
            pass    # the store said so; the level is saved again next time
        if self.store.error is not None:
            self.store.checkpoint()     # a full WAL gives its pages back first
        for crm, _cel in self.flows.values():
            if crm.unsaved():
                crm.retry_unsaved()
        now = monotonic()
        if now - self._checkpointed >= 600:
            self._checkpointed = now
            self.store.checkpoint()

    def storage_status(self):
        return dict(self.store.health(), unsaved_events=sum(crm.unsaved() for crm, _c in self.flows.values()),
                    **self.reserve.status())

    def start(self):
        self._checkpointed = monotonic()
        self.reserve.check()
        self.sender.start()
        for pbx, (_crm, cel) in self.flows.items():
            section = "cel:%s" % pbx if pbx else "cel"
            whose = " of %s" % pbx if pbx else ""
            if cel is not None:
                log.info("CEL%s: recovering missed calls from %s", whose, cel.recovery.source.describe())
                cel.start()
            elif self.config.get(section, "backend") == "off":
                log.warning("CEL%s: recovery is off ([%s] backend = off): calls made while bx24ast is down are lost",
                            whose, section)
            else:
                log.warning("CEL%s: no CEL store found (bx24ast.py detect); calls made while bx24ast is down are lost",
                            whose)

    def stop(self):
        for _crm, cel in self.flows.values():
            if cel is not None:
                cel.stop()
        self.sender.stop()
        try:
            self.client.save_bucket()
        except sqlite3.Error:
            pass


class Pbx(object):
    """One Asterisk the daemon reports: its AMI connection, call engine and PBX
    discovery, and with Bitrix24 its CRM flows and CEL watcher. [ami] is the PBX named
    ""; each [ami:NAME] (with [pbx:NAME], [cel:NAME]) is one more."""

    def __init__(self, name, config, bridge=None, handlers=(), on_originate_response=None):
        self.name = name
        self.config = config
        self.rules = PbxRules.from_config(config, self.section("pbx"))
        self.lock = threading.Lock()
        self.crm = self.cel = None
        if bridge is not None:
            self.crm, self.cel = bridge.attach(name, self.rules) if name else (bridge.crm, bridge.cel)
        self._handlers = [self._log_call_event] + ([self.crm.on_call_event] if self.crm else []) + list(handlers)
        self.on_originate_response = on_originate_response
        self.tracker = CallTracker(self.rules, self._call_event)
        ami = config.section(self.section("ami"))
        self.ami = AmiConnection(
            ami["host"], ami["port"], ami["username"], ami["secret"], self._on_event,
            auth=ami["auth"], connect_timeout=ami["connect_timeout"],
            ping_interval=ami["ping_interval"], reconnect_max_delay=ami["reconnect_max_delay"],
            max_message_bytes=ami["max_message_bytes"],
            wanted_events=CallTracker.WANTED_EVENTS | frozenset([b"OriginateResponse"]),
            wanted_variables=self.tracker.wanted_variables(),
            on_connect=self._on_connect)
        minutes = config.get(self.section("pbx"), "discovery_minutes")
        self.discovery = PbxDiscovery(self.ami, self.rules, minutes * 60) if minutes else None
        self.resyncs = 0
        self.last_seen_alive = time.time()

    def section(self, kind):
        return "%s:%s" % (kind, self.name) if self.name else kind

    def label(self):
        return "AMI %s" % self.name if self.name else "AMI"

    # -- events -------------------------------------------------------------------------
    def _call_event(self, kind, call, extension):
        if kind != "ended" and call.direction == "internal":
            return
        for handler in self._handlers:
            try:
                handler(kind, call, extension)
            except Exception:
                log.exception("call %s: handling %s failed", call.linkedid, kind)

    def _log_call_event(self, kind, call, extension):
        if is_reportable(call, self.rules, include_internal=True):
            log.info("%s", describe_call_event(kind, call, extension, self.rules, self.name))

    def _on_event(self, msg):
        if msg.name == "FullyBooted":
            log.info("%s: Asterisk is fully booted (uptime %s s)", self.label(), msg.get("Uptime", "?"))
            return
        if msg.name == "OriginateResponse" and self.on_originate_response is not None:
            self.on_originate_response(msg)
        if msg.name == "Shutdown":
            log.warning("%s: Asterisk is shutting down (%s, restart=%s)", self.label(),
                        msg.get("Shutdown", "?"), msg.get("Restart", "?"))
            return
        with self.lock:
            self.tracker.handle(msg)

    def _on_connect(self, conn):
        disconnected_at = conn.disconnected_at

        def done(pending):
            if pending.error is not None or pending.response is None or not pending.response.success:
                log.warning("%s: CoreShowChannels failed; calls in progress are not resynchronised", self.label())
                return
            with self.lock:
                before = len(self.tracker.calls)
                self.tracker.resync(pending.events, STEADY.now(), disconnected_at)
                self.resyncs += 1
                log.info("%s: resynchronised: %d channels up, %d calls tracked (was %d)", self.label(),
                         len(pending.events), len(self.tracker.calls), before)
                if self.crm is not None:
                    # registered calls Asterisk no longer has ended while nobody watched
                    self.crm.close_orphans(set(self.tracker.calls), disconnected_at or self.last_seen_alive)
        conn.core_show_channels(done)
        if self.discovery is not None:
            self.discovery.kick()

    # -- what the daemon asks of it ----------------------------------------------------------
    def start(self):
        if self.ami.username:
            self.ami.start()
            if self.discovery is not None:
                self.discovery.start()
        elif self.name:
            log.warning("[ami:%s] username is empty: that PBX is not connected", self.name)

    def stop(self):
        if self.discovery is not None:
            self.discovery.stop()
        self.ami.stop()

    def tick(self, now):
        with self.lock:
            self.tracker.expire(now)

    def calls_in_progress(self):
        return len(self.tracker.calls)

    def cel_recovered(self):
        return dict(self.cel.recovery.recovered) if self.cel is not None else {}

    def has_phone(self, extension):
        """Whether Asterisk lists extension among this PBX's phones (PBX discovery)."""
        return any(kind == "phone" and device.partition("/")[2] == extension
                   for device, kind in list(self.rules.endpoints.items()))

    def status(self):
        return {"name": self.name, "host": self.ami.host, "port": self.ami.port,
                "connected": self.ami.connected.is_set(), "disconnected_at": self.ami.disconnected_at,
                "last_error": self.ami.last_error or (None if self.ami.username else
                                                      "not configured yet ([%s] username)" % self.section("ami")),
                "calls_in_progress": len(self.tracker.calls)}


class Daemon(object):
    """The running service: one Pbx per [ami] / [ami:NAME] (AMI connection ->
    CallTracker -> lifecycle handlers), the Bitrix24 bridge they share when [bitrix24]
    is configured, the listeners (routing, click-to-call, wizard, metrics)."""

    def __init__(self, config, on_call_event=None, bridge=None):
        self.config = config
        if recent_warnings() not in log.handlers:
            log.addHandler(recent_warnings())   # the status page's last warnings
        rules = PbxRules.from_config(config)
        self.bridge = bridge
        if self.bridge is None and BitrixClient.configured(config):
            self.bridge = Bridge(config, rules)
        self.metrics = Metrics(self)
        self.lookup = self.click = None
        self.pbxs = []
        for name in [""] + config.names("ami"):
            handlers = [self.metrics.counter(name)] + ([on_call_event] if on_call_event is not None else [])
            self.pbxs.append(Pbx(name, config, self.bridge, handlers, self._on_originate_response))
        self.stop_event = threading.Event()
        self.listeners = []      # (label, server): FastAGI, HTTP lookup, event listener; started by run()
        self.listener_errors = []
        self.poller = None
        self.started_at = time.time()
        beat = Heartbeat(config.get("storage", "state_dir")).read() or {}
        # the previous life's last sign: calls it left registered ended after it
        for pbx in self.pbxs:
            pbx.last_seen_alive = beat.get("stopped_at") or beat.get("time") or self.started_at
        self.reload_requested = False
        self.next_config = None
        self.config_loader = None   # set by `run`: reads the file again on SIGHUP
        if self.bridge is not None:
            self._build_features()

    # The PBX of [ami], as one-PBX code and tests know it.
    @property
    def ami(self):
        return self.pbxs[0].ami

    @property
    def tracker(self):
        return self.pbxs[0].tracker

    @property
    def rules(self):
        return self.pbxs[0].rules

    @property
    def discovery(self):
        return self.pbxs[0].discovery

    @property
    def resyncs(self):
        return sum(p.resyncs for p in self.pbxs)

    def pbx_list(self):
        return list(self.pbxs)

    def pbx_for_extension(self, extension):
        """The PBX an employee's phone is on: the one whose Asterisk lists it as a phone,
        else the first whose [pbx] extension_pattern fits, else [ami]'s."""
        for pbx in self.pbxs:
            if pbx.has_phone(extension):
                return pbx
        for pbx in self.pbxs:
            if pbx.rules.is_extension(extension):
                return pbx
        return self.pbxs[0]

    def _ami_for(self, extension):
        return self.pbx_for_extension(extension).ami

    def _pbx_by_address(self):
        """Named PBXs by the address their AMI is reached at (written as an IP address):
        a FastAGI session from there is a call on that PBX."""
        found, shared = {}, set([self.config.get("ami", "host")])
        for pbx in self.pbxs[1:]:
            host = self.config.get(pbx.section("ami"), "host")
            if host in found:
                shared.add(host)    # two Asterisks on one host: only ?pbx=NAME tells them apart
            found[host] = pbx.name
        return dict((host, name) for host, name in found.items()
                    if host not in shared and re.match(r"^[0-9.]+$|^[0-9a-fA-F:]+$", host))

    def _on_originate_response(self, msg):
        if self.click is not None:
            self.click.on_originate_response(msg)

    def _build_features(self):
        """Responsible routing and click-to-call, as configured (they need Bitrix24)."""
        config, bridge = self.config, self.bridge
        routing = config.section("routing")
        ami_for = self._ami_for if len(self.pbxs) > 1 else None
        if routing["agi_listen"] or routing["http_listen"]:
            self.lookup = ResponsibleLookup.from_config(config, bridge.client, bridge.users, self.rules, self.ami,
                                                        hooks=bridge.hooks, ami_for=ami_for, records=bridge.records)
        c2c = config.section("click_to_call")
        if c2c["mode"] == "port" and not bridge.client.uses_oauth:
            config.require("click_to_call", "application_token",
                           "port mode refuses every event without it (copy it from the outbound webhook)")
        if c2c["mode"] != "off":
            self.click = ClickToCall(self.ami, bridge.users, bridge.store, bridge.outbox, self.rules, c2c,
                                     hooks=bridge.hooks, ami_for=ami_for)
        if c2c["mode"] == "offline":
            self.poller = OfflineEventPoller(bridge.client, self.click, bridge.store, bridge.sender,
                                             c2c["poll_interval"])

    def _start_listeners(self):
        """Bind the configured ports; one that is taken is logged and skipped, the
        call reporting goes on."""
        routing = self.config.section("routing")
        c2c = self.config.section("click_to_call")
        wanted = []
        if self.lookup is not None and routing["agi_listen"]:
            wanted.append(("FastAGI ([routing] agi_listen)", routing["agi_listen"],
                           lambda host, port: FastAgiServer(self.lookup, host, port, routing["set_callerid_name"],
                                                            self._pbx_by_address())))
        if self.lookup is not None and routing["http_listen"]:
            wanted.append(("HTTP lookup ([routing] http_listen)", routing["http_listen"],
                           lambda host, port: LookupHttpServer(self.lookup, host, port)))
        if self.click is not None and c2c["mode"] == "port":
            wanted.append(("click-to-call events ([click_to_call] listen)", c2c["listen"],
                           lambda host, port: EventListener(
                               self.click, c2c["application_token"], host, port, c2c["tls_cert"], c2c["tls_key"],
                               self.bridge.client if self.bridge.client.uses_oauth else None)))
        wizard = self.config.section("wizard")
        metrics = self.config.section("metrics")
        if wizard["listen"]:
            wanted.append(("wizard ([wizard] listen)", wizard["listen"], lambda host, port: WizardServer(
                SetupWizard(self.config.path, root=wizard["pbx_root"] or "/", on_saved=self.request_reload),
                wizard["user"], wizard["password_hash"], host, port, wizard["tls_cert"], wizard["tls_key"],
                wizard["language"], live_status=self.status, status_token=wizard["status_token"],
                state_dir=self.config.get("storage", "state_dir"), metrics=self.metrics,
                metrics_token=metrics["token"])))
        if metrics["listen"]:
            wanted.append(("metrics ([metrics] listen)", metrics["listen"],
                           lambda host, port: MetricsHttpServer(self.metrics, host, port)))
        for label, (host, port), build in wanted:
            try:
                server = build(host, port)
            except ConfigError as exc:
                log.error("%s: %s", label, exc)
                self.listener_errors.append("%s: %s" % (label, exc))
                continue
            except OSError as exc:
                log.error("%s: cannot listen on %s:%d: %s", label, host, port, exc.strerror or exc)
                self.listener_errors.append("%s: cannot listen on %s:%d: %s" % (label, host, port,
                                                                               exc.strerror or exc))
                continue
            server.start()
            self.listeners.append((label, server))

    def run(self):
        log.info("bx24ast %s starting; %s", __version__, ", ".join(
            "%s %s:%s" % (p.label(), p.ami.host, p.ami.port) for p in self.pbxs))
        if self.bridge is not None:
            log.info("Bitrix24: %s; outbox %s", self.bridge.client.describe(), self.bridge.outbox.counts())
            self.bridge.start()
        else:
            log.warning("Bitrix24 is not configured ([bitrix24] webhook_url or portal_url + client_id): "
                        "calls are only logged")
        if not self.ami.username:
            # A fresh install: the wizard runs so that the admin can set AMI up.
            log.warning("AMI is not configured yet ([ami] username): only the setup wizard runs")
        for pbx in self.pbxs:
            pbx.start()
        self._start_listeners()
        if self.poller is not None:
            self.poller.start()
        heartbeat = Heartbeat(self.config.get("storage", "state_dir"))
        beat_at = 0.0
        try:
            maintained = 0.0
            clock = ClockWatch()
            while not self.stop_event.wait(1.0):
                now = STEADY.now()
                for pbx in self.pbxs:
                    pbx.tick(now)
                self._follow_the_clock(clock.step())
                if self.bridge is not None and monotonic() - maintained >= 5.0:
                    maintained = monotonic()
                    self.bridge.maintain()
                if now - beat_at >= Heartbeat.EVERY:
                    beat_at = now
                    heartbeat.write(self.status())
                if self.reload_requested:
                    self.reload_requested = False
                    if self._reload():
                        break
        finally:
            for _label, server in self.listeners:
                server.stop()
            if self.poller is not None:
                self.poller.stop()
            for pbx in self.pbxs:
                pbx.stop()
            if self.bridge is not None:
                self.bridge.stop()
            if self.next_config is None:
                heartbeat.write(dict(self.status(), stopped_at=time.time()))
            log.info("bx24ast stopped" if self.next_config is None else "bx24ast restarting with the new configuration")

    def _follow_the_clock(self, step):
        """A step of the system clock: requests waiting for a time move with it (a step
        back must not hold them for an hour); call times keep the steady clock until
        no call is being timed."""
        if step:
            log.warning("the system clock stepped by %+.0f s: talk times follow the steady clock, "
                        "requests waiting for a time are moved with it", step)
            if self.bridge is not None:
                self.bridge.outbox.shift(step)
        if not any(p.tracker.calls for p in self.pbxs) and abs(STEADY.drift()) >= 1.0:
            STEADY.resync()

    def _reload(self):
        """SIGHUP: read the configuration again; a bad file is logged and the running
        configuration kept. True when run() should return to be started anew."""
        if self.config_loader is None:
            log.warning("SIGHUP: no configuration file to reload")
            return False
        try:
            config = self.config_loader()
        except ConfigError as exc:
            log.error("SIGHUP: the new configuration is refused, keeping the running one: %s", exc)
            return False
        if config.get("storage", "state_dir") != self.config.get("storage", "state_dir"):
            log.error("SIGHUP: [storage] state_dir changed; that needs a restart (systemctl restart bx24ast), "
                      "keeping the running configuration")
            return False
        log.info("SIGHUP: configuration reloaded; reconnecting")
        self.next_config = config
        return True

    def request_reload(self, *_args):
        self.reload_requested = True

    def status(self):
        """What the heartbeat file tells `check` and the wizard."""
        pbx_status = [p.status() for p in self.pbxs]
        calls = []
        for pbx in self.pbxs:
            calls.extend({"linkedid": c.linkedid, "pbx": pbx.name, "direction": c.direction,
                          "number": c.external_number,
                          "extension": c.talking_with or c.placer or (c.rang[-1] if c.rang else None),
                          "since": c.started_at, "answered": c.answered_at is not None}
                         for c in list(pbx.tracker.calls.values())[:200])
        default = pbx_status[0]
        out = collections.OrderedDict([
            ("pid", os.getpid()), ("time", time.time()), ("started_at", self.started_at), ("version", __version__),
            ("ami", dict((k, v) for k, v in default.items() if k not in ("name", "calls_in_progress"))),
            ("pbxs", pbx_status),
            ("listeners", [{"name": label, "address": "%s:%d" % tuple(server.address[:2])}
                           for label, server in self.listeners]),
            ("listener_errors", self.listener_errors),
            ("calls_in_progress", sum(p["calls_in_progress"] for p in pbx_status)),
            ("calls", calls[:200]),
            ("warnings", recent_warnings().as_list()),
            ("endpoints", [dict(e.as_dict(), pbx=p.name) for p in self.pbxs if p.discovery
                           for e in p.discovery.learned]),
        ])
        if self.bridge is not None:
            client = self.bridge.client
            out["bitrix24"] = {"last_error": str(client.last_error) if client.last_error else None,
                               "alert": self.bridge.sender.alert, "requests_sent": client.requests_sent,
                               "last_sent_at": self.bridge.sender.last_sent_at,
                               "last_answer_at": client.last_answer_at,
                               "outage": self.bridge.sender.outage.status()}
            out["storage"] = self.bridge.storage_status()
            out["users"] = self.bridge.users.status()
            out["hooks"] = self.bridge.hooks.status()
        if self.poller is not None:
            out["offline_events"] = {"bound": self.poller.bound, "polls": self.poller.polls}
        return out

    def stop(self, *_args):
        self.stop_event.set()


_RECENT_WARNINGS = []


def recent_warnings():
    """The last warnings and errors of the log, for the status page: one handler for
    the process (it outlives a reload), made by the first daemon."""
    if not _RECENT_WARNINGS:
        class RecentWarnings(logging.Handler):
            def __init__(self, size=20):
                logging.Handler.__init__(self, logging.WARNING)
                self.records = collections.deque(maxlen=size)

            def emit(self, record):
                try:
                    self.records.append({"time": record.created, "level": record.levelname,
                                         "message": record.getMessage()[:500]})
                except Exception:   # a bad log call must not break the one who logs
                    pass

            def as_list(self):
                return list(self.records)

        _RECENT_WARNINGS.append(RecentWarnings())
    return _RECENT_WARNINGS[0]


class Heartbeat(object):
    """heartbeat.json in the state directory, rewritten every few seconds by the
    running daemon: how `check` (and cron) know it is alive and what it sees."""

    EVERY = 10.0
    NAME = "heartbeat.json"

    def __init__(self, state_dir):
        self.path = os.path.join(state_dir, self.NAME)

    def write(self, status):
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(status, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write the heartbeat %s: %s", self.path, exc)

    def read(self):
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None


class InstanceLock(object):
    """One daemon per state directory: a second one would send every call twice."""

    def __init__(self, state_dir):
        self.path = os.path.join(state_dir, "bx24ast.pid")
        self._file = None

    def acquire(self):
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as exc:
            raise StorageError("cannot create %s ([storage] state_dir): %s" % (self.path, exc.strerror))
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            other = f.read().strip() or "?"
            f.close()
            raise StorageError("another bx24ast (pid %s) already runs on %s; stop it first "
                               "(systemctl stop bx24ast)" % (other, os.path.dirname(self.path)))
        f.seek(0)
        f.truncate()
        f.write("%d\n" % os.getpid())
        f.flush()
        self._file = f
        return self

    def release(self):
        if self._file is not None:
            self._file.close()
            self._file = None


###############################################################################
# Checks ######################################################################
###############################################################################
# One list of honest checks, printed by `bx24ast.py check` (Nagios plugin
# conventions, cron) and shown on the wizard's results page. Each says what is
# wrong and what to do; none waits long on the network (cron must not pile up).

CHECK_LEVELS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
CHECK_EXIT = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}


class CheckResult(object):
    __slots__ = ("level", "name", "message", "advice")

    def __init__(self, level, name, message, advice=""):
        self.level, self.name, self.message, self.advice = level, name, message, advice

    def line(self):
        return "%s %s: %s%s" % (self.level, self.name, self.message, " -> %s" % self.advice if self.advice else "")

    def as_dict(self):
        return {"level": self.level, "name": self.name, "message": self.message, "advice": self.advice}


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError) as exc:
        return getattr(exc, "errno", None) == 1  # EPERM: alive, another user's
    return True


def check_daemon(state_dir, now=None, stale_after=60.0):
    """(result, heartbeat, dead): dead is True when the service should be running and
    is not (crashed or hung), False when it is alive or was stopped on purpose."""
    now = time.time() if now is None else now
    beat = Heartbeat(state_dir).read()
    if beat is None:
        return CheckResult("CRITICAL", "daemon", say("never ran on %s (no heartbeat)", state_dir),
                           say("start it: systemctl start bx24ast (or bx24ast.py run -f to see why it fails)")), None, True
    if beat.get("stopped_at"):
        return CheckResult("CRITICAL", "daemon", say("stopped at %s", time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(beat["stopped_at"]))), say("systemctl start bx24ast")), beat, False
    age = now - float(beat.get("time") or 0)
    if not _pid_alive(beat.get("pid")):
        return CheckResult("CRITICAL", "daemon", say("pid %s is gone (last heartbeat %s ago): it died",
                                                  beat.get("pid"), Span(age)), say("see the log; systemctl restart bx24ast")), beat, True
    if age > stale_after:
        return CheckResult("CRITICAL", "daemon", say("pid %s is hung: last heartbeat %s ago", beat.get("pid"), Span(age)),
                           say("systemctl restart bx24ast")), beat, True
    up = now - float(beat.get("started_at") or now)
    return CheckResult("OK", "daemon", say("running (pid %s, up %s, heartbeat %s ago)",
                                            beat.get("pid"), Span(up), Span(age))), beat, False


def check_ami(beat, pbx=None):
    """The AMI connection of [ami], or of the [ami:NAME] whose heartbeat entry pbx is."""
    if beat is None or beat.get("stopped_at"):
        return CheckResult("UNKNOWN", "ami", say("the daemon is not running"))
    ami = pbx if pbx is not None else (beat.get("ami") or {})
    where = "%s:%s" % (ami.get("host"), ami.get("port"))
    section = "ami:%s" % pbx["name"] if pbx is not None else "ami"
    if pbx is not None:
        where = "%s (%s)" % (where, pbx["name"])
    if ami.get("connected"):
        return CheckResult("OK", "ami", say("connected to %s", where))
    return CheckResult("CRITICAL", "ami", say("not connected to %s: %s", where, ami.get("last_error") or say("connecting")),
                       say("check [%s] host/port/username/secret and manager.conf (bx24ast.py run -f shows the login)",
                           section))


def check_bitrix24(config, beat, timeout=3.0, probe=True, now=None):
    """probe=False (cron): what the running service saw of the portal, when it saw it
    lately; a request of its own only when it has nothing to tell."""
    if not BitrixClient.configured(config):
        return CheckResult("CRITICAL", "bitrix24", say("not configured"),
                           say("set [bitrix24] webhook_url, or portal_url + client_id + client_secret"))
    seen = None if probe else _bitrix24_seen_by_the_service(config, beat, now)
    if seen is not None:
        return seen
    try:
        store = _existing_store(config)
    except StorageError:
        store = StateStore(":memory:")   # a webhook needs no tokens; OAuth then says it has none
    try:
        client = BitrixClient.from_config(config, store)
        client.timeout = timeout
        client.may_refresh = False   # the daemon owns the refresh token; two refreshers break it
        client.call("profile")
    except BitrixAuthExpired:
        return CheckResult("OK", "bitrix24", say("reachable (%s); the access token is due for a refresh",
                                                  client.describe()))
    except BitrixError as exc:
        advice = say("check the portal address and the webhook/application rights (telephony crm user task)")
        if isinstance(exc, BitrixUnavailable):
            advice = say("is the portal reachable from this host? (DNS, firewall, proxy)")
        return CheckResult("CRITICAL", "bitrix24", said_of(exc), advice)
    finally:
        store.close()
    alert = ((beat or {}).get("bitrix24") or {}).get("alert")
    if alert:
        return CheckResult("WARNING", "bitrix24", say("reachable, but the service reports: %s", alert),
                           say("too many requests or an overloaded portal; it resumes by itself"))
    return CheckResult("OK", "bitrix24", say("reachable (%s)", client.describe()))


def _bitrix24_seen_by_the_service(config, beat, now=None, fresh=3600.0):
    """A CheckResult from the heartbeat, or None when the service has not talked to the
    portal within fresh seconds (or does not run)."""
    now = time.time() if now is None else now
    if beat is None or beat.get("stopped_at") or not beat.get("bitrix24"):
        return None
    seen = beat["bitrix24"]
    where = mask_webhook(config.get("bitrix24", "webhook_url")) or config.get("bitrix24", "portal_url")
    outage = seen.get("outage") or {}
    if outage.get("failing_since"):
        return CheckResult("CRITICAL", "bitrix24", say("the service cannot reach the portal for %s (%d attempts): %s",
                                                       Span(now - outage["failing_since"]), outage.get("failures") or 0,
                                                       outage.get("last_error") or "?"),
                           say("is the portal reachable from this host? (DNS, firewall, proxy)"))
    if seen.get("alert"):
        return CheckResult("WARNING", "bitrix24", say("reachable, but the service reports: %s", seen["alert"]),
                           say("too many requests or an overloaded portal; it resumes by itself"))
    answered = seen.get("last_answer_at")
    if answered is None or now - answered > fresh:
        return None
    return CheckResult("OK", "bitrix24", say("reachable (%s): the service's last answer %s ago",
                                             where, Span(max(0.0, now - answered))))


def _existing_store(config):
    """The daemon's state database, for a check or the status page: never made anew
    here (an empty one would say "all is well"). Opened as the daemon opens it: a WAL
    database read with mode=ro fails whenever its -shm is not writable."""
    path = os.path.join(config.get("storage", "state_dir"), "bx24ast.db")
    if not os.path.exists(path):
        raise StorageError(say("no state database yet at %s", path))
    return StateStore(path)


def check_outbox(config, now=None, backlog_warning=100, age_warning=600.0, beat=None):
    """Requests given up or waiting long, a sender that no longer sends, and calls at
    risk: registered and never finished, or finished with uncertain values."""
    now = time.time() if now is None else now
    try:
        store = _existing_store(config)
    except StorageError as exc:
        return CheckResult("UNKNOWN", "outbox", said_of(exc))
    longest_call = config.get("pbx", "call_max_hours") * 3600
    try:
        counts = Outbox(store).counts()
        oldest = store.query("SELECT MIN(created_at) AS t FROM outbox WHERE state = 'pending'")[0]["t"]
        due = Outbox(store).next_due()
        stale = store.query("SELECT linkedid FROM calls WHERE source IS NOT NULL AND ended_at IS NULL "
                            "AND started_at < ? ORDER BY started_at", (now - longest_call,))
        uncertain = store.query("SELECT linkedid, uncertain FROM calls WHERE uncertain IS NOT NULL "
                                "AND updated_at >= ? ORDER BY updated_at", (now - 86400,))
    except sqlite3.Error as exc:
        return CheckResult("UNKNOWN", "outbox", say("cannot read the state database: %s", exc))
    finally:
        store.close()
    pending, parked = counts.get("pending", 0), counts.get("parked", 0)
    problems, advice, level = [], [], "OK"
    bitrix = (beat or {}).get("bitrix24") or {}
    outage = bitrix.get("outage") or {}
    if beat and not beat.get("stopped_at") and pending and due is not None and now - due > 120 \
            and not outage.get("failing_since") and not bitrix.get("alert") \
            and now - (bitrix.get("last_sent_at") or beat.get("started_at") or now) > 120:
        level = "CRITICAL"
        problems.append(say("%d request(s) due for %s and nothing sent: the sender is stuck", pending, Span(now - due)))
        advice.append(say("restart bx24ast (systemctl restart bx24ast) and report the log"))
    if parked:
        level = "WARNING" if level == "OK" else level
        problems.append(say("%d request(s) given up (parked)", parked))
        advice.append(say("bx24ast.py outbox list shows why; bx24ast.py outbox retry sends them again"))
    if pending and (pending >= backlog_warning or (oldest and now - oldest > age_warning)):
        level = "WARNING" if level == "OK" else level
        problems.append(say("%d request(s) waiting, the oldest for %s", pending, Span(now - oldest)))
        advice.append(say("is Bitrix24 reachable? (see the bitrix24 check)"))
    if stale:
        level = "WARNING" if level == "OK" else level
        problems.append(say("%d call(s) registered over %s ago and never finished (%s)",
                            len(stale), Span(longest_call), ", ".join(r["linkedid"] for r in stale[:5])))
        advice.append(say("their end reached neither AMI nor CEL: is CEL enabled? (bx24ast.py detect)"))
    if uncertain:
        level = "WARNING" if level == "OK" else level
        problems.append(say("%d call(s) in the last 24 h finished with uncertain values (%s: %s)",
                            len(uncertain), uncertain[-1]["linkedid"], uncertain[-1]["uncertain"]))
        advice.append(say("enable CEL so that calls whose end bx24ast missed are finished as Asterisk recorded them"))
    if not problems:
        return CheckResult("OK", "outbox", say("%d waiting, nothing given up", pending))
    return CheckResult(level, "outbox", said_join("; ", problems), said_join("; ", advice))


def check_storage(beat, now=None):
    """What the daemon says of its state database: failed writes, events held in
    memory, a disk about full. None when the daemon does not run."""
    now = time.time() if now is None else now
    if beat is None or beat.get("stopped_at") or "storage" not in beat:
        return None
    st = beat["storage"]
    free = "" if st.get("free_mb") is None else say(", %s MB free", st["free_mb"])
    if st.get("error") or st.get("unsaved_events"):
        return CheckResult("CRITICAL", "storage", say("writing the state database fails since %s ago: %s; %d call "
                                                      "event(s) held in memory%s", Span(now - (st.get("since") or now)),
                                                      st.get("error") or "?", st.get("unsaved_events") or 0, free),
                           say("free disk space under [storage] state_dir (df -h); nothing is lost while "
                               "the daemon runs"))
    if st.get("low_since"):
        return CheckResult("CRITICAL", "storage", say("the disk of the state database is almost full%s (the %s MB "
                                                      "reserve is used up)", free, st.get("reserve_mb")),
                           say("free disk space under [storage] state_dir (df -h) before writes fail"))
    return CheckResult("OK", "storage", say("state database writable%s", free))


def check_hooks(config, beat):
    """The hooks file as the running daemon loaded it, and hooks that failed; None
    without a hooks file or a running daemon."""
    if not config.get("hooks", "file") or beat is None or beat.get("stopped_at") or not beat.get("hooks"):
        return None
    hooks = beat["hooks"]
    if hooks.get("load_error"):
        return CheckResult("WARNING", "hooks", say("%s cannot be loaded (%s): calls are reported as if there were no hooks",
                                                   hooks.get("file"), hooks["load_error"]),
                           say("fix the file, then systemctl reload bx24ast; try it with bx24ast hooks test CAPTURE"))
    failed = sorted((name, n) for name, n in (hooks.get("errors") or {}).items() if n)
    if failed:
        return CheckResult("WARNING", "hooks", said_join(", ", (say("%s failed %d time(s) since the start (the calls "
                                                                     "went on without it)", name, n)
                                                                 for name, n in failed)),
                           say("the log says why, once per hook (grep 'hooks:'); bx24ast hooks test CAPTURE replays "
                               "a call through them"))
    return CheckResult("OK", "hooks", say("%s: %s loaded", hooks.get("file"), ", ".join(hooks.get("loaded") or []) or "-"))


def check_cel(config, now=None, pbx=""):
    """CEL of [cel], or [cel:NAME] of another PBX."""
    section = "cel:%s" % pbx if pbx else "cel"
    try:
        source = open_cel_source(config, section=section)
    except CelError as exc:
        return CheckResult("CRITICAL", "cel", said_of(exc), say("fix [%s] (bx24ast.py detect shows what was found)",
                                                                 section))
    if source is None:
        why = say("off ([cel] backend = off)") if config.get(section, "backend") == "off" else say("no CEL store found")
        return CheckResult("WARNING", "cel", say("recovery %s: calls made while bx24ast is down are lost", why),
                           say("enable CEL in cel.conf (cel_sqlite3_custom or FreePBX's MySQL), then bx24ast.py detect"))
    level, message = cel_health(source, now)[0]
    advice = "" if level == "OK" else say("is cel.conf enabled with events=ALL? bx24ast.py detect")
    if pbx:
        message = say("%s: %s", pbx, message)
    return CheckResult(level, "cel", message, advice)


def check_listeners(config, beat):
    if beat is None or beat.get("stopped_at"):
        return None
    errors = beat.get("listener_errors") or []
    if errors:
        return CheckResult("CRITICAL", "listeners", "; ".join(errors), say("another program holds the port: change it "
                                                                           "in [routing]/[click_to_call] or stop that program"))
    listening = beat.get("listeners") or []
    if not listening:
        return None
    return CheckResult("OK", "listeners", said_join(", ", (say("%s on %s", l["name"].split(" (")[0], l["address"])
                                                           for l in listening)))


def run_checks(config, now=None, timeout=3.0, probe=True):
    """Every check, in the order an admin would look; [0] is the daemon. probe=False
    (cron, every minute): what the running service saw lately stands for a probe of
    the portal of its own."""
    state_dir = config.get("storage", "state_dir")
    daemon, beat, _dead = check_daemon(state_dir, now)
    results = [daemon, check_ami(beat)]
    results.extend(check_ami(beat, pbx) for pbx in ((beat or {}).get("pbxs") or [])[1:])
    results.extend([check_bitrix24(config, beat, timeout, probe=probe, now=now),
                    check_outbox(config, now, beat=beat), check_cel(config, now)])
    results.extend(check_cel(config, now, name) for name in config.names("ami")
                   if config.get("cel:%s" % name, "backend") != "off")
    storage = check_storage(beat, now)
    if storage is not None:
        results.append(storage)
    for extra in (check_listeners(config, beat), check_hooks(config, beat)):
        if extra is not None:
            results.append(extra)
    return results


def summarize(results):
    """(worst level, the first line of a Nagios plugin's output)."""
    worst = max((r.level for r in results), key=lambda level: (CHECK_EXIT[level] if level != "UNKNOWN" else 1.5))
    bad = [r for r in results if r.level != "OK"]
    if not bad:
        return worst, say("BX24AST OK - %d checks passed", len(results))
    return worst, say("BX24AST %s - %s", worst, said_join("; ", (say("%s: %s", r.name, r.message) for r in bad)))


def default_restart_command():
    if os.path.isdir("/run/systemd/system"):
        return ["systemctl", "restart", "bx24ast"]
    return ["/etc/init.d/bx24ast", "restart"]


###############################################################################
# Command line ################################################################
###############################################################################

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _load_config(args, required):
    path = args.config or DEFAULT_CONFIG_PATH
    if args.config is None and not required and not os.path.exists(path):
        return Config.defaults()
    return Config.load(path)


def display_params(value, users, default_user_id):
    """Request parameters as a support engineer reads them: placeholders that only
    the portal can fill are shown in angle brackets."""
    if isinstance(value, dict):
        kind = value.get("$")
        if kind is None:
            return collections.OrderedDict((k, display_params(v, users, default_user_id))
                                           for k, v in value.items() if k != "check")
        if kind == "call_id":
            return "<CALL_ID from register>"
        if kind == "user":
            return users.user_for(value["ext"]) or "<user of extension %s, else %s>" % (
                value["ext"], default_user_id or "none")
        if kind == "responsible":
            return "<CRM owner, else %s>" % (users.user_for(value.get("ext")) or "user of extension %s, else %s"
                                             % (value.get("ext"), default_user_id or "none"))
        if kind == "crm_binding":
            return "<CRM entity of the call>"
        if kind == "recording":
            return value["name"] or "<recording named after channels %s>" % ", ".join(value.get("uniqueids") or [])
    if isinstance(value, list):
        return [display_params(v, users, default_user_id) for v in value]
    return value


def cmd_replay(args):
    config = _load_config(args, required=False)
    rules = PbxRules.from_config(config)
    out = sys.stdout
    results = []
    crm = None
    if args.dry_run:
        store = StateStore(":memory:")
        outbox = Outbox(store)
        crm = CrmFlows(config, outbox, CallRecords(store), rules)
        users = UserDirectory(None, config.maps["users"], config.get("crm", "default_user_id"))

    def on_call_event(kind, call, extension):
        if crm is not None:
            crm.on_call_event(kind, call, extension)
        if kind == "ended" and is_reportable(call, rules, args.include_internal):
            results.append(call)
            flush()

    def flush():
        for call in results:
            row = call.as_dict(rules.number_plan)
            if not timed["value"]:
                for key in ("started_at", "answered_at", "ended_at", "billsec"):
                    row[key] = None
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            if crm is not None:
                for req in outbox.requests_of(call.linkedid):
                    params = display_params(req.params, users, config.get("crm", "default_user_id"))
                    out.write(json.dumps(collections.OrderedDict([
                        ("linkedid", call.linkedid), ("method", req.method), ("params", params)]),
                        ensure_ascii=False) + "\n")
        del results[:]

    probe = Capture(args.capture)
    # Times come from the sidecar, else from Timestamp headers (timestampevents = yes).
    timed = {"value": bool(probe.sidecar_path) or (os.path.exists(probe.path)
                                                  and b"\r\nTimestamp: " in probe.read())}
    tracker = CallTracker(rules, on_call_event)
    capture = Capture(args.capture)
    if not os.path.exists(capture.path):
        sys.stderr.write("bx24ast: replay: no capture at %s\n" % capture.path)
        return EXIT_FAILURE
    replay_capture(capture, tracker)
    if tracker.calls:
        sys.stderr.write("bx24ast: replay: %d call(s) still in progress at the end of the capture\n"
                         % len(tracker.calls))
    return EXIT_OK


def describe_change(before, after):
    """What a hook changed, in one line: KEY old -> new for dicts."""
    if after is False:
        return "not sent"
    if isinstance(before, dict) and isinstance(after, dict):
        parts = []
        for key in list(before) + [k for k in after if k not in before]:
            if key not in after:
                parts.append("%s removed" % key)
            elif key not in before:
                parts.append("%s = %s added" % (key, json.dumps(after[key], ensure_ascii=False)))
            elif before[key] != after[key]:
                parts.append("%s %s -> %s" % (key, json.dumps(before[key], ensure_ascii=False),
                                              json.dumps(after[key], ensure_ascii=False)))
        return "; ".join(parts) or "unchanged"
    return "%s -> %s" % (json.dumps(before, ensure_ascii=False), json.dumps(after, ensure_ascii=False))


def cmd_hooks(args):
    """hooks test CAPTURE: the capture's calls through the hooks, and what they changed."""
    config = _load_config(args, required=False)
    path = args.hooks or config.get("hooks", "file")
    if not path:
        sys.stderr.write("bx24ast: hooks test: no hooks file ([hooks] file is empty; give --hooks FILE)\n")
        return EXIT_CONFIG
    hooks = Hooks(path, config.get("hooks", "timeout_ms") / 1000.0)
    if hooks.load_error:
        sys.stderr.write("bx24ast: hooks test: %s cannot be loaded: %s\n" % (path, hooks.load_error))
        return EXIT_FAILURE
    capture = Capture(args.capture)
    if not os.path.exists(capture.path):
        sys.stderr.write("bx24ast: hooks test: no capture at %s\n" % capture.path)
        return EXIT_FAILURE
    hooks.journal = []
    rules = PbxRules.from_config(config)
    store = StateStore(":memory:")
    outbox, records = Outbox(store), CallRecords(store)
    crm = CrmFlows(config, outbox, records, rules, hooks=hooks)
    default_user = config.get("crm", "default_user_id")
    users = UserDirectory(None, config.maps["users"], default_user)
    beside = os.path.join(os.path.dirname(capture.path), "recordings")
    rec = config.section("recordings")
    recordings = RecordingFiles(beside if os.path.isdir(beside) else rec["path"], 0)
    sender = OutboxSender(outbox, records, None, users, recordings, default_user, hooks=hooks)
    click = ClickToCall(None, users, store, None, rules, config.section("click_to_call"), hooks=hooks)
    lookup = ResponsibleLookup(None, users, rules, hooks=hooks)
    calls = collections.OrderedDict()

    def on_call_event(kind, call, extension):
        calls.setdefault(call.linkedid, call)
        crm.on_call_event(kind, call, extension)

    replay_capture(capture, CallTracker(rules, on_call_event))
    for req in outbox.listing(("pending",)):
        # what the sender would do, with the portal's answers made up
        try:
            params = sender.prepared(req)
        except (Unresolved, NotReady) as exc:
            hooks.journal.append((req.method, None, "not sent here: %s" % exc, {"linkedid": req.linkedid}))
            continue
        except HookSkipped:
            continue
        facts = sender.facts(records.get(req.linkedid), req.linkedid)
        if req.kind == "register":
            answer = {"CALL_ID": "<CALL_ID of %s>" % req.linkedid, "CRM_ENTITY_TYPE": "", "CRM_ENTITY_ID": None,
                      "CRM_CREATED_ENTITIES": []}
            records.update(req.linkedid, call_id=answer["CALL_ID"])
            hooks.follow_ups("post_registration", answer, facts)
        elif req.kind == "finish":
            hooks.follow_ups("post_finish", dict(params, CRM_ACTIVITY_ID=None), facts)
        elif req.kind == "record":
            spec = req.params["FILENAME"]
            name = spec.get("name") or recordings.find_for_call(spec.get("uniqueids") or [], spec.get("started_at"))
            found = recordings.locate(name, spec.get("started_at")) if name else None
            hooks.call("process_record_file_path", found, (found, facts), sender.a_recording)
    for linkedid, call in calls.items():
        # routing and click-to-call do not happen in a capture: asked as they would be
        mark = len(hooks.journal)
        number = crm.client_number(call) if call.direction in ("inbound", "outbound") else None
        if call.direction == "inbound":
            lookup.customized(lookup.answer("NOT_FOUND", number or ""), call.did)
        elif call.direction == "outbound" and call.placer and number:
            click.originate_params("<CALL_ID>", users.user_for(call.placer) or default_user, call.placer, number,
                                   "a click (made up)")
        hooks.journal[mark:] = [(n, b, a, {"linkedid": linkedid}) for n, b, a, _c in hooks.journal[mark:]]
    out = sys.stdout
    by_call = collections.OrderedDict((lid, []) for lid in calls)
    for name, before, after, context in hooks.journal:
        linkedid = context.get("linkedid") if isinstance(context, dict) else None
        by_call.setdefault(linkedid, []).append((name, before, after))
    for linkedid, changes in by_call.items():
        call = calls.get(linkedid)
        title = "call %s" % linkedid if call is None else "call %s: %s %s%s" % (
            linkedid, call.direction, rules.number_plan.normalize(call.external_number) or "-",
            " to %s" % call.did if call.did and call.direction == "inbound" else "")
        out.write(title + "\n")
        for name, before, after in changes:
            if name == "need_registration":
                text = "the call is not reported"
            else:
                text = after if before is None else describe_change(before, after)
            out.write("  %s: %s\n" % (name, text))
        if not changes:
            out.write("  no hook changed anything\n")
    for name, count in sorted(hooks.errors.items()):
        out.write("hook %s failed %d time(s); see the log lines above\n" % (name, count))
    return EXIT_FAILURE if hooks.errors else EXIT_OK


def cmd_record_ami(args):
    config = _load_config(args, required=True)
    ami = config.section("ami")
    config.require("ami", "username", "record-ami logs in to AMI")
    writer = CaptureWriter(args.output)
    lost = threading.Event()
    conn = AmiConnection(ami["host"], ami["port"], ami["username"], ami["secret"],
                         lambda msg: None, auth=ami["auth"],
                         connect_timeout=ami["connect_timeout"], ping_interval=ami["ping_interval"],
                         max_message_bytes=ami["max_message_bytes"], raw_tap=writer.write,
                         on_disconnect=lost.set, wanted_events=frozenset())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    conn.start()
    deadline = monotonic() + args.seconds if args.seconds else None
    sys.stderr.write("bx24ast: recording AMI from %s:%s into %s (Ctrl-C stops)\n"
                     % (ami["host"], ami["port"], args.output))
    try:
        while not stop.is_set() and not lost.is_set():
            if deadline is not None and monotonic() >= deadline:
                break
            stop.wait(0.2)
    finally:
        conn.stop()
        writer.close()
    if lost.is_set() and not stop.is_set():
        sys.stderr.write("bx24ast: record-ami: the AMI connection was lost; capture ends here\n")
    return EXIT_OK


def cmd_run(args):
    def load():
        config = _load_config(args, required=True)
        if not config.get("wizard", "listen"):
            config.require("ami", "username", "bx24ast logs in to AMI with it")
        return config

    config = load()
    setup_logging(args.log_level or config.get("log", "level"),
                  "" if args.foreground else config.get("log", "file"))
    lock = InstanceLock(config.get("storage", "state_dir")).acquire()
    try:
        daemon = Daemon(config)
        while True:
            daemon.config_loader = load
            signal.signal(signal.SIGTERM, daemon.stop)
            signal.signal(signal.SIGINT, daemon.stop)
            signal.signal(signal.SIGHUP, daemon.request_reload)
            daemon.run()
            if daemon.next_config is None:
                return EXIT_OK
            config = daemon.next_config
            setup_logging(args.log_level or config.get("log", "level"),
                          "" if args.foreground else config.get("log", "file"))
            if daemon.bridge is not None:
                daemon.bridge.store.close()
            try:
                daemon = Daemon(config)
            except ConfigError as exc:
                log.error("SIGHUP: %s; going on with the previous configuration", exc)
                daemon = Daemon(daemon.config)
    finally:
        lock.release()


def cmd_outbox(args):
    config = _load_config(args, required=True)
    store = StateStore.open_dir(config.get("storage", "state_dir"))
    outbox = Outbox(store)
    if args.action == "retry":
        count = outbox.retry_parked(args.id)
        sys.stdout.write("%d parked request(s) will be sent again by the running service\n" % count)
        return EXIT_OK
    rows = outbox.listing()
    counts = outbox.counts()
    sys.stdout.write("pending %d, parked %d, done %d\n" % (counts.get("pending", 0), counts.get("parked", 0),
                                                          counts.get("done", 0)))
    for req in rows:
        sys.stdout.write("#%d %-7s call %s %s attempts=%d%s\n" % (
            req.id, req.state, req.linkedid, req.method, req.attempts,
            (" error: %s" % req.last_error) if req.last_error else ""))
    return EXIT_OK


def cmd_oauth_code(args):
    config = _load_config(args, required=True)
    config.require("bitrix24", "client_id", "oauth-code is for a local application")
    config.require("bitrix24", "portal_url", "oauth-code is for a local application")
    store = StateStore.open_dir(config.get("storage", "state_dir"))
    client = BitrixClient.from_config(config, store)
    try:
        tokens = client.exchange_code(args.code)
    except BitrixError as exc:
        sys.stderr.write("bx24ast: %s\n" % exc)
        return EXIT_FAILURE
    sys.stdout.write("tokens saved for %s (member %s)\n" % (tokens.get("domain"), tokens.get("member_id")))
    return EXIT_OK


NEEDS_LOCAL_APPLICATION = (
    "bx24ast: the portal refuses event.bind to an inbound webhook: events can only be bound by a "
    "local application ([bitrix24] portal_url, client_id, client_secret; bx24ast.py oauth-code). "
    "For port mode with a webhook, create an outbound webhook in the portal for ONEXTERNALCALLSTART "
    "and ONEXTERNALCALLBACKSTART with [click_to_call] public_url as its handler, and put its token "
    "into [click_to_call] application_token (then bind-events is not needed).\n")


def cmd_bind_events(args):
    config = _load_config(args, required=True)
    if not BitrixClient.configured(config):
        raise ConfigError("bind-events needs [bitrix24] portal_url + client_id (a local application)",
                          section="bitrix24", key="portal_url", value="")
    store = StateStore.open_dir(config.get("storage", "state_dir"))
    try:
        client = BitrixClient.from_config(config, store)
        bound = bind_events(client, config, unbind=args.unbind)
    except BitrixError as exc:
        sys.stderr.write("bx24ast: %s\n" % exc)
        if exc.code == "WRONG_AUTH_TYPE" or (exc.code == "ACCESS_DENIED" and not client.uses_oauth) or \
                "application context" in str(exc).lower():
            sys.stderr.write(NEEDS_LOCAL_APPLICATION)
        return EXIT_FAILURE
    finally:
        store.close()
    mine = [b for b in bound or [] if isinstance(b, dict) and str(b.get("event", "")).upper() in
            ("ONEXTERNALCALLSTART", "ONEXTERNALCALLBACKSTART")]
    sys.stdout.write("%s; bound on the portal now:\n" % ("unbound" if args.unbind else "bound"))
    for b in mine:
        sys.stdout.write("  %s -> %s\n" % (str(b.get("event")).upper(),
                                            "offline queue (event.offline.get)" if str(b.get("offline")) == "1"
                                            else b.get("handler")))
    if not mine:
        sys.stdout.write("  (no click-to-call events)\n")
    return EXIT_OK


def cmd_check(args):
    try:
        config = _load_config(args, required=True)
    except ConfigError as exc:
        sys.stdout.write("BX24AST UNKNOWN - configuration: %s\n" % exc)
        return CHECK_EXIT["UNKNOWN"]
    _Logger.level = "error"   # the lines below are the output
    results = run_checks(config, timeout=args.timeout, probe=not args.cron)
    worst, summary = summarize(results)
    actions = []
    if args.cron:
        _, _, dead = check_daemon(config.get("storage", "state_dir"))
        if dead:
            command = shlex.split(args.restart_command) if args.restart_command else default_restart_command()
            try:
                proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
                output = proc.communicate(timeout=60)[0].decode("utf-8", "replace").strip()
                actions.append("restarted the service: %s (exit %d)%s" % (" ".join(command), proc.returncode,
                                                                       ": " + output if output else ""))
            except (OSError, subprocess.TimeoutExpired) as exc:
                actions.append("could not restart the service with %s: %s" % (" ".join(command), exc))
        if worst == "OK" and not actions:
            return CHECK_EXIT["OK"]  # cron mails whatever is printed: print nothing
    sys.stdout.write(summary + "\n")
    for r in results:
        sys.stdout.write(r.line() + "\n")
    for action in actions:
        sys.stdout.write("ACTION %s\n" % action)
    return CHECK_EXIT[worst]


def cmd_set_password(args):
    """The wizard login: the password comes on stdin (never on a command line), only
    its hash reaches the file."""
    path = args.config or DEFAULT_CONFIG_PATH
    password = sys.stdin.readline().rstrip("\r\n")
    try:
        hashed = hash_password(password)
    except ValueError as exc:
        sys.stderr.write("bx24ast: %s\n" % exc)
        return EXIT_CONFIG
    update_config_file(path, {("wizard", "user"): args.user, ("wizard", "password_hash"): hashed})
    sys.stdout.write("wizard login %s saved in %s (password stored as a PBKDF2 hash)\n" % (args.user, path))
    return EXIT_OK


def cmd_set(args):
    """section.key=value pairs into the configuration file, validated, atomically."""
    path = args.config or DEFAULT_CONFIG_PATH
    updates = collections.OrderedDict()
    for item in args.assignments:
        name, sep, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot or not section or not key:
            raise ConfigError("%r: expected section.key=value, e.g. ami.port=5038" % item)
        updates[(section.strip(), key.strip())] = value.strip()
    update_config_file(path, updates)
    sys.stdout.write("%s: %s\n" % (path, ", ".join("[%s] %s" % k for k in updates)))
    return EXIT_OK


def cmd_detect(args):
    config = _load_config(args, required=False)
    found, warnings = detect_cel(args.root, None if args.root != "/" else config.get("cel", "asterisk_etc"))
    for line in describe_detection(found, warnings):
        sys.stdout.write(line + "\n")
    if found:
        source = open_cel_source(Config.from_text(
            "[cel]\nbackend = %s\n%s" % (found[0]["backend"], "".join(
                "%s = %s\n" % kv for kv in found[0]["settings"].items()))))
        for level, message in cel_health(source):
            sys.stdout.write("%s: %s\n" % (level, message))
    learned = detect_endpoints(config) if config.get("ami", "username") else None
    return EXIT_OK if found or learned else EXIT_FAILURE


def learn_endpoints(config):
    """What PBX discovery learns from this Asterisk: ([Endpoint], None) or (None, why not)."""
    ami = config.section("ami")
    conn = AmiConnection(ami["host"], ami["port"], ami["username"], ami["secret"], lambda msg: None,
                         auth=ami["auth"], connect_timeout=ami["connect_timeout"],
                         reconnect_max_delay=ami["reconnect_max_delay"], wanted_events=frozenset())
    conn.start()
    try:
        if not conn.connected.wait(ami["connect_timeout"] + 2):
            return None, say("AMI %s:%s not reachable (%s)", ami["host"], ami["port"],
                             conn.last_error or say("no answer"))
        return PbxDiscovery(conn, PbxRules.from_config(config), 0).discover(), None
    except AmiError as exc:
        return None, said_of(exc)
    finally:
        conn.stop()


def detect_endpoints(config, out=None):
    """`detect`: the trunks and phones Asterisk has, and why each is one; None if AMI failed."""
    out = out or sys.stdout
    ami = config.section("ami")
    learned, error = learn_endpoints(config)
    if learned is None:
        out.write("PBX endpoints: %s\n" % error)
        return None
    out.write("PBX endpoints (asked of Asterisk at %s:%s): %d\n" % (ami["host"], ami["port"], len(learned)))
    for e in learned:
        out.write("  %-7s %-32s %s\n" % (e.kind or "?", e.device, e.why))
    if not learned:
        out.write("  none listed (no PJSIP/SIP/IAX2 endpoints, or the AMI user may not list them)\n")
    return learned


def parse_since(text):
    """Epoch seconds from "YYYY-MM-DD HH:MM[:SS]" (local time, as an admin types it) or
    ISO 8601 with a T and/or a zone (then that zone; fractions allowed)."""
    text = (text or "").strip()
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"):
        try:
            return time.mktime(time.strptime(text, fmt))
        except ValueError:
            pass
    m = re.match(r"^(\d{4}-\d\d-\d\d)T(\d\d:\d\d)(:\d\d(?:\.\d+)?)?$", text)
    if m:  # ISO 8601 without a zone: local time
        seconds = float((m.group(3) or ":0")[1:])
        return time.mktime(time.strptime("%s %s" % (m.group(1), m.group(2)), "%Y-%m-%d %H:%M")) + seconds
    m = re.match(r"^(\d{4}-\d\d-\d\d[T ]\d\d:\d\d)(\s*(?:Z|[+-]\d\d:?\d\d))$", text)
    if m:
        text = m.group(1) + ":00" + m.group(2).strip()
    return parse_iso_time(text)


def cmd_recover(args):
    config = _load_config(args, required=True)
    try:
        since = parse_since(args.since)
    except ValueError:
        sys.stderr.write("bx24ast: recover: --since %r is not a time: use \"YYYY-MM-DD HH:MM[:SS]\" "
                         "(local time) or ISO 8601 with a zone (2026-12-02T03:28:00+03:00)\n" % args.since)
        return EXIT_CONFIG
    source = open_cel_source(config)
    if source is None:
        sys.stderr.write("bx24ast: recover: no CEL store ([cel] backend, or bx24ast.py detect)\n")
        return EXIT_FAILURE
    rules = PbxRules.from_config(config)
    rec = config.section("recordings")
    recordings = RecordingFiles(rec["path"], rec["settle_seconds"])
    crm = None
    store = StateStore(":memory:") if args.dry_run else StateStore.open_dir(config.get("storage", "state_dir"))
    if not args.dry_run:
        crm = CrmFlows(config, Outbox(store), CallRecords(store), rules)
    records = CallRecords(store)
    recovery = CelRecovery(source, store, rules, crm, recordings)

    def report(call):
        row = call.as_dict(rules.number_plan)
        row["already_reported"] = records.registered(call.linkedid)
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    try:
        found = recovery.run_once(since=since, dry_run=args.dry_run, report=report)
    except CelError as exc:
        sys.stderr.write("bx24ast: recover: %s\n" % exc)
        return EXIT_FAILURE
    sys.stderr.write("bx24ast: %d call(s) found in CEL%s\n" % (
        found, " (dry run: nothing sent)" if args.dry_run else "; the running service sends them"))
    return EXIT_OK


def cmd_check_config(args):
    config = _load_config(args, required=True)
    sys.stdout.write("%s: OK\n" % config.path)
    return EXIT_OK


def cmd_example_config(args):
    sys.stdout.write(example_config_text())
    return EXIT_OK


def _arg(*names, **options):
    return names, options


# name, help, handler, its arguments: the parser is built for the one command asked
# for (argparse spends ~10 ms building all of them, every minute from cron).
COMMANDS = (
    ("run", "connect to AMI and report calls (service mode)", "cmd_run",
     [_arg("-f", "--foreground", action="store_true", help="log to stderr, not the log file")]),
    ("replay", "print the calls in an AMI capture as JSON lines", "cmd_replay",
     [_arg("capture", help="a capture directory (with ami.log) or an ami.log file"),
      _arg("--include-internal", action="store_true", help="also print internal calls"),
      _arg("--dry-run", action="store_true", help="after each call, print the Bitrix24 requests that would be sent")]),
    ("hooks", "replay a capture through the hooks file and print what each hook changed", "cmd_hooks",
     [_arg("action", choices=["test"]), _arg("capture", help="a capture directory (with ami.log) or an ami.log file"),
      _arg("--hooks", default="", help="the hooks file (default: [hooks] file)")]),
    ("outbox", "show or retry the requests waiting for Bitrix24", "cmd_outbox",
     [_arg("action", choices=["list", "retry"]), _arg("--id", type=int, help="retry only this request")]),
    ("oauth-code", "get the local application's first tokens from an authorization code", "cmd_oauth_code",
     [_arg("code")]),
    ("bind-events", "bind click-to-call events on the portal ([click_to_call] mode) and print the bindings",
     "cmd_bind_events", [_arg("--unbind", action="store_true", help="remove the bindings instead")]),
    ("record-ami", "record the raw AMI stream with its timing sidecar", "cmd_record_ami",
     [_arg("-o", "--output", required=True, help="file to write (ami.log)"),
      _arg("--seconds", type=float, default=0, help="stop after this many seconds")]),
    ("detect", "find the CEL store (FreePBX, ODBC, sqlite) and check its health; list the trunks and phones "
     "Asterisk has", "cmd_detect", [_arg("--root", default="/", help="look in this tree instead of / (for tests)")]),
    ("recover", "report calls found in CEL since a time (missed while down)", "cmd_recover",
     [_arg("--since", required=True,
           help='"YYYY-MM-DD HH:MM[:SS]" local time, or ISO 8601 (2026-12-02T03:28:00+03:00)'),
      _arg("--dry-run", action="store_true", help="only print the calls")]),
    ("check", "health of the service, AMI, Bitrix24, outbox and CEL (Nagios plugin exit codes: 0 OK, "
     "1 WARNING, 2 CRITICAL, 3 UNKNOWN)", "cmd_check",
     [_arg("--cron", action="store_true",
           help="print nothing when all is OK; restart the service when it died or hangs"),
      _arg("--restart-command", default="",
           help="how --cron restarts the service (default: systemctl restart bx24ast, or the init script)"),
      _arg("--timeout", type=float, default=3.0, help="seconds for the Bitrix24 request")]),
    ("set-password", "set the wizard login; the password is read from stdin and only its salted hash is stored",
     "cmd_set_password", [_arg("--user", default="admin")]),
    ("set", "set configuration keys: section.key=value ... (validated, written atomically)", "cmd_set",
     [_arg("assignments", nargs="+")]),
    ("check-config", "validate the configuration file", "cmd_check_config", []),
    ("example-config", "print a configuration with every key and its default", "cmd_example_config", []),
)
_GLOBAL_WITH_VALUE = ("-c", "--config", "--log-level")


def command_in(argv):
    """The command named in argv (global options may come before it), else None."""
    names = set(c[0] for c in COMMANDS)
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in _GLOBAL_WITH_VALUE:
            skip = True
        elif not token.startswith("-"):
            return token if token in names else None
    return None


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, but it asks the terminal its width itself: argparse imports shutil
    (and with it bz2, lzma) for that at every add_argument, help printed or not."""

    def __init__(self, prog):
        try:
            width = os.get_terminal_size().columns
        except OSError:
            width = 80
        argparse.HelpFormatter.__init__(self, prog, width=max(width - 2, 40))


def build_arg_parser(only=None):
    """The whole command line, or only the command `only` (what main() parses with)."""
    parser = argparse.ArgumentParser(
        prog="bx24ast.py", description="Asterisk <-> Bitrix24 telephony bridge.", formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version="bx24ast %s" % __version__)
    # The global options, before the command or after it (bx24ast.py run -c FILE):
    # SUPPRESS keeps a command's parser from resetting what was given before it.
    common = argparse.ArgumentParser(add_help=False, formatter_class=_HelpFormatter)
    for target, default in ((parser, None), (common, argparse.SUPPRESS)):
        target.add_argument("-c", "--config", default=default,
                            help="configuration file (default %s)" % DEFAULT_CONFIG_PATH)
        target.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=default)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text, handler, arguments in COMMANDS:
        if only is not None and name != only:
            continue
        p = commands.add_parser(name, parents=[common], help=text, formatter_class=_HelpFormatter)
        for names, options in arguments:
            p.add_argument(*names, **options)
        p.set_defaults(func=globals()[handler])
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_arg_parser(command_in(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    _Logger.level = args.log_level or "info"   # set up at the first log line
    try:
        return args.func(args)
    except ConfigError as exc:
        sys.stderr.write("bx24ast: configuration error: %s\n" % exc)
        return EXIT_CONFIG
    except (StorageError, CelError) as exc:
        sys.stderr.write("bx24ast: %s\n" % exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
