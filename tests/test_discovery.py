"""PBX discovery: trunks and phones as Asterisk lists them, and what that changes.

The event fields are the ones Asterisk 22 (PJSIPShowEndpoints,
PJSIPShowRegistrationsOutbound) and 16 (SIPpeers, SIPshowregistry) sent for the
endpoints in tests/live/*_custom.conf; the live test runs the same against both."""
import bx24ast
from fake_ami import FakeAmiServer
from conftest import wait_for


def ev(name, **fields):
    return bx24ast.Message(fields, True, name, None)


PJSIP_ENDPOINTS = [
    ev("EndpointList", ObjectName="101", Auths="101-auth", OutboundAuths="", Contacts="", Aor="101"),
    ev("EndpointList", ObjectName="trunk-operator", Auths="", OutboundAuths="trunk-operator-auth",
       Contacts="trunk-operator/sip:127.0.0.2:5060,", Aor="trunk-operator"),
    ev("EndpointList", ObjectName="7001", Auths="", OutboundAuths="7001-auth",
       Contacts="7001/sip:127.0.0.4:5060,", Aor="7001"),
    ev("EndpointList", ObjectName="ivan", Auths="ivan-auth", OutboundAuths="", Contacts="", Aor="ivan"),
    ev("EndpointList", ObjectName="gateway", Auths="", OutboundAuths="", Contacts="", Aor="gateway"),
]
PJSIP_REGISTRATIONS = [ev("OutboundRegistrationDetail", ObjectName="7001-reg", OutboundAuth="7001-auth",
                          ServerUri="sip:127.0.0.4:5060", ClientUri="sip:7001@127.0.0.4", Endpoint="")]
SIP_PEERS = [
    ev("PeerEntry", Channeltype="SIP", ObjectName="101", IPaddress="-none-", Dynamic="yes"),
    ev("PeerEntry", Channeltype="SIP", ObjectName="7001", IPaddress="127.0.0.4", Dynamic="no"),
    ev("PeerEntry", Channeltype="SIP", ObjectName="trunk-operator", IPaddress="127.0.0.2", Dynamic="no"),
    ev("PeerEntry", Channeltype="SIP", ObjectName="softphone", IPaddress="-none-", Dynamic="yes"),
]
SIP_REGISTRY = [ev("RegistryEntry", Host="127.0.0.4", Port="5060", Username="7001", State="Request Sent")]


def kinds(found):
    return dict((e.device, e.kind) for e in found)


def test_pjsip_endpoints_are_told_apart(rules):
    found = kinds(bx24ast.classify_pjsip(PJSIP_ENDPOINTS, PJSIP_REGISTRATIONS, rules))
    assert found == {"PJSIP/101": "phone", "PJSIP/trunk-operator": "trunk", "PJSIP/7001": "trunk",
                     "PJSIP/ivan": "phone", "PJSIP/gateway": None}


def test_sip_peers_are_told_apart(rules):
    found = kinds(bx24ast.classify_peers("SIP", SIP_PEERS, SIP_REGISTRY, rules))
    assert found == {"SIP/101": "phone", "SIP/7001": "trunk", "SIP/trunk-operator": "trunk",
                     "SIP/softphone": None}


def _inbound_from(tracker, channel, cid="+79161234567", context="from-sip-provider"):
    calls = []
    tracker.on_call_event = lambda kind, call, ext: calls.append((kind, call.direction, ext))
    for msg in [
        ev("Newchannel", Channel=channel + "-00000001", Uniqueid="1.1", Linkedid="1.1", ChannelState="4",
           Context=context, Exten="74951234567", CallerIDNum=cid),
        ev("Newchannel", Channel="PJSIP/101-00000002", Uniqueid="1.2", Linkedid="1.1", ChannelState="0",
           Context="office", Exten="s", CallerIDNum="101"),
        ev("DialBegin", Channel=channel + "-00000001", Uniqueid="1.1", Linkedid="1.1", CallerIDNum=cid,
           DestChannel="PJSIP/101-00000002", DestUniqueid="1.2", DestLinkedid="1.1", DialString="101"),
    ]:
        msg.time = 1.0
        tracker.handle(msg)
    return calls


def test_a_learned_trunk_wins_over_the_shape_of_its_name(rules):
    """A provider account named 7001 looks like an extension; once Asterisk says it
    registers out, calls from it are inbound."""
    rules.inbound_contexts = rules.internal_contexts = None
    guess = _inbound_from(bx24ast.CallTracker(rules), "PJSIP/7001", cid="4951112233")
    assert guess and guess[0][1] != "inbound"
    rules.endpoints = {"PJSIP/7001": "trunk"}
    learned = _inbound_from(bx24ast.CallTracker(rules), "PJSIP/7001", cid="4951112233")
    assert learned[0] == ("ringing", "inbound", "101")


def test_a_learned_phone_with_a_name_places_calls(rules):
    rules.inbound_contexts = rules.internal_contexts = None
    rules.endpoints = {"PJSIP/ivan": "phone"}
    tracker = bx24ast.CallTracker(rules)
    msg = ev("Newchannel", Channel="PJSIP/ivan-00000001", Uniqueid="2.1", Linkedid="2.1", ChannelState="4",
             Context="office", Exten="89161234567", CallerIDNum="ivan")
    msg.time = 1.0
    tracker.handle(msg)
    assert tracker.channels["2.1"].origin == "phone"


def test_discovery_over_ami_and_a_refusal_said_once(rules, caplog):
    lists = {"PJSIPShowEndpoints": PJSIP_ENDPOINTS, "PJSIPShowRegistrationsOutbound": PJSIP_REGISTRATIONS}
    with FakeAmiServer(username="u", secret="p", lists=lists, refuse=("SIPpeers", "SIPshowregistry")) as ami:
        conn = bx24ast.AmiConnection("127.0.0.1", ami.port, "u", "p", lambda m: None,
                                     wanted_events=frozenset())
        conn.start()
        try:
            assert conn.connected.wait(10)
            disco = bx24ast.PbxDiscovery(conn, rules, 60)
            found = kinds(disco.discover())
            assert found["PJSIP/7001"] == "trunk" and found["PJSIP/101"] == "phone"
            assert rules.endpoints["PJSIP/7001"] == "trunk" and "PJSIP/gateway" not in rules.endpoints
            disco.discover()
        finally:
            conn.stop()
    refusals = [r for r in caplog.records if "may not run SIPpeers" in r.getMessage()]
    assert len(refusals) == 1
