"""Everyday office calls, driven on a live Asterisk (tests/live_asterisk.py).

Each scenario says what the simulated people do and, written from that design and not
from bx24ast's output, what the call is: the same keys as the fixtures' expected.json.
The driver gives every call's first channel a Uniqueid of its own choosing (Originate
ChannelId), so the ground truth knows each call's Linkedid before Asterisk runs it.
tests/live/record_scenarios.py records them into tests/fixtures/; test_live_asterisk.py
runs them against bx24ast as a real process.
"""
import itertools
import time

DID1, DID2, DID3 = "74951234567", "74957654321", "74950000003"
CLIENT = "+79161234567"
MOBILE = "89162223344"
_seq = itertools.count(int(time.time() * 10) % 100000 * 10)


def new_uid():
    """A Uniqueid shaped like Asterisk's own (epoch.sequence)."""
    return "%d.%d" % (int(time.time()), 900000 + next(_seq) % 100000)


def call(linkedid, direction, number, did=None, rang=(), answered_by=None, final=None,
         disposition="ANSWERED", talk=None, extension=None, click=False):
    return {
        "linkedid": linkedid, "direction": direction, "external_number": number, "did": did,
        "rang_extensions": list(rang), "answered_by": answered_by, "final_extension": final,
        "transfers": [], "disposition": disposition, "first_bridge_to_hangup_s": talk,
        "answered_at_s": 0 if answered_by else None, "extension": extension,
        "click_to_call": click,
    }


class Scenario(object):
    name = None
    seconds = 20       # how long the calls take at most

    def run(self, pbx):
        """Drive the calls; returns the ground truth: a list of call() dicts."""
        raise NotImplementedError

    # -- what the simulated people do --------------------------------------------------
    @staticmethod
    def inbound(pbx, did, caller, then="talk5", timeout_ms=None):
        uid = new_uid()
        headers = {}
        if timeout_ms:
            headers["Timeout"] = str(timeout_ms)
        pbx.originate("Local/%s@from-trunk" % did, '"" <%s>' % caller if caller else "",
                      context="ext-sim", exten=then, ids=(uid, uid + "1"), **headers)
        return uid

    @staticmethod
    def phone_dials(pbx, ext, number, stay=30, timeout_ms=None):
        uid = new_uid()
        headers = {"Timeout": str(timeout_ms)} if timeout_ms else {}
        pbx.originate("Local/%s@from-internal" % number, '"" <%s>' % ext, application="Wait",
                      data=str(stay), ids=(uid, uid + "1"), **headers)
        return uid


class GroupCall(Scenario):
    """DID1 rings the group 600 (101, 102): 101 answers after 2 s and the caller talks
    `talk` s, or nobody answers and the caller gives up after 5 s."""

    def __init__(self, name, caller, answered, talk=5):
        self.name, self.caller, self.answered, self.talk = name, caller, answered, talk

    def run(self, pbx):
        pbx.db("simphone", "101", "2/0" if self.answered else "never")
        pbx.db("simphone", "102", "never")
        number = self.caller if self.caller not in ("anonymous", None) else None
        if self.answered:
            uid = self.inbound(pbx, DID1, self.caller, "talk%d" % self.talk)
            return [call(uid, "inbound", number, DID1, ["101", "102"], "101", "101", talk=self.talk)]
        uid = self.inbound(pbx, DID1, self.caller, "talk%d" % self.talk, timeout_ms=5000)
        return [call(uid, "inbound", number, DID1, ["101", "102"], disposition="NO ANSWER")]


class Pickup(Scenario):
    """Nobody in the group answers; 103 picks up 101's ringing phone with **101."""
    name = "pickup"

    def run(self, pbx):
        pbx.db("simphone", "101", "never")
        pbx.db("simphone", "102", "never")
        uid = self.inbound(pbx, DID1, CLIENT, "talk6")
        time.sleep(2.5)
        self.phone_dials(pbx, "103", "**101", stay=20)
        return [call(uid, "inbound", CLIENT, DID1, ["101", "102"], "103", "103", talk=6)]


