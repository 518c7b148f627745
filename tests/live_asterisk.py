"""A real, private Asterisk for the live tests: 22.10.1 (PJSIP) and 16.30.1 (chan_sip).

The prebuilt bundles and run-asterisk.sh live outside the repo (../shared/asterisk/, or
the directory named by BX24AST_ASTERISK_BUNDLES). Each instance runs in its own temp
directory with the office dialplan of tests/live/, AMI on an ephemeral loopback port,
SIP on loopback only, CEL in sqlite; stop() ends it by its pid even when a test failed.
Calls are driven like the lab that recorded the fixtures: the handsets and the PSTN are
Local channels in simulation contexts whose behaviour the test sets in AstDB.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIVE_CONF = os.path.join(HERE, "live")
VERSIONS = ("22.10.1", "16.30.1")


def bundle_dir():
    """Where run-asterisk.sh and the tarballs are, or None."""
    for d in (os.environ.get("BX24AST_ASTERISK_BUNDLES"), os.path.join(ROOT, "..", "shared", "asterisk")):
        if d and os.path.isfile(os.path.join(d, "run-asterisk.sh")):
            return os.path.abspath(d)
    return None


def missing_reason(version):
    """Why a live Asterisk cannot run here, or None."""
    d = bundle_dir()
    if d is None:
        return "no Asterisk bundles (../shared/asterisk/ or BX24AST_ASTERISK_BUNDLES)"
    if not os.path.isfile(os.path.join(d, "asterisk-%s-bookworm-amd64.tar.xz" % version)):
        return "no bundle for Asterisk %s in %s" % (version, d)
    for lib in ("libjansson.so.4", "libxslt.so.1", "libedit.so.2"):
        if not any(os.path.exists(os.path.join(p, lib)) for p in
                   ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib")):
            return "Asterisk runtime library %s missing (apt-get install libjansson4 libxslt1.1 libedit2 ...)" % lib
    if not os.path.isdir("/usr/share/asterisk/sounds/en_US_f_Allison"):
        return "no Asterisk prompts (apt-get install asterisk-core-sounds-en-wav; transfers play them)"
    return None


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class AmiDriver(object):
    """A second, plain AMI client that drives the scenarios (the daemon has its own)."""

    def __init__(self, host, port, user, secret):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""
        self._readline()  # banner
        self.seq = 0
        reply = self.action("Login", Username=user, Secret=secret, Events="off")
        assert reply.get("Response") == "Success", reply

    def _readline(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("AMI closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def _message(self):
        msg = {}
        while True:
            line = self._readline()
            if not line:
                if msg:
                    return msg
                continue
            key, _, value = line.partition(": ")
            msg[key] = value

    def action(self, name, **headers):
        self.seq += 1
        aid = "drv-%d" % self.seq
        lines = ["Action: %s" % name, "ActionID: %s" % aid]
        for key, value in headers.items():
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                lines.append("%s: %s" % (key, v))
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while True:
            msg = self._message()
            if msg.get("ActionID") == aid and "Response" in msg:
                return msg

    def close(self):
        try:
            self.action("Logoff")
        except Exception:
            pass
        self.sock.close()


class LiveAsterisk(object):
    """One private instance: start(), drive with ami()/db()/originate()/cli(), stop()."""

    def __init__(self, version, extra_conf=None):
        self.version = version
        self.script = os.path.join(bundle_dir(), "run-asterisk.sh")
        # asterisk.ctl must stay under 100 characters: a short directory in /tmp.
        self.dir = tempfile.mkdtemp(prefix="bx24live-", dir="/tmp")
        self.port = free_port()
        self.pid = None
        self.extra_conf = extra_conf or {}
        self._driver = None

    @property
    def etc(self):
        return os.path.join(self.dir, "etc")

    @property
    def major(self):
        return int(self.version.split(".")[0])

    def start(self):
        os.makedirs(self.etc, exist_ok=True)
        for name in [n for n in os.listdir(LIVE_CONF) if n.endswith(".conf")]:
            shutil.copy(os.path.join(LIVE_CONF, name), os.path.join(self.etc, name))
        for name, text in self.extra_conf.items():
            with open(os.path.join(self.etc, name), "w") as f:
                f.write(text)
        env = dict(os.environ, AST_VERBOSE="1")
        env.setdefault("AST_BUNDLE_CACHE", os.path.join(tempfile.gettempdir(), "asterisk-bundles"))
        proc = subprocess.run([self.script, self.version, self.dir, str(self.port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError("run-asterisk.sh %s failed: %s" % (self.version, proc.stderr.decode()[-2000:]))
        self.pid = int(proc.stdout.decode().strip().splitlines()[-1])
        return self

    def env(self):
        values = {}
        with open(os.path.join(self.dir, "instance.env")) as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                values[key] = value
        return values

    def cli(self, command):
        out = subprocess.run([self.script, "cli", self.dir, command], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=30)
        return out.stdout.decode("utf-8", "replace")

    def ami(self):
        if self._driver is None:
            self._driver = AmiDriver("127.0.0.1", self.port, "test", "test")
        return self._driver

    def reset_driver(self):
        if self._driver is not None:
            try:
                self._driver.sock.close()
            except OSError:
                pass
            self._driver = None

    def db(self, family, key, value):
        reply = self.ami().action("DBPut", Family=family, Key=key, Val=value)
        assert reply.get("Response") == "Success", reply

    def originate(self, channel, callerid, context=None, exten=None, application=None, data=None,
                  variables=None, ids=None, **extra):
        headers = {"Channel": channel, "CallerID": callerid, "Async": "true"}
        headers.update(extra)
        if ids:
            headers["ChannelId"], headers["OtherChannelId"] = ids
        if application:
            headers.update(Application=application, Data=data or "")
        else:
            headers.update(Context=context, Exten=exten, Priority="1")
        if variables:
            headers["Variable"] = ["%s=%s" % kv for kv in variables.items()]
        reply = self.ami().action("Originate", **headers)
        assert reply.get("Response") == "Success", reply

    def channels(self):
        out = self.cli("core show channels concise")
        return [line for line in out.splitlines() if "!" in line]

    def channel_names(self):
        return [line.split("!")[0] for line in self.channels()]

    def wait_idle(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.channels():
                return True
            time.sleep(0.3)
        return False

    def cel_db(self):
        name = "cel.db" if self.major >= 20 else "master.db"
        return os.path.join(self.dir, "log", name)

    def monitor_dir(self):
        return os.path.join(self.dir, "spool", "monitor")

    def stop(self):
        self.reset_driver()
        if os.path.exists(os.path.join(self.dir, "instance.env")):
            subprocess.run([self.script, "stop", self.dir], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
