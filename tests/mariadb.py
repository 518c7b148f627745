"""A private MariaDB server for tests: its own datadir, socket and ephemeral port
in a temp dir, started and stopped by the test session. .ci/run installs the
Debian packages; elsewhere the tests that need it are skipped with the reason."""
import os
import shutil
import socket
import subprocess
import tempfile
import time

FREEPBX_CEL_SCHEMA = """
CREATE TABLE `%s` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `eventtype` varchar(30) NOT NULL, `eventtime` datetime NOT NULL,
  `cid_name` varchar(80) NOT NULL, `cid_num` varchar(80) NOT NULL, `cid_ani` varchar(80) NOT NULL,
  `cid_rdnis` varchar(80) NOT NULL, `cid_dnid` varchar(80) NOT NULL, `exten` varchar(80) NOT NULL,
  `context` varchar(80) NOT NULL, `channame` varchar(80) NOT NULL, `appname` varchar(80) NOT NULL,
  `appdata` varchar(255) NOT NULL, `amaflags` int(11) NOT NULL, `accountcode` varchar(20) NOT NULL,
  `uniqueid` varchar(32) NOT NULL, `linkedid` varchar(32) NOT NULL, `peer` varchar(80) NOT NULL,
  `userdeftype` varchar(255) NOT NULL, `extra` varchar(512) NOT NULL,
  PRIMARY KEY (`id`), KEY `uniqueid_index` (`uniqueid`), KEY `linkedid_index` (`linkedid`)
) DEFAULT CHARSET=utf8mb4
"""


def binaries():
    server = shutil.which("mariadbd") or shutil.which("mysqld") or (
        "/usr/sbin/mariadbd" if os.path.exists("/usr/sbin/mariadbd") else None)
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    client = shutil.which("mysql") or shutil.which("mariadb")
    return server, install, client


class MariaDB(object):
    def __init__(self):
        self.server, self.install, self.client = binaries()
        self.dir = tempfile.mkdtemp(prefix="bx24ast-mariadb-")
        self.socket = os.path.join(self.dir, "mysqld.sock")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.proc = None

    def start(self):
        data = os.path.join(self.dir, "data")
        subprocess.check_call([self.install, "--no-defaults", "--datadir=" + data, "--user=root",
                               "--auth-root-authentication-method=normal", "--skip-test-db"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen([self.server, "--no-defaults", "--datadir=" + data, "--user=root",
                                      "--socket=" + self.socket, "--port=%d" % self.port,
                                      "--bind-address=127.0.0.1", "--skip-name-resolve",
                                      "--pid-file=" + os.path.join(self.dir, "pid"),
                                      "--innodb-buffer-pool-size=64M", "--skip-log-bin"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mariadbd exited: %s" % open(os.path.join(self.dir, "server.log")).read()[-800:])
            if os.path.exists(self.socket) and self.sql("SELECT 1", check=False) == "1":
                return self
            time.sleep(0.2)
        raise RuntimeError("mariadbd did not start in 60 s")

    def sql(self, statement, database=None, check=True):
        cmd = [self.client, "--no-defaults", "--user=root", "--socket=" + self.socket, "--batch",
               "--skip-column-names", "--execute=" + statement]
        if database:
            cmd.append("--database=" + database)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        if check and proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        return proc.stdout.strip()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