class ForwardToMobile(Scenario):
    """103 forwards his calls to his mobile; the mobile answers after 2 s."""
    name = "forward_to_mobile"

    def run(self, pbx):
        pbx.db("CF", "103", MOBILE)
        pbx.db("simremote", MOBILE, "2/0")
        try:
            uid = self.inbound(pbx, DID2, CLIENT, "talk5")
            time.sleep(2)   # CF/103 is read when the call reaches 103
        finally:
            pbx.ami().action("DBDel", Family="CF", Key="103")
        return [call(uid, "inbound", CLIENT, DID2, ["103"], "103", "103", talk=5)]


class Voicemail(Scenario):
    """103 does not answer; after the ring time the caller is in voicemail: missed."""
    name = "voicemail"

    def run(self, pbx):
        pbx.db("simphone", "103", "never")
        uid = self.inbound(pbx, DID2, CLIENT, "talk4")
        return [call(uid, "inbound", CLIENT, DID2, ["103"], disposition="NO ANSWER")]


class Ivr(Scenario):
    """The IVR waits 2 s for a digit, then sends the caller to 102 (answers after 1 s)."""
    name = "ivr"

    def run(self, pbx):
        pbx.db("simphone", "102", "1/0")
        uid = self.inbound(pbx, DID3, CLIENT, "talk9")
        # the caller's timer runs from the IVR's answer: 2 s menu + 1 s ring, 6 s talk
        return [call(uid, "inbound", CLIENT, DID3, ["102"], "102", "102", talk=6)]


class OutboundAnswered(Scenario):
    name = "outbound_answered"

    def run(self, pbx):
        pbx.db("simremote", "89161234567", "3/5")
        uid = self.phone_dials(pbx, "101", "89161234567")
        return [call(uid, "outbound", "89161234567", answered_by="remote", final="101", talk=5,
                     extension="101")]


class OutboundBusy(Scenario):
    name = "outbound_busy"

    def run(self, pbx):
        pbx.db("simremote", "89165550000", "busy")
        uid = self.phone_dials(pbx, "102", "89165550000")
        return [call(uid, "outbound", "89165550000", disposition="BUSY", extension="102")]


class OutboundNoAnswer(Scenario):
    """101 dials a mobile that only rings; 101 gives up after 6 s."""
    name = "outbound_no_answer"

    def run(self, pbx):
        pbx.db("simremote", "89167776655", "never")
        uid = self.phone_dials(pbx, "101", "89167776655", timeout_ms=6000)
        return [call(uid, "outbound", "89167776655", disposition="NO ANSWER", extension="101")]


class ClickToCallLocal(Scenario):
    """FreePBX style: the employee's phone through Local/101@from-internal, then the client."""
    name = "click2call_local"

    def run(self, pbx):
        pbx.db("simphone", "101", "2/0")
        pbx.db("simremote", "89161234567", "3/6")
        uid = new_uid()
        pbx.originate("Local/101@from-internal", '"89161234567" <101>', context="from-internal",
                      exten="89161234567", ids=(uid, uid + "1"))
        return [call(uid, "outbound", "89161234567", rang=["101"], answered_by="remote", final="101",
                     talk=6, extension="101", click=True)]


class ClickToCallUnanswered(Scenario):
    """Another AMI client's click-to-call that the employee never picks up."""
    name = "click2call_unanswered"

    def run(self, pbx):
        pbx.db("simphone", "102", "never")
        uid = new_uid()
        pbx.originate("Local/102@from-internal", '"89161234567" <102>', context="from-internal",
                      exten="89161234567", ids=(uid, uid + "1"), Timeout="6000")
        return [call(uid, "outbound", "89161234567", rang=["102"], disposition="NO ANSWER",
                     extension="102", click=True)]


class ParkRetrieved(Scenario):
    """101 answers, parks the caller on 70 after 3 s; 102 takes the call from 71 after 3 s
    more and talks until the caller hangs up (12 s after the first answer)."""
    name = "park_retrieved"

    def run(self, pbx):
        pbx.db("simphone", "101", "1/0")
        pbx.db("simphone", "102", "never")
        uid = self.inbound(pbx, DID1, CLIENT, "talk12")
        time.sleep(4)
        agent = [c for c in pbx.channel_names() if c.startswith("Local/101@phones") and c.endswith(";1")]
        reply = pbx.ami().action("BlindTransfer", Channel=agent[0], Context="from-internal", Exten="70")
        assert reply.get("Response") == "Success", reply
        time.sleep(3)
        self.phone_dials(pbx, "102", "71", stay=30)
        truth = call(uid, "inbound", CLIENT, DID1, ["101", "102"], "101", "102", talk=12)
        truth["transfers"] = [{"type": "blind", "from": "101", "to": "102"}]
        return [truth]


