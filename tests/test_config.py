"""Configuration: every key validated at start-up, one clear message, exit code 2."""
import os
import subprocess
import sys

import pytest

import bx24ast
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "bx24ast.py")


def run_cli(*args):
    proc = subprocess.run([sys.executable, SCRIPT] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    return proc.returncode, proc.stdout, proc.stderr


def write(tmp_path, text):
    path = tmp_path / "bx24ast.conf"
    path.write_text(text)
    return str(path)


def test_defaults_are_valid():
    config = bx24ast.Config.defaults()
    assert config.get("ami", "port") == 5038
    assert config.get("bitrix24", "verify_tls") is True


def test_example_config_documents_every_key_and_matches_the_schema():
    with open(os.path.join(ROOT, "bx24ast.conf.example"), encoding="utf-8") as f:
        text = f.read()
    assert text == bx24ast.example_config_text(), "regenerate with: bx24ast.py example-config"
    config = bx24ast.Config.from_text(text)
    for section, key, default, _conv, doc in bx24ast.CONFIG_SCHEMA:
        assert "[%s]" % section in text and "\n%s =" % key in text and doc in text
        assert config.get(section, key) == bx24ast.Config.defaults().get(section, key)
    for key, default, _conv, doc in bx24ast.LINE_SCHEMA:
        assert ("# %s = %s" % (key, default) if default else "# %s =" % key) in text and doc in text


@pytest.mark.parametrize("text, words", [
    ("[ami]\nport = 70000\n", ["[ami] port", "70000", "1 to 65535"]),
    ("[ami]\nport = abc\n", ["[ami] port", "'abc'", "whole number"]),
    ("[pbx]\nextension_pattern = [0-9\n", ["[pbx] extension_pattern", "regular expression"]),
    ("[pbx]\ninbound_contexts = (from-trunk\n", ["[pbx] inbound_contexts", "regular expression"]),
    ("[bitrix24]\nverify_tls = maybe\n", ["[bitrix24] verify_tls", "yes or no"]),
    ("[bitrix24]\nwebhook_url = http://x/\n", ["[bitrix24] webhook_url", "/rest/<user>/<token>/"]),
    ("[ami]\nauth = kerberos\n", ["[ami] auth", "plain, md5"]),
    ("[ami]\nhots = 1.2.3.4\n", ["unknown key 'hots' in [ami]", "host"]),
    ("[amii]\nhost = x\n", ["unknown section [amii]"]),
    ("[ami]\nhost = a\nhost = b\n", ["cannot be read as an INI file"]),
    ("port = 1\n", ["cannot be read as an INI file"]),
])
def test_bad_values_name_section_key_and_value(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(bx24ast.ConfigError) as err:
        bx24ast.Config.load(path)
    for word in words:
        assert word in str(err.value)
    code, out, errout = run_cli("-c", path, "check-config")
    assert code == 2
    assert "Traceback" not in errout
    assert errout.startswith("bx24ast: configuration error: ")
    assert len(errout.strip().splitlines()) == 1


def test_missing_file_is_exit_2(tmp_path):
    code, out, err = run_cli("-c", str(tmp_path / "nope.conf"), "run")
    assert code == 2 and "cannot read the configuration file" in err and "Traceback" not in err


def test_missing_required_key_is_exit_2(tmp_path):
    path = write(tmp_path, "[ami]\nhost = 127.0.0.1\n")
    code, out, err = run_cli("-c", path, "run", "--foreground")
    assert code == 2
    assert "[ami] username is empty" in err and "Traceback" not in err


def test_good_file_checks_ok(tmp_path):
    path = write(tmp_path, "[ami]\nusername = bx24\nsecret = x\n[pbx]\nextension_pattern = 1[0-9]{2}\n")
    code, out, err = run_cli("-c", path, "check-config")
    assert code == 0 and "OK" in out
    config = bx24ast.Config.load(path)
    rules = bx24ast.PbxRules.from_config(config)
    assert rules.is_extension("101") and not rules.is_extension("201")


def test_webhook_url_gets_its_trailing_slash():
    config = bx24ast.Config.from_text("[bitrix24]\nwebhook_url = https://a.bitrix24.ru/rest/1/abc\n")
    assert config.get("bitrix24", "webhook_url") == "https://a.bitrix24.ru/rest/1/abc/"


# -- named sections: [line:DID], several PBXs, [users] with mobiles ----------------------------

def test_line_sections_with_lines_map_merged():
    config = bx24ast.Config.from_text(
        "[lines]\n74951234567 = ADVERTISING\n74957654321 = PARTNER\n"
        "[line:74951234567]\nresponsible = 7\ncreate = deal\ndeal_category = 2\ndeal_stage = C2:NEW\n"
        "hours = mon-fri 09:00-18:00; sat 10:00-15:00\n"
        "[line:+74959990000]\nsource = WEB\n")
    lines = config.line_settings()
    assert lines["74951234567"]["source"] == "ADVERTISING"   # from [lines]
    assert lines["74951234567"]["responsible"] == 7 and lines["74951234567"]["create"] == "deal"
    assert lines["74951234567"]["deal_stage"] == "C2:NEW" and lines["74951234567"]["deal_category"] == 2
    assert lines["74951234567"]["hours"].is_open(1796558400) in (True, False)
    assert lines["74957654321"] == {"source": "PARTNER", "responsible": 0, "create": "lead",
                                    "deal_category": 0, "deal_stage": "", "hours": None}
    assert lines["+74959990000"]["source"] == "WEB"


def test_a_pbx_has_its_own_line_map_over_the_common_one():
    config = bx24ast.Config.from_text(
        "[ami:branch]\nhost = 10.0.2.5\n"
        "[lines]\n74951234567 = ADVERTISING\n74957654321 = PARTNER\n"
        "[line:74951234567]\nresponsible = 7\ncreate = deal\ndeal_stage = C2:NEW\n"
        "[lines:branch]\n74957654321 = WEB\n"
        "[line:branch:74951234567]\nresponsible = 9\n"
        "[line:branch:trunk-spb]\nsource = PARTNER\nhours = mon-fri 09:00-18:00\n")
    office, branch = config.line_settings(), config.line_settings("branch")
    assert set(office) == set(["74951234567", "74957654321"])
    assert (office["74951234567"]["responsible"], office["74957654321"]["source"]) == (7, "PARTNER")
    # a key the branch's section leaves out is the common section's; the source, [lines:branch]'s or [lines]'
    assert branch["74951234567"] == dict(office["74951234567"], responsible=9)
    assert branch["74957654321"]["source"] == "WEB" and branch["74957654321"]["create"] == "lead"
    assert branch["trunk-spb"]["source"] == "PARTNER" and branch["trunk-spb"]["hours"] is not None
    assert "trunk-spb" not in office
    rules = bx24ast.PbxRules.defaults()
    assert bx24ast.Lines.from_config(config, rules, "branch").responsible("+7 (495) 123-45-67") == 9
    assert bx24ast.Lines.from_config(config, rules).responsible("+7 (495) 123-45-67") == 7


def test_pbx_sections_inherit_pbx_and_default_cel_off():
    config = bx24ast.Config.from_text(
        "[pbx]\ncountry_code = 7\nextension_pattern = 1[0-9]{2}\n"
        "[ami:branch]\nhost = 10.0.2.5\nusername = bx24\n"
        "[pbx:branch]\nextension_pattern = 2[0-9]{2}\n")
    assert config.names("ami") == ["branch"] and config.names("cel") == []
    assert config.get("ami:branch", "host") == "10.0.2.5" and config.get("ami:branch", "port") == 5038
    assert config.get("pbx:branch", "extension_pattern").match("201")
    assert config.get("pbx:branch", "country_code") == "7"
    config = bx24ast.Config.from_text("[ami:branch]\nhost = 10.0.2.5\n[cel:branch]\nmysql_host = 10.0.2.5\n")
    assert config.get("cel:branch", "backend") == "off" and config.get("cel", "backend") == "auto"


@pytest.mark.parametrize("text, words", [
    ("[line:749512345x7!]\nsource = WEB\n", ["[line:749512345x7!]", "[line:74951234567]"]),
    ("[line:74951234567]\ncolour = red\n", ["unknown key 'colour' in [line:74951234567]", "responsible"]),
    ("[line:74951234567]\ncreate = company\n", ["[line:74951234567] create", "lead, deal, none"]),
    ("[line:74951234567]\nhours = mon-fri 9-18\n", ["[line:74951234567] hours", "HH:MM-HH:MM"]),
    ("[line:74951234567]\nhours = someday 09:00-18:00\n", ["[line:74951234567] hours", "'someday'"]),
    ("[routing]\nhours = mon 25:00-26:00\n", ["[routing] hours", "span of time"]),
    ("[ami:bad name]\nhost = x\n", ["[ami:bad name]", "letters, digits"]),
    ("[line:branch:74951234567]\nsource = WEB\n", ["[line:branch:74951234567]", "no [ami:branch]"]),
    ("[lines:branch]\n74951234567 = WEB\n", ["[lines:branch]", "no [ami:branch]"]),
    ("[ami:branch]\n[lines:branch]\n74951234567 = a b\n", ["[lines:branch] 74951234567", "lead source"]),
    ("[ami:branch]\n[line:bad name:74951234567]\n", ["[line:bad name:74951234567]", "[line:NAME:<number>]"]),
    ("[ami:branch]\n[line:branch:]\n", ["[line:branch:]", "[line:74951234567]"]),
    ("[ami:branch]\nport = 0\n", ["[ami:branch] port", "1 to 65535"]),
    ("[pbx:branch]\ncountry_code = 7\n", ["[pbx:branch]", "no [ami:branch]"]),
    ("[users]\n101 = 7, 12\n", ["[users] 101", "mobile number"]),
    ("[users]\n101 = seven\n", ["[users] 101", "Bitrix24 user ID"]),
])
def test_named_sections_refused_with_the_section_named(text, words):
    with pytest.raises(bx24ast.ConfigError) as err:
        bx24ast.Config.from_text(text)
    for word in words:
        assert word in str(err.value)


def test_users_with_mobiles():
    config = bx24ast.Config.from_text("[users]\n101 = 7, +7 916 123-45-67, 89031112233\n102 = 9\n")
    entry = config.maps["users"]["101"]
    assert entry.user_id == 7 and entry.mobiles == ("+79161234567", "89031112233")
    assert str(entry) == "7, +79161234567, 89031112233"
    users = bx24ast.UserDirectory(None, config.maps["users"])
    assert users.user_for("101") == 7 and users.user_for("102") == 9
