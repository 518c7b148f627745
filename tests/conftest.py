import glob
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, "fixtures")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import bx24ast  # noqa: E402


def scenario_dirs():
    """Every captured scenario: <fixtures>/asterisk-*/<scenario>/ with an expected.json."""
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(FIXTURES, "asterisk-*", "*", "expected.json")))


def scenario_id(path):
    return "%s/%s" % (os.path.basename(os.path.dirname(path)), os.path.basename(path))


def load_expected(path):
    with open(os.path.join(path, "expected.json"), encoding="utf-8") as f:
        return json.load(f)


def wait_for(cond, timeout=20.0):
    """Poll cond until it is true or timeout seconds pass; returns whether it became true."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def rules():
    return bx24ast.PbxRules.defaults()


@pytest.fixture(scope="session")
def mariadb():
    """A private MariaDB server (see tests/mariadb.py); skipped outside CI when absent."""
    from mariadb import MariaDB, binaries
    server, install, client = binaries()
    if not (server and install and client):
        if os.environ.get("CI"):
            pytest.fail("MariaDB is not installed: .ci/run must apt-get install mariadb-server mariadb-client")
        pytest.skip("MariaDB server/client not installed (apt-get install mariadb-server mariadb-client)")
    db = MariaDB().start()
    try:
        yield db
    finally:
        db.stop()