class QueueCall(Scenario):
    """DID1 switched to queue 700 (ringall 101, 102): 102 answers after 2 s, or nobody
    does and the caller gives up 6 s after the queue answered him."""

    def __init__(self, name, answered):
        self.name, self.answered = name, answered

    def run(self, pbx):
        pbx.db("inroute", DID1, "queue")
        pbx.db("simphone", "101", "never")
        pbx.db("simphone", "102", "2/0" if self.answered else "never")
        try:
            uid = self.inbound(pbx, DID1, CLIENT, "talk6")
            time.sleep(4)
        finally:
            pbx.ami().action("DBDel", Family="inroute", Key=DID1)
        if not self.answered:
            return [call(uid, "inbound", CLIENT, DID1, ["101", "102"], disposition="NO ANSWER")]
        # the queue answers the caller at once: the talk runs from that answer (6 s),
        # 2 s of it before 102 picks up
        return [call(uid, "inbound", CLIENT, DID1, ["101", "102"], "102", "102", talk=4)]


def _agent_leg(pbx, ext):
    """The channel of ext's phone that is bridged with the caller (Local/<ext>@phones;1)."""
    legs = [c for c in pbx.channel_names() if c.startswith("Local/%s@phones" % ext) and c.endswith(";1")]
    assert legs, pbx.channel_names()
    return legs[0]


class BlindTransfer(Scenario):
    """101 answers after 1 s, talks 3 s, blind-transfers to 103 (answers after 1 s); the
    caller hangs up 11 s after the first answer."""
    name = "blind_transfer"

    def run(self, pbx):
        pbx.db("simphone", "101", "1/0")
        pbx.db("simphone", "102", "never")
        pbx.db("simphone", "103", "1/0")
        uid = self.inbound(pbx, DID1, CLIENT, "talk11")
        time.sleep(4.5)
        reply = pbx.ami().action("BlindTransfer", Channel=_agent_leg(pbx, "101"), Context="from-internal",
                                 Exten="103")
        assert reply.get("Response") == "Success", reply
        truth = call(uid, "inbound", CLIENT, DID1, ["101", "102", "103"], "101", "103", talk=11)
        truth["transfers"] = [{"type": "blind", "from": "101", "to": "103"}]
        return [truth]


class AttendedTransfer(Scenario):
    """101 answers after 1 s, consults 103 (answers after 1 s) 3 s later, then hangs up:
    the caller and 103 are joined; the caller hangs up 14 s after the first answer."""
    name = "attended_transfer"

    def run(self, pbx):
        pbx.db("simphone", "101", "1/0")
        pbx.db("simphone", "102", "never")
        pbx.db("simphone", "103", "1/0")
        uid = self.inbound(pbx, DID1, CLIENT, "talk14")
        time.sleep(4)
        reply = pbx.ami().action("Atxfer", Channel=_agent_leg(pbx, "101"), Context="from-internal",
                                 Exten="103")
        assert reply.get("Response") == "Success", reply
        time.sleep(5)
        pbx.ami().action("Hangup", Channel=_agent_leg(pbx, "101"))
        truth = call(uid, "inbound", CLIENT, DID1, ["101", "102", "103"], "101", "103", talk=14)
        truth["transfers"] = [{"type": "attended", "from": "101", "to": "103"}]
        return [truth]


ALL = [GroupCall("inbound_answered", CLIENT, True), GroupCall("inbound_missed", CLIENT, False), Pickup(),
       ForwardToMobile(), GroupCall("withheld_answered", "anonymous", True, talk=4),
       GroupCall("withheld_missed", None, False, talk=4), Voicemail(), Ivr(), OutboundAnswered(), OutboundBusy(), OutboundNoAnswer(), ClickToCallLocal(),
       ClickToCallUnanswered(), ParkRetrieved(), QueueCall("queue_answered", True), QueueCall("queue_abandoned", False), BlindTransfer(),
       AttendedTransfer()]
BY_NAME = dict((s.name, s) for s in ALL)
