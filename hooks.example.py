# -*- coding: utf-8 -*-
"""bx24ast hooks: one worked example for every hook point.

Copy this file to /etc/bx24ast/hooks.py, keep the functions you need (delete the
rest: a hook that is absent costs nothing), set

    [hooks]
    file = /etc/bx24ast/hooks.py

and reload the service (systemctl reload bx24ast). Try it on a recorded call first:

    bx24ast hooks test /path/to/capture --hooks /etc/bx24ast/hooks.py

Rules of the game:
- Standard library only, Python 3.6 (the PBX's own interpreter runs this file).
- A hook gets plain values (dicts, strings, numbers) and returns a changed value or a
  decision. A hook that edits the dict it is given may also return None.
- A hook that raises, returns what bx24ast cannot use, or runs longer than [hooks]
  timeout_ms (500 ms) is logged once by name and the call goes on as if the hook were
  absent. Keep them quick: no network calls to slow servers in a hook.
- `log` is a logger you can use: log.info("...") goes to bx24ast's log.
- `call` is a dict: linkedid, pbx, direction (inbound/outbound), number (the client,
  +7...), did (the line dialled), extension, started_at, answered_at, ended_at (Unix
  time) and more; see the README, section "Hooks".

Every example below changes nothing until you fill in its lists: as shipped, the file
can be loaded as it is.
"""

# -- who and what: fill these in ----------------------------------------------------------------
BLACKLIST = set()                 # {"+74950000000"}: robocallers, never in the CRM
SERVICE_LINES = set()             # {"74959999999"}: the lift's intercom, a fax line
SUPPORT_LINES = set()             # {"74957654321"}: calls that must not create leads
SOFT_PHONES = {}                  # {"2101": "101"}: a second device of an employee's
NO_CARDS_FOR = set()              # {1}: Bitrix24 user IDs that never want a popup
VIP_LINES = set()                 # {"74951111111"}: missed calls there are urgent tasks
LINE_MANAGERS = {}                # {"74957654321": 9}: who answers for a line's missed calls
RECORDINGS_URL = ""               # "https://pbx.example.com/monitor/": the portal fetches from here
FOREIGN_CONTEXT = ""              # "from-internal-intl": click-to-call abroad through another trunk
VIP_CLIENTS = {}                  # {"+79161234567": "101"}: route these callers to this extension
COMMENT_ON_NEW_LEADS = False      # True: write "Called line ..." into a new lead's timeline


def need_registration(call):
    """Report the call at all? False leaves it out of Bitrix24 entirely."""
    if call["number"] in BLACKLIST or call["did"] in SERVICE_LINES:
        return False
    return True


def process_client_phone(number, call):
    """The client's number before the CRM search and the registration (+7...).
    [numbers] rules in the configuration cover most formats; this is for the rest,
    e.g. a trunk that puts an operator's prefix in front: +7100 495 ... -> +7 495 ..."""
    if number.startswith("+7100") and len(number) == 15:
        return "+7" + number[5:]
    return number


def process_user_phone(extension, call):
    """The extension to find the Bitrix24 user by: a softphone 2101 rings for 101."""
    return SOFT_PHONES.get(extension, extension)


def process_registration_params(params, call):
    """telephony.externalcall.register parameters (USER_ID, PHONE_NUMBER, TYPE,
    CRM_CREATE, CRM_SOURCE, LINE_NUMBER, SHOW...). EXTERNAL_CALL_ID stays bx24ast's."""
    if call["did"] in SUPPORT_LINES:
        params["CRM_CREATE"] = 0
    return params


def customize_show_call_card(params, call):
    """telephony.externalcall.show parameters; False: no card at all."""
    users = [u for u in params["USER_ID"] if u not in NO_CARDS_FOR]
    if not users:
        return False
    params["USER_ID"] = users
    return params


def process_final_params(params, call):
    """telephony.externalcall.finish parameters (USER_ID, DURATION, STATUS_CODE,
    ADD_TO_CHAT, VOTE...): a call "answered" by voicemail for under 3 s is a missed one."""
    if 0 < params["DURATION"] < 3 and params["STATUS_CODE"] == "200" and call["direction"] == "inbound":
        params["STATUS_CODE"] = "304"
        params["DURATION"] = 0
    return params


def process_task_creation_params(fields, call):
    """tasks.task.add fields of a missed-call task (TITLE, DESCRIPTION, RESPONSIBLE_ID,
    DEADLINE, UF_CRM_TASK...); False: no task."""
    if call["did"] in VIP_LINES:
        fields["PRIORITY"] = 2
        fields["TITLE"] = "VIP: " + fields["TITLE"]
    return fields


def customize_missed_call_responsible(user_id, call):
    """The Bitrix24 user a missed call is finished on and its task given to."""
    return LINE_MANAGERS.get(call["did"], user_id)


def process_record_file_path(path, call):
    """The recording to attach: a path (None when bx24ast found none), or an http(s)
    URL that the portal downloads itself (a web server on the PBX serving the monitor
    directory), which keeps big files off the REST connection."""
    if RECORDINGS_URL and path:
        return RECORDINGS_URL + path.rsplit("/", 1)[-1]
    return path


def process_originate_params(params, click):
    """The Originate of a click-to-call: Channel, Context, Exten, CallerID, Timeout.
    `click` has call_id, user_id, extension, number, source."""
    if FOREIGN_CONTEXT and not click["number"].startswith("+7"):
        params["Context"] = FOREIGN_CONTEXT
    return params


def customize_autodistribution(result, caller):
    """The routing answer for a caller (status, number, extension, user_id,
    crm_entity, name); `caller` has number and line."""
    if caller["number"] in VIP_CLIENTS:
        result["extension"] = VIP_CLIENTS[caller["number"]]
        result["status"] = "FOUND"
    return result


def post_registration(result, call):
    """After the register: REST requests to queue, [[method, params], ...]. `result`
    is the portal's answer (CALL_ID, CRM_ENTITY_TYPE, CRM_ENTITY_ID, CRM_CREATED_ENTITIES)."""
    if COMMENT_ON_NEW_LEADS and result.get("CRM_ENTITY_TYPE") == "LEAD" and result.get("CRM_CREATED_ENTITIES"):
        return [["crm.timeline.comment.add", {"fields": {
            "ENTITY_TYPE": "lead", "ENTITY_ID": result["CRM_ENTITY_ID"],
            "COMMENT": "Called line %s" % (call["did"] or "-")}}]]
    return []


def post_finish(result, call):
    """After the finish: REST requests to queue. `result` is the statistics record
    (CALL_DURATION, CALL_FAILED_CODE, CRM_ACTIVITY_ID, CRM_ENTITY_TYPE, CRM_ENTITY_ID...):
    e.g. give the call activity a subject of your own."""
    return []
