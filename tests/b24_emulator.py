"""A Bitrix24 portal emulator following ../shared/docs/bitrix24-rest.md.

A real HTTP server on 127.0.0.1 (ephemeral port) that answers the REST methods
bx24ast uses: webhook and OAuth auth (expired_token, the OAuth refresh
endpoint, WRONG_AUTH_TYPE), the leaky-bucket limit (503 QUERY_LIMIT_EXCEEDED),
batch with $result[...] references, telephony.externalCall.* with CALL_ID
issuing and the 30-minute de-duplication, lead / contact+deal creation on
CRM_CREATE, attachRecord only after finish, tasks, users, offline events, and
a journal of every request. Outages (503, 500, timeouts) can be switched on.
"""
import base64
import collections
import json
import re
import socketserver
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit, unquote_plus


class ThreadingServer(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Fail(Exception):
    def __init__(self, status, error, description=""):
        Exception.__init__(self, description)
        self.status = status
        self.error = error
        self.description = description


def core(description):
    return Fail(400, "ERROR_CORE", description)


def php_parse(query):
    """PHP parse_str: a[b][0]=x -> {"a": {"b": ["x"]}}."""
    root = collections.OrderedDict()
    for key, value in parse_qsl(query, keep_blank_values=True):
        head = key.split("[", 1)[0]
        path = [head] + [p for p in re.findall(r"\[([^\]]*)\]", key)]
        node = root
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if part == "":
                part = str(len(node))
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, collections.OrderedDict())
    return _listify(root)


def _listify(node):
    if isinstance(node, dict):
        node = collections.OrderedDict((k, _listify(v)) for k, v in node.items())
        if node and all(k.isdigit() for k in node) and sorted(int(k) for k in node) == list(range(len(node))):
            return [node[str(i)] for i in range(len(node))]
    return node


def normalize_phone(number):
    """main/tools.php NormalizePhone($n, 1), as the doc (section 6) describes it."""
    n = str(number or "")
    if len(n) >= 10 and n.startswith("+8"):
        n = "008" + n[2:]
    n = re.sub(r"[^0-9#*]", "", n)
    if len(n) >= 10:
        if n[:2] in ("80", "81", "82"):
            pass
        elif n.startswith("00"):
            n = n[2:]
        elif n.startswith("011"):
            n = n[3:]
        elif n.startswith("8"):
            n = "7" + n[1:]
        elif n.startswith("0"):
            n = n[1:]
    return n


def strip_letters(number):
    return re.sub(r"[^0-9#*+,;]", "", str(number or ""))


def truthy_php(value):
    return value not in (None, 0, "0", "", False)


class Bitrix24Emulator(object):
    TELEPHONY_APP_ONLY = {"telephony.externalcall.register", "telephony.externalcall.finish",
                          "telephony.externalline.add", "telephony.externalline.get",
                          "telephony.externalline.update", "telephony.externalline.delete"}
    APP_ONLY = {"event.bind", "event.unbind", "event.offline.get", "event.offline.clear",
                "event.offline.list", "event.offline.error"}

    def __init__(self, rate=2.0, burst=50, simple_crm=False, refuse_webhook_telephony=False,
                 webhook_user=1, webhook_code="s3cr3tc0de", client_id="local.app1", client_secret="appsecret",
                 token_lifetime=3600, clock=time.monotonic, delay=0.0, reply_delay=0.0):
        self.rate = rate
        self.burst = burst
        self.simple_crm = simple_crm
        self.refuse_webhook_telephony = refuse_webhook_telephony
        self.webhook_user = webhook_user
        self.webhook_code = webhook_code
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_lifetime = token_lifetime
        self.clock = clock
        self.delay = delay                # before handling a request
        self.reply_delay = reply_delay    # after handling it, before answering (work done, no answer yet)
        self.lock = threading.RLock()
        self.level = 0.0
        self.level_at = clock()
        self.max_level = 0.0
        self.rejected_503 = 0
        self.journal = []
        self.outage = None            # None | ("503"|"500"|"timeout"|"html"|"hang"|"drop", until_monotonic)
        self.users = collections.OrderedDict()
        self.next_id = 100
        self.leads, self.contacts, self.companies, self.deals = {}, {}, {}, {}
        self.active_calls = collections.OrderedDict()
        self.stats = collections.OrderedDict()
        self.activities = []
        self.records = {}
        self.record_uploads = {}      # CALL_ID -> how many files were uploaded for it
        self.record_urls = {}         # CALL_ID -> the RECORD_URL the file was fetched from
        self.comments = collections.OrderedDict()
        self.tasks = collections.OrderedDict()
        self.lines = collections.OrderedDict()
        self.sources = ["CALL", "EMAIL", "WEB", "ADVERTISING", "PARTNER", "RECOMMENDATION", "TRADE_SHOW",
                        "WEBFORM", "CALLBACK", "RC_GENERATOR", "STORE", "OTHER"]
        self.tokens = {}              # access_token -> expires (monotonic)
        self.refresh_tokens = set()
        self.auth_codes = set()
        self.refreshes = 0
        self.uploads = {}
        self.bindings = []
        self.offline = collections.OrderedDict()
        self.reserved = {}
        self.failures = {}            # method -> how many next calls fail with a 500
        self.odd_answers = {}         # method -> [result answered instead of doing it, how many times]
        self.errors = {}              # method -> [HTTP status, error, description, how many times]
        # method -> [seconds before doing it, seconds before answering, how many requests]:
        # a slow portal (the work lands after the client gave up) or a lost answer
        self.slow = {}
        self.offline_extended = True  # the plan allows event.offline.get with clear=0
        self.scopes = ["crm", "telephony", "user", "task", "placement"]
        for uid, name, ext in ((1, "Admin", None), (5, "Ivan Petrov", "101"), (7, "Maria Sidorova", "102"),
                               (9, "Oleg Smirnov", "103")):
            self.add_user(uid, name, ext)
        self.server = ThreadingServer(("127.0.0.1", 0), self._handler_class())
        self.port = self.server.server_address[1]
        self.thread = None

    # -- set-up --------------------------------------------------------------------------
    def add_user(self, uid, name, ext=None, active=True):
        first, _, last = name.partition(" ")
        self.users[uid] = {"ID": str(uid), "ACTIVE": active, "NAME": first, "LAST_NAME": last,
                           "UF_PHONE_INNER": ext, "ADMIN": uid == 1}

    def add_contact(self, phone, name="Known Client", assigned=7):
        cid = self._id()
        self.contacts[cid] = {"ID": str(cid), "NAME": name, "ASSIGNED_BY_ID": str(assigned),
                              "PHONE": [{"VALUE": phone, "VALUE_TYPE": "WORK"}]}
        return cid

    def issue_tokens(self, user_id=1):
        access, refresh = uuid.uuid4().hex, uuid.uuid4().hex
        with self.lock:
            self.tokens[access] = (self.clock() + self.token_lifetime, user_id)
            self.refresh_tokens.add(refresh)
        return {"access_token": access, "refresh_token": refresh, "expires_in": self.token_lifetime,
                "expires": int(time.time()) + self.token_lifetime, "client_endpoint": self.url + "/rest/",
                "server_endpoint": self.url + "/oauth/rest/", "domain": "127.0.0.1:%d" % self.port,
                "member_id": "m" * 32, "scope": "telephony,crm,user,task", "status": "L",
                "user_id": user_id, "application_token": "apptoken123"}

    def expire_all_tokens(self):
        with self.lock:
            for token in self.tokens:
                self.tokens[token] = (self.clock() - 1, self.tokens[token][1])

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def webhook_url(self):
        return "%s/rest/%d/%s/" % (self.url, self.webhook_user, self.webhook_code)

    @property
    def oauth_url(self):
        return self.url + "/oauth/token/"

    def start(self):
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        if self.thread:
            self.thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def set_outage(self, mode, seconds):
        self.outage = (mode, self.clock() + seconds)

    def calls_by_method(self, method):
        return [j for j in self.journal if j["method"] == method.lower()]

    def _id(self):
        with self.lock:
            self.next_id += 1
            return self.next_id

    # -- HTTP -------------------------------------------------------------------------------
    def _handler_class(self):
        emu = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                emu._handle(self, "GET")

            def do_POST(self):
                emu._handle(self, "POST")
        return Handler

    def _reply(self, req, status, payload, raw=None):
        if self.reply_delay:
            time.sleep(self.reply_delay)
        body = raw if raw is not None else json.dumps(payload).encode()
        req.send_response(status)
        req.send_header("Content-Type", "text/html" if raw is not None else "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def _bucket(self):
        """One more request: True when it fits the leaky bucket."""
        with self.lock:
            now = self.clock()
            self.level = max(0.0, self.level - (now - self.level_at) * self.rate)
            self.level_at = now
            if self.level + 1 > self.burst:
                self.rejected_503 += 1
                return False
            self.level += 1
            self.max_level = max(self.max_level, self.level)
            return True

    def _handle(self, req, verb):
        url = urlsplit(req.path)
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        ctype = req.headers.get("Content-Type") or ""
        if self.delay:
            time.sleep(self.delay)
        if url.path.startswith("/oauth/token"):
            params = dict(parse_qsl(url.query))
            if raw and "json" not in ctype:
                params.update(parse_qsl(raw.decode()))
            return self._oauth(req, params)
        if url.path.startswith("/rest/upload/"):
            return self._upload(req, url.path.rsplit("/", 1)[-1], raw, ctype)
        if self.outage and self.clock() < self.outage[1]:
            mode = self.outage[0]
            self.journal.append({"method": "(outage)", "params": {}, "status": 503, "t": time.time()})
            if mode in ("hang", "drop"):
                # hang: no answer until the outage ends (longer than any client waits);
                # drop: the connection closes without an answer
                if mode == "hang":
                    time.sleep(max(0.0, min(self.outage[1] - self.clock(), 60.0)))
                req.close_connection = True
                return None
            if mode == "timeout":
                time.sleep(3)
                return self._reply(req, 504, None, raw=b"<html>504 Gateway Time-out</html>")
            if mode == "html":
                return self._reply(req, 502, None, raw=b"<html>502 Bad Gateway</html>")
            if mode == "500":
                return self._reply(req, 500, {"error": "INTERNAL_SERVER_ERROR", "error_description": "oops"})
            return self._reply(req, 503, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"})
        m = re.match(r"^/rest/(?:(\d+)/([^/]+)/)?([A-Za-z0-9_.]+?)(?:\.json)?$", url.path)
        if not m:
            return self._reply(req, 404, {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"})
        webhook_user, code, method = m.group(1), m.group(2), m.group(3).lower()
        if "json" in ctype and raw:
            try:
                params = json.loads(raw.decode())
            except ValueError:
                return self._reply(req, 400, {"error": "INVALID_REQUEST", "error_description": "bad JSON"})
        else:
            params = php_parse(url.query + ("&" if url.query and raw else "") + raw.decode("utf-8", "replace"))
        entry = {"method": method, "params": params, "t": time.time(), "auth": "webhook" if code else "oauth"}
        self.journal.append(entry)
        if not self._bucket():
            entry["status"] = 503
            return self._reply(req, 503, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"})
        try:
            if code is not None:
                if code != self.webhook_code or int(webhook_user) != self.webhook_user:
                    raise Fail(401, "INVALID_CREDENTIALS", "Invalid request credentials")
                auth = "webhook"
                acting = self.webhook_user
            else:
                token = params.pop("auth", None) if isinstance(params, dict) else None
                if not token:
                    raise Fail(401, "NO_AUTH_FOUND", "Wrong authorization data")
                with self.lock:
                    known = self.tokens.get(token)
                if known is None:
                    raise Fail(401, "invalid_token", "Unable to get application by token")
                if known[0] < self.clock():
                    raise Fail(401, "expired_token", "The access token provided has expired.")
                auth = "oauth"
                acting = known[1]
            if auth == "webhook" and (method in self.APP_ONLY or
                                      (self.refuse_webhook_telephony and method in self.TELEPHONY_APP_ONLY)):
                raise Fail(403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method")
            before, after = self._slowness(method, params)
            time.sleep(before)
            result = self._dispatch(method, params, auth, acting, depth=0)
            time.sleep(after)
        except Fail as exc:
            entry["status"] = exc.status
            entry["error"] = exc.description or exc.error
            return self._reply(req, exc.status, {"error": exc.error, "error_description": exc.description})
        entry["status"] = 200
        entry["result"] = result
        now = time.time()
        self._reply(req, 200, {"result": result, "time": {"start": now, "finish": now, "duration": 0.001,
                                                          "processing": 0.001, "operating": 0}})

    def _slowness(self, method, params):
        names = [method]
        if method == "batch" and isinstance(params, dict):
            cmd = params.get("cmd") or {}
            commands = cmd.values() if isinstance(cmd, dict) else cmd
            names += [str(c).partition("?")[0].lower() for c in commands]
        with self.lock:
            for name in names:
                spec = self.slow.get(name)
                if spec and spec[2] > 0:
                    spec[2] -= 1
                    return spec[0], spec[1]
        return 0.0, 0.0

    def _oauth(self, req, params):
        self.journal.append({"method": "(oauth)", "params": dict(params), "t": time.time(), "status": 200})
        if params.get("client_id") != self.client_id or params.get("client_secret") != self.client_secret:
            return self._reply(req, 401, {"error": "invalid_client", "error_description": "Invalid client"})
        grant = params.get("grant_type")
        with self.lock:
            if grant == "refresh_token":
                if params.get("refresh_token") not in self.refresh_tokens:
                    return self._reply(req, 400, {"error": "invalid_grant", "error_description": "Invalid grant"})
                self.refresh_tokens.discard(params["refresh_token"])
                self.refreshes += 1
            elif grant == "authorization_code":
                if params.get("code") not in self.auth_codes:
                    return self._reply(req, 400, {"error": "invalid_grant", "error_description": "Invalid code"})
                self.auth_codes.discard(params["code"])
            else:
                return self._reply(req, 400, {"error": "invalid_request", "error_description": "grant_type"})
        return self._reply(req, 200, self.issue_tokens())

    def _upload(self, req, token, raw, ctype):
        with self.lock:
            pending = self.uploads.pop(token, None)
        if pending is None:
            return self._reply(req, 400, {"error": "ERROR_CORE", "error_description": "Wrong upload token"})
        filename, content = _multipart_file(raw, ctype, "file")
        if not filename:
            return self._reply(req, 400, {"error": "ERROR_CORE", "error_description": "File is empty"})
        try:
            file_id = self._store_record(pending, filename, content)
        except Fail as exc:
            return self._reply(req, exc.status, {"error": exc.error, "error_description": exc.description})
        self.journal.append({"method": "(upload)", "params": {"CALL_ID": pending, "FILENAME": filename},
                             "t": time.time(), "status": 200})
        return self._reply(req, 200, {"result": {"FILE_ID": file_id}})

    # -- methods -----------------------------------------------------------------------------
    def _dispatch(self, method, p, auth, acting, depth):
        if not isinstance(p, dict):
            p = {}
        handler = getattr(self, "m_" + method.replace(".", "_"), None)
        if handler is None:
            raise Fail(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        if method == "batch":
            if depth:
                raise Fail(405, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage")
            return self.m_batch(p, auth, acting)
        with self.lock:
            if self.failures.get(method):
                self.failures[method] -= 1
                raise Fail(500, "INTERNAL_SERVER_ERROR", "injected failure of %s" % method)
            err = self.errors.get(method)
            if err and err[3] > 0:
                err[3] -= 1
                raise Fail(err[0], err[1], err[2])
            odd = self.odd_answers.get(method)
            if odd and odd[1] > 0:
                odd[1] -= 1
                return odd[0]
            return handler(p) if method not in ("profile",) else handler(p, acting)

    def m_batch(self, p, auth, acting):
        cmd = p.get("cmd") or {}
        if isinstance(cmd, list):
            cmd = collections.OrderedDict((str(i), c) for i, c in enumerate(cmd))
        halt = truthy_php(p.get("halt"))
        out = collections.OrderedDict(result=collections.OrderedDict(), result_error=collections.OrderedDict(),
                                      result_total={}, result_next={}, result_time={})
        for i, (key, command) in enumerate(cmd.items()):
            if i >= 50:
                out["result_error"][key] = {"error": "ERROR_BATCH_LENGTH_EXCEEDED",
                                            "error_description": "Max batch length exceeded"}
                continue
            method, _, query = str(command).partition("?")
            params = php_parse(query)
            params = self._substitute(params, out["result"])
            entry = {"method": method.lower(), "params": params, "t": time.time(), "in_batch": True}
            self.journal.append(entry)
            try:
                if auth == "webhook" and (method.lower() in self.APP_ONLY or (
                        self.refuse_webhook_telephony and method.lower() in self.TELEPHONY_APP_ONLY)):
                    raise Fail(403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method")
                out["result"][key] = self._dispatch(method.lower(), params, auth, acting, depth=1)
                entry["status"] = 200
                entry["result"] = out["result"][key]
            except Fail as exc:
                entry["status"] = exc.status
                entry["error"] = exc.description or exc.error
                out["result_error"][key] = {"error": exc.error, "error_description": exc.description}
                if halt:
                    break
        return {k: (v if v else []) for k, v in out.items()}

    def _substitute(self, value, results):
        if isinstance(value, dict):
            return collections.OrderedDict((k, self._substitute(v, results)) for k, v in value.items())
        if isinstance(value, list):
            return [self._substitute(v, results) for v in value]
        if isinstance(value, str) and value.startswith("$result["):
            path = re.findall(r"\[([^\]]*)\]", value)
            node = results
            for part in path:
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    return value  # a reference to nothing stays as garbage, as the portal does
            return node
        return value

    # users and CRM
    def m_user_get(self, p):
        flt = p.get("FILTER") or p.get("filter") or {}
        for key in ("UF_PHONE_INNER", "ACTIVE", "ID"):
            if key in p and key not in flt:
                flt[key] = p[key]
        rows = []
        for user in self.users.values():
            if "ACTIVE" in flt and bool(user["ACTIVE"]) != (flt["ACTIVE"] in (True, "true", "Y", "1", 1)):
                continue
            if "UF_PHONE_INNER" in flt and user["UF_PHONE_INNER"] != str(flt["UF_PHONE_INNER"]):
                continue
            if "ID" in flt and user["ID"] != str(flt["ID"]):
                continue
            rows.append(dict(user))
        start = int(p.get("start") or 0)
        return rows[start:start + 50]

    def m_profile(self, p, acting):
        user = self.users.get(int(acting)) or {}
        return {"ID": user.get("ID"), "ADMIN": user.get("ADMIN", False), "NAME": user.get("NAME")}

    def m_app_info(self, p):
        return {"ID": 1, "CODE": self.client_id, "VERSION": 1, "STATUS": "L", "INSTALLED": True,
                "PAYMENT_EXPIRED": "N", "DAYS": None, "LANGUAGE_ID": "ru", "LICENSE": "ru_project",
                "LICENSE_TYPE": "project", "LICENSE_FAMILY": "project"}

    def m_scope(self, p):
        return list(self.scopes)

    def m_server_time(self, p):
        return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())

    def _find_by_phone(self, number):
        want = normalize_phone(number)
        found = []
        for kind, table in (("CONTACT", self.contacts), ("LEAD", self.leads), ("COMPANY", self.companies)):
            for eid, entity in table.items():
                if any(normalize_phone(ph["VALUE"]) == want for ph in entity.get("PHONE", [])):
                    found.append((kind, eid, entity))
        return found

    def _active_user(self, p):
        uid = p.get("USER_ID")
        try:
            uid = int(uid or 0)
        except (TypeError, ValueError):
            uid = 0
        if uid:
            return uid
        inner = p.get("USER_PHONE_INNER")
        if inner:
            for user in self.users.values():
                if user["ACTIVE"] and user["UF_PHONE_INNER"] == str(inner):
                    return int(user["ID"])
        raise core("USER_ID or USER_PHONE_INNER should be set")

    def _check_user(self, uid):
        user = self.users.get(uid)
        if user is None or not user["ACTIVE"]:
            raise core("User is not found or is not active")

    def m_telephony_externalcall_register(self, p):
        uid = self._active_user(p)
        try:
            call_type = int(p.get("TYPE"))
        except (TypeError, ValueError):
            call_type = 0
        if call_type not in (1, 2, 3, 4, 5):
            raise core("Unknown TYPE")
        start = p.get("CALL_START_DATE")
        if start and not re.match(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d)?", str(start)):
            raise core("CALL_START_DATE should be in the ISO-8601 format")
        number = strip_letters(p.get("PHONE_NUMBER"))
        if not number:
            raise core("Unsupported phone number format")
        self._check_user(uid)
        line = p.get("LINE_NUMBER")
        if line and line not in self.lines:
            self.lines[line] = {"NUMBER": line, "NAME": "", "CRM_AUTO_CREATE": "Y"}
        start_ts = _parse_time(start) if start else time.time()
        for call in self.active_calls.values():
            if (call["USER_ID"] == uid and call["PHONE_NUMBER"] == number and call["TYPE"] == call_type
                    and call.get("LINE_NUMBER") == line and call.get("EXTERNAL_CALL_ID") == p.get("EXTERNAL_CALL_ID")
                    and abs(call["start"] - start_ts) < 1800):
                call["dedup_hits"] += 1
                return {"CALL_ID": call["CALL_ID"], "CRM_CREATED_LEAD": None, "CRM_CREATED_ENTITIES": [],
                        "CRM_ENTITY_TYPE": call.get("CRM_ENTITY_TYPE"), "CRM_ENTITY_ID": call.get("CRM_ENTITY_ID")}
        call_id = "externalCall.%s.%d" % (uuid.uuid4().hex, int(time.time()))
        internal = any(u["ACTIVE"] and u["UF_PHONE_INNER"] == number for u in self.users.values())
        entity_type, entity_id, created, created_lead, error = "", None, [], None, None
        if not internal:
            if p.get("CRM_ENTITY_TYPE") and p.get("CRM_ENTITY_ID"):
                entity_type, entity_id = p["CRM_ENTITY_TYPE"], int(p["CRM_ENTITY_ID"])
            else:
                found = self._find_by_phone(number)
                if found:
                    entity_type, entity_id = found[0][0], found[0][1]
                elif truthy_php(p.get("CRM_CREATE")):
                    if self.simple_crm:
                        cid = self._id()
                        self.contacts[cid] = {"ID": str(cid), "NAME": number, "ASSIGNED_BY_ID": str(uid),
                                              "PHONE": [{"VALUE": number, "VALUE_TYPE": "WORK"}], "auto": True}
                        did = self._id()
                        self.deals[did] = {"ID": str(did), "CONTACT_ID": str(cid), "ASSIGNED_BY_ID": str(uid),
                                           "auto": True}
                        created = [{"ENTITY_TYPE": "CONTACT", "ENTITY_ID": cid},
                                   {"ENTITY_TYPE": "DEAL", "ENTITY_ID": did}]
                        entity_type, entity_id = "CONTACT", cid
                    else:
                        lid = self._id()
                        source = p.get("CRM_SOURCE")
                        if source not in self.sources:
                            source = "CALL"
                        self.leads[lid] = {"ID": str(lid), "TITLE": "%s - incoming call" % number,
                                           "SOURCE_ID": source, "SOURCE_DESCRIPTION": line or "",
                                           "ASSIGNED_BY_ID": str(uid), "STATUS_ID": "NEW",
                                           "PHONE": [{"VALUE": number, "VALUE_TYPE": "WORK"}], "auto": True}
                        created = [{"ENTITY_TYPE": "LEAD", "ENTITY_ID": lid}]
                        created_lead = lid
                        entity_type, entity_id = "LEAD", lid
        else:
            error = "Lead creation is disabled for local users"
        self.active_calls[call_id] = {"CALL_ID": call_id, "USER_ID": uid, "PHONE_NUMBER": number, "TYPE": call_type,
                                      "LINE_NUMBER": line, "EXTERNAL_CALL_ID": p.get("EXTERNAL_CALL_ID"),
                                      "start": start_ts, "CALL_START_DATE": start, "CRM_ENTITY_TYPE": entity_type,
                                      "CRM_ENTITY_ID": entity_id, "created": created,
                                      "shown": {uid} if truthy_php(p.get("SHOW", 1)) else set(),
                                      "dedup_hits": 0, "registered_at": time.time()}
        out = {"CALL_ID": call_id, "CRM_CREATED_LEAD": created_lead, "CRM_CREATED_ENTITIES": created,
               "CRM_ENTITY_TYPE": entity_type, "CRM_ENTITY_ID": entity_id}
        if error:
            out["LEAD_CREATION_ERROR"] = error
        return out

    def _card(self, p, show):
        call = self.active_calls.get(p.get("CALL_ID"))
        if call is None:
            return False
        users = p.get("USER_ID") or [call["USER_ID"]]
        if not isinstance(users, list):
            users = [users]
        for uid in users:
            (call["shown"].add if show else call["shown"].discard)(int(uid))
        call.setdefault("card_log", []).append(("show" if show else "hide", sorted(int(u) for u in users)))
        return True

    def m_telephony_externalcall_show(self, p):
        return self._card(p, True)

    def m_telephony_externalcall_hide(self, p):
        return self._card(p, False)

    def m_telephony_externalcall_finish(self, p):
        uid = self._active_user(p)
        call_id = p.get("CALL_ID")
        if not isinstance(call_id, str):
            raise Fail(400, "INVALID_ARGUMENT", "CALL_ID must be a string")
        call = self.active_calls.get(call_id)
        if call is None:
            raise core("Call is not found (call should be registered prior to finishing")
        self._check_user(uid)
        duration = int(p.get("DURATION") or 0)
        status = str(p.get("STATUS_CODE") or ("200" if duration > 0 else "304"))
        del self.active_calls[call_id]
        call["shown"].discard(uid)
        for entity in call["created"]:
            table = {"LEAD": self.leads, "CONTACT": self.contacts, "DEAL": self.deals}[entity["ENTITY_TYPE"]]
            table[entity["ENTITY_ID"]]["ASSIGNED_BY_ID"] = str(uid)
        entity_type, entity_id = call["CRM_ENTITY_TYPE"], call["CRM_ENTITY_ID"]
        if not entity_id:
            found = self._find_by_phone(call["PHONE_NUMBER"])
            if found:
                entity_type, entity_id = found[0][0], found[0][1]
        record = {"ID": len(self.stats) + 1, "CALL_ID": call_id, "EXTERNAL_CALL_ID": call["EXTERNAL_CALL_ID"],
                  "PORTAL_USER_ID": uid, "PHONE_NUMBER": call["PHONE_NUMBER"],
                  "PORTAL_NUMBER": call["LINE_NUMBER"] or "REST_APP:webhook", "INCOMING": str(call["TYPE"]),
                  "CALL_DURATION": duration, "CALL_START_DATE": {}, "CALL_STATUS": 1 if duration > 0 else 0,
                  "CALL_FAILED_CODE": status, "ADD_TO_CHAT": truthy_php(p.get("ADD_TO_CHAT")),
                  "CRM_ACTIVITY_ID": None, "RECORD_FILE_ID": None, "shown_at_finish": sorted(call["shown"]),
                  "call": call}
        if p.get("VOTE") not in (None, ""):
            record["CALL_VOTE"] = int(p["VOTE"])
        if entity_id:
            activity = {"ID": len(self.activities) + 1, "OWNER_TYPE": entity_type, "OWNER_ID": entity_id,
                        "ORIGIN_ID": "VI_" + call_id, "RESPONSIBLE_ID": uid, "DURATION": duration,
                        "COMPLETED": "N" if status == "304" and call["TYPE"] in (2, 4) else "Y",
                        "DIRECTION": 1 if call["TYPE"] in (2, 3) else 2, "START": call["CALL_START_DATE"]}
            self.activities.append(activity)
            record["CRM_ACTIVITY_ID"] = activity["ID"]
            record["CRM_ENTITY_TYPE"], record["CRM_ENTITY_ID"] = entity_type, entity_id
        else:
            record["ERRORS"] = {"ACTIVITY_CREATION": "Could not find associated crm entity for the current call"}
        self.stats[call_id] = record
        return {k: v for k, v in record.items() if k not in ("shown_at_finish", "call")}

    def _store_record(self, call_id, filename, content):
        if not filename:
            raise core("File name is empty")
        if not re.search(r"\.(wav|mp3)$", filename):
            raise core("Wrong file extension. Only wav and mp3 are allowed")
        if not content:
            raise core("File content is empty.")
        if not (content[:4] == b"RIFF" or content[:3] == b"ID3" or content[:2] == b"\xff\xfb"):
            raise core("File is not an audio file")
        file_id = self._id()
        # A second attachRecord replaces the call's recording, but each upload is a
        # file of its own in the "call records" Drive folder: copies are counted.
        self.records[call_id] = {"FILE_ID": file_id, "FILENAME": filename, "content": content}
        self.record_uploads[call_id] = self.record_uploads.get(call_id, 0) + 1
        if call_id in self.stats:
            self.stats[call_id]["RECORD_FILE_ID"] = file_id
        return file_id

    def m_telephony_externalcall_attachrecord(self, p):
        call_id = p.get("CALL_ID")
        if not p.get("RECORD_URL") and "FILENAME" not in p:
            raise core("Required parameters are not set. Request should contain or URL or FILENAME parameter")
        if call_id not in self.stats:
            raise core("Call is not found in the statistic table. Looks like it is not finished yet.")
        if p.get("RECORD_URL"):
            # the portal downloads the file once, inside the request (doc 7.6, mode 1)
            url = p["RECORD_URL"]
            try:
                with urllib.request.urlopen(url, timeout=10) as reply:
                    content = reply.read()
            except urllib.error.HTTPError as exc:
                raise core("Server returns HTTP error code %d" % exc.code)
            except (urllib.error.URLError, OSError) as exc:
                raise core("SERVER_NOT_AVAILABLE: %s" % exc)
            self.record_urls[call_id] = url
            name = p.get("FILENAME") or url.rstrip("/").rsplit("/", 1)[-1]
            return {"FILE_ID": self._store_record(call_id, name, content)}
        if "FILE_CONTENT" not in p:
            token = uuid.uuid4().hex
            self.uploads[token] = call_id
            return {"uploadUrl": "%s/rest/upload/%s" % (self.url, token), "fieldName": "file"}
        if not p.get("FILENAME"):
            raise core("File name is empty")
        if not p.get("FILE_CONTENT"):
            raise core("File content is empty.")
        try:
            content = base64.b64decode(p["FILE_CONTENT"], validate=False)
        except (ValueError, TypeError):
            raise core("File content is not properly encoded. Base64 encoding is expected.")
        return {"FILE_ID": self._store_record(call_id, p["FILENAME"], content)}

    def m_telephony_externalcall_searchcrmentities(self, p):
        if not p.get("PHONE_NUMBER"):
            raise core("PHONE_NUMBER is empty")
        out = []
        for kind, eid, entity in self._find_by_phone(p["PHONE_NUMBER"]):
            owner = self.users.get(int(entity["ASSIGNED_BY_ID"])) or {}
            out.append({"CRM_ENTITY_TYPE": kind, "CRM_ENTITY_ID": eid, "ASSIGNED_BY_ID": int(entity["ASSIGNED_BY_ID"]),
                        "NAME": entity.get("NAME") or entity.get("TITLE"),
                        "ASSIGNED_BY": {"ID": entity["ASSIGNED_BY_ID"], "TIMEMAN_STATUS": "OPENED",
                                        "USER_PHONE_INNER": owner.get("UF_PHONE_INNER")}})
        return out

    def m_telephony_externalline_get(self, p):
        return list(self.lines.values())

    def _fields(self, p):
        fields = p.get("fields")
        if not isinstance(fields, dict):
            raise Fail(400, "", "Parameter 'fields' must be array.")
        return fields

    def m_crm_contact_add(self, p):
        fields = self._fields(p)
        cid = self._id()
        self.contacts[cid] = dict(fields, ID=str(cid), ASSIGNED_BY_ID=str(fields.get("ASSIGNED_BY_ID") or 1),
                                  PHONE=list(fields.get("PHONE") or []))
        return cid

    def m_crm_deal_add(self, p):
        fields = self._fields(p)
        did = self._id()
        category = int(fields.get("CATEGORY_ID") or 0)
        stage = fields.get("STAGE_ID") or ("NEW" if not category else "C%d:NEW" % category)
        self.deals[did] = dict(fields, ID=str(did), CATEGORY_ID=str(category), STAGE_ID=stage,
                               ASSIGNED_BY_ID=str(fields.get("ASSIGNED_BY_ID") or 1))
        return did

    def m_crm_timeline_comment_add(self, p):
        fields = self._fields(p)
        if not fields.get("ENTITY_ID") or str(fields.get("ENTITY_TYPE", "")).lower() not in (
                "lead", "deal", "contact", "company", "order"):
            raise Fail(400, "", "ENTITY_ID and ENTITY_TYPE are required")
        cid = self._id()
        self.comments[cid] = dict(fields, ID=cid)
        return cid

    def m_crm_status_list(self, p):
        return [{"ID": str(i + 1), "ENTITY_ID": "SOURCE", "STATUS_ID": s, "NAME": s.title()}
                for i, s in enumerate(self.sources)]

    def m_crm_lead_get(self, p):
        lead = self.leads.get(int(p.get("id") or p.get("ID") or 0))
        if lead is None:
            raise Fail(400, "", "Not found")
        return lead

    def m_crm_contact_get(self, p):
        contact = self.contacts.get(int(p.get("id") or p.get("ID") or 0))
        if contact is None:
            raise Fail(400, "", "Not found")
        return contact

    def m_crm_duplicate_findbycomm(self, p):
        values = p.get("values") or []
        if not values:
            raise Fail(400, "", "Communication values is not defined")
        out = {}
        for value in values[:20]:
            for kind, eid, _ in self._find_by_phone(value):
                out.setdefault(kind, []).append(eid)
        return out or []

    def m_tasks_task_add(self, p):
        fields = p.get("fields")
        if not isinstance(fields, dict):
            raise Fail(400, "100", "Could not find value for parameter {fields}")
        if not fields.get("TITLE"):
            raise core("Task title is not specified<br>")
        if not fields.get("RESPONSIBLE_ID"):
            raise core("Responsible person not specified")
        if int(fields["RESPONSIBLE_ID"]) not in self.users:
            raise core('User specified in the "Responsible" field not found')
        tid = self._id()
        task = {"id": str(tid), "title": fields["TITLE"], "description": fields.get("DESCRIPTION", ""),
                "responsibleId": str(fields["RESPONSIBLE_ID"]), "deadline": fields.get("DEADLINE"),
                "ufCrmTask": fields.get("UF_CRM_TASK") or [], "status": "2"}
        self.tasks[tid] = task
        return {"task": task}

    def m_tasks_task_list(self, p):
        flt = p.get("filter") or {}
        rows = [t for t in self.tasks.values()
                if ("TITLE" not in flt or t["title"] == flt["TITLE"])
                and ("RESPONSIBLE_ID" not in flt or t["responsibleId"] == str(flt["RESPONSIBLE_ID"]))]
        return {"tasks": rows}

    def m_voximplant_statistic_get(self, p):
        flt = p.get("FILTER") or {}
        return [{k: v for k, v in r.items() if k not in ("shown_at_finish", "call")} for r in self.stats.values()
                if all(r.get(k) == v for k, v in flt.items() if k in ("CALL_ID", "EXTERNAL_CALL_ID"))]

    # offline events (click-to-call without a public port)
    def m_event_bind(self, p):
        if not p.get("event"):
            raise Fail(400, "ERROR_EVENT_NOT_FOUND", "Event not found")
        binding = {"event": p["event"].upper(), "handler": p.get("handler", ""),
                   "offline": 1 if p.get("event_type") == "offline" else 0}
        if binding in self.bindings:
            raise Fail(400, "ERROR_HANDLER_ALREADY_EXIST", "Handler already exists!")
        self.bindings.append(binding)
        return True

    def m_event_unbind(self, p):
        before = len(self.bindings)
        self.bindings = [b for b in self.bindings if b["event"] != str(p.get("event", "")).upper()]
        return {"count": before - len(self.bindings)}

    def m_event_get(self, p):
        return [dict(b, auth_type="0") for b in self.bindings]

    def queue_offline(self, event, data):
        mid = uuid.uuid4().hex
        self.offline[mid] = {"ID": str(len(self.offline) + 1), "TIMESTAMP_X": time.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
                             "EVENT_NAME": event.upper(), "EVENT_DATA": data, "EVENT_ADDITIONAL": {"user_id": "1"},
                             "MESSAGE_ID": mid, "process_id": None}
        return mid

    def start_click(self, user_id, phone, offline=False):
        """A click on a number in the CRM: Bitrix24 registers the call itself, then sends
        OnExternalCallStart (queued as an offline event when it is bound offline)."""
        with self.lock:
            reg = self.m_telephony_externalcall_register({"USER_ID": user_id, "PHONE_NUMBER": phone,
                                                          "TYPE": 1, "SHOW": 1})
        data = {"PHONE_NUMBER": phone, "PHONE_NUMBER_INTERNATIONAL": "+" + normalize_phone(phone),
                "EXTENSION": "", "USER_ID": str(user_id), "CALL_ID": reg["CALL_ID"], "LINE_NUMBER": "",
                "CALL_LIST_ID": "0", "IS_MOBILE": "0", "CRM_ENTITY_TYPE": "", "CRM_ENTITY_ID": "0"}
        if offline:
            if not any(b["event"] == "ONEXTERNALCALLSTART" and b["offline"] for b in self.bindings):
                raise AssertionError("no offline binding of ONEXTERNALCALLSTART: Bitrix24 would drop the event")
            self.queue_offline("ONEXTERNALCALLSTART", data)
        return data

    @staticmethod
    def event_form(event, data, application_token, domain="b24-test.bitrix24.ru"):
        """The POST body Bitrix24 sends to an event handler (PHP-style keys)."""
        fields = [("event", event.upper()), ("event_handler_id", "7")]
        fields += [("data[%s]" % k, v) for k, v in data.items()]
        fields += [("ts", str(int(time.time()))), ("auth[domain]", domain),
                   ("auth[client_endpoint]", "https://%s/rest/" % domain),
                   ("auth[server_endpoint]", "https://oauth.bitrix.info/rest/"),
                   ("auth[member_id]", "a1b2c3"), ("auth[application_token]", application_token)]
        return urlencode(fields).encode()

    def m_event_offline_get(self, p):
        limit = int(p.get("limit") or 50)
        clear = truthy_php(p.get("clear", 1))
        if not clear and not self.offline_extended:
            raise Fail(403, "WRONG_LICENSE", "Wrong license (rest_offline_extended is needed for clear=0)")
        if p.get("process_id"):
            rows = [r for r in self.offline.values() if r["process_id"] == p["process_id"]]
            return {"process_id": p["process_id"], "events": [_public(r) for r in rows]}
        rows = [r for r in self.offline.values() if r["process_id"] is None][:limit]
        if clear:
            for r in rows:
                del self.offline[r["MESSAGE_ID"]]
            return {"process_id": None, "events": [_public(r) for r in rows]}
        process = uuid.uuid4().hex
        for r in rows:
            r["process_id"] = process
        return {"process_id": process if rows else None, "events": [_public(r) for r in rows]}

    def m_event_offline_clear(self, p):
        process = p.get("process_id")
        if not process:
            raise Fail(400, "ERROR_CORE", "process_id is required")
        ids = p.get("message_id") or []
        for mid, r in list(self.offline.items()):
            if r["process_id"] == process and (not ids or mid in ids):
                del self.offline[mid]
        return True


def _multipart_file(raw, ctype, field):
    """(filename, bytes) of one file field of a multipart/form-data body."""
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    if not m:
        return None, b""
    boundary = b"--" + m.group(1).encode()
    for part in raw.split(boundary):
        head, sep, body = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        disposition = re.search(rb'name="([^"]*)"(?:; filename="([^"]*)")?', head)
        if disposition and disposition.group(1).decode() == field and disposition.group(2):
            if body.endswith(b"\r\n"):
                body = body[:-2]
            return disposition.group(2).decode(), body
    return None, b""


def _public(row):
    return {k: v for k, v in row.items() if k != "process_id"}


def _parse_time(text):
    m = re.match(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d)(?::(\d\d))?(?:\.\d+)?(Z|[+-]\d\d:?\d\d)?", str(text))
    if not m:
        return time.time()
    import calendar
    ts = calendar.timegm(tuple(int(x or 0) for x in m.groups()[:6]) + (0, 0, 0))
    zone = m.group(7)
    if zone and zone != "Z":
        sign = -1 if zone[0] == "+" else 1
        digits = zone[1:].replace(":", "")
        ts += sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return ts
