"""RFC 5321 paths and ESMTP parameters: the grammar functions on their own,
then MAIL/RCPT through the server (SIZE, BODY, SMTPUTF8, DSN, unknown
parameters), byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.smtp.server import ProtocolLimits
from pymta.smtp import events as E
from pymta.smtp.address import PathError, parse_domain, parse_path, split_path_and_params
from pymta.smtp.params import parse_params, xtext_decode, xtext_encode
from smtp_driver import Driver

MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
UNSUPPORTED = "555 5.5.4 Unsupported option: {}\r\n"


def error(callable_, *args, **kw) -> tuple[int, str, str]:
    with pytest.raises(PathError) as info:
        callable_(*args, **kw)
    return info.value.code, info.value.enhanced, info.value.text


# ----------------------------------------------------------------- paths
@pytest.mark.parametrize("path, mailbox", [
    ("<alice@example.test>", "alice@example.test"),
    ("<Alice.Smith@Example.TEST>", "Alice.Smith@example.test"),     # domain folded, local part kept
    ("<alice@example.test.>", "alice@example.test"),
    ("<a+tag@sub-1.example.test>", "a+tag@sub-1.example.test"),
    ("<!#$%&'*+-/=?^_`{|}~@x.test>", "!#$%&'*+-/=?^_`{|}~@x.test"),
    ('<"john doe"@example.test>', '"john doe"@example.test'),
    ('<"a\\"b"@example.test>', '"a\\"b"@example.test'),
    ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
    ("<user@[IPv6:2001:DB8::1]>", "user@[IPv6:2001:db8::1]"),
    ("<@relay.test:user@example.test>", "user@example.test"),         # source route ignored
    ("<@r1.test,@r2.test:user@example.test>", "user@example.test"),
])
def test_valid_paths(path, mailbox):
    assert parse_path(path, allow_null=False) == mailbox


@pytest.mark.parametrize("path, code, enhanced", [
    ("alice@example.test", 501, "5.1.3"),
    ("<alice@example.test", 501, "5.1.3"),
    ("<>", 501, "5.1.3"),
    ("<alice>", 501, "5.1.3"),
    ("<@example.test>", 501, "5.1.3"),
    ("<alice@>", 501, "5.1.3"),
    ("<a..b@example.test>", 501, "5.1.3"),
    ("<.a@example.test>", 501, "5.1.3"),
    ("<a b@example.test>", 501, "5.1.3"),
    ("<alice@exa_mple.test>", 501, "5.1.3"),
    ("<alice@-example.test>", 501, "5.1.3"),
    ("<alice@example..test>", 501, "5.1.3"),
    ("<alice@[192.0.2.300]>", 501, "5.1.3"),
    ("<alice@[IPv6:zz::1]>", 501, "5.1.3"),
    ("<alice@[192.0.2.1>", 501, "5.1.3"),
    ("<@relay.test user@example.test>", 501, "5.1.3"),
    ("<relay.test:user@example.test>", 501, "5.1.3"),
    ("<@relay.test,r2.test:user@example.test>", 501, "5.1.3"),
    ("<" + "l" * 65 + "@example.test>", 553, "5.1.3"),
    ("<a@" + "d" * 60 + "." + "e" * 60 + "." + "f" * 60 + "." + "g" * 80 + ">", 553, "5.1.3"),
])
def test_invalid_paths(path, code, enhanced):
    assert error(parse_path, path, allow_null=False)[:2] == (code, enhanced)


def test_null_path_only_where_allowed():
    assert parse_path("<>", allow_null=True) == ""
    assert error(parse_path, "<>", allow_null=False) == (501, "5.1.3", "Empty address not allowed here")


@pytest.mark.parametrize("path", ["<Postmaster>", "<postmaster>", "<POSTMASTER>"])
def test_bare_postmaster_only_where_allowed(path):
    assert parse_path(path, allow_null=False, allow_postmaster=True) == "postmaster"
    assert error(parse_path, path, allow_null=False)[0] == 501


def test_local_part_of_64_octets_is_fine():
    assert parse_path("<" + "l" * 64 + "@example.test>", allow_null=False) == "l" * 64 + "@example.test"


def test_non_ascii_addresses_parse_and_the_server_decides_on_smtputf8():
    assert parse_path("<josé@exämple.test>", allow_null=False) == "josé@exämple.test"


def test_domain_literals_are_normalised():
    assert parse_domain("[IPv6:0:0:0:0:0:0:0:1]") == "[IPv6:::1]"
    assert parse_domain("EXAMPLE.Test.") == "example.test"


# ----------------------------------------------------------- parameters
@pytest.mark.parametrize("arg, path, rest", [
    ("<a@b.test>", "<a@b.test>", ""),
    ("  <a@b.test>  SIZE=10   BODY=8BITMIME ", "<a@b.test>", "SIZE=10   BODY=8BITMIME"),
    ('<"x> y"@b.test> SIZE=1', '<"x> y"@b.test>', "SIZE=1"),
    ("<>", "<>", ""),
])
def test_split_path_and_params(arg, path, rest):
    assert split_path_and_params(arg) == (path, rest)


@pytest.mark.parametrize("arg", ["a@b.test", "<a@b.test", "<a@b.test>SIZE=1", '<"a>@b.test'])
def test_split_path_and_params_errors(arg):
    assert error(split_path_and_params, arg)[0] == 501


def test_parse_params():
    assert parse_params("size=10 SMTPUTF8  body=8BITMIME") == {
        "SIZE": "10", "SMTPUTF8": None, "BODY": "8BITMIME"}
    assert parse_params("") == {}


@pytest.mark.parametrize("text, message", [
    ("SIZE=1 size=2", "Parameter SIZE given twice"),
    ("=x", "Bad parameter syntax: =x"),
    ("-X=1", "Bad parameter syntax: -X=1"),
    ("X=a=b", "Bad parameter syntax: X=a=b"),
    ("X=", "Bad parameter syntax: X="),
    ("X_Y", "Bad parameter syntax: X_Y"),
])
def test_parse_params_errors(text, message):
    assert error(parse_params, text) == (501, "5.5.4", message)


# ---------------------------------------------------------------- xtext
def test_xtext_decode():
    assert xtext_decode("abc+2Bdef+3D") == "abc+def="
    assert xtext_decode("") == ""


@pytest.mark.parametrize("bad", ["+2b", "+Z0", "a+", "a+2", "a=b", "a b", "é"])
def test_xtext_decode_errors(bad):
    assert error(xtext_decode, bad) == (501, "5.5.4", "Bad xtext encoding")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255)))
def test_xtext_round_trip(text):
    encoded = xtext_encode(text)
    assert all(0x21 <= ord(c) <= 0x7E and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text


# ------------------------------------------------ MAIL/RCPT in a session
def ehlo(limits: ProtocolLimits | None = None, verb: bytes = b"EHLO") -> Driver:
    driver = Driver(limits)
    driver.feed(verb + b" client.test\r\n")
    return driver


def mail(line: bytes, limits: ProtocolLimits | None = None, verb: bytes = b"EHLO") -> tuple[bytes, Driver]:
    driver = ehlo(limits, verb)
    return driver.feed(b"MAIL FROM:" + line + b"\r\n"), driver


def rcpt(line: bytes, mail_params: bytes = b"", verb: bytes = b"EHLO") -> tuple[bytes, Driver]:
    driver = ehlo(None, verb)
    assert driver.feed(b"MAIL FROM:<a@b.test>" + mail_params + b"\r\n") == MAIL_OK
    return driver.feed(b"RCPT TO:" + line + b"\r\n"), driver


def test_null_reverse_path():
    out, driver = mail(b"<>")
    assert out == MAIL_OK
    assert driver.of(E.MailFrom) == [E.MailFrom("", {})]


def test_space_after_the_colon_is_tolerated():
    out, driver = mail(b" <a@b.test>")
    assert out == MAIL_OK


def test_postmaster_as_recipient_but_not_as_sender():
    out, driver = rcpt(b"<Postmaster>")
    assert out == RCPT_OK
    assert driver.of(E.RcptTo) == [E.RcptTo("postmaster", {})]
    out, _ = mail(b"<Postmaster>")
    assert out == b"501 5.1.7 Bad address syntax: missing @domain\r\n"


@pytest.mark.parametrize("path, reply", [
    (b"a@b.test", b"501 5.1.7 Syntax: the address must be enclosed in <>\r\n"),
    (b"<a@b..test>", b"501 5.1.7 Bad domain syntax in address\r\n"),
    (b"<" + b"l" * 65 + b"@b.test>", b"553 5.1.7 Local part longer than 64 octets\r\n"),
])
def test_bad_sender_syntax_is_x_1_7_and_bad_recipient_syntax_x_1_3(path, reply):
    out, _ = mail(path)
    assert out == reply
    out, _ = rcpt(path)
    assert out == reply.replace(b"5.1.7", b"5.1.3")


def test_null_forward_path_is_refused():
    out, _ = rcpt(b"<>")
    assert out == b"501 5.1.3 Empty address not allowed here\r\n"


def test_source_routes_are_accepted_and_ignored():
    out, driver = rcpt(b"<@hop1.test,@hop2.test:bob@b.test>")
    assert out == RCPT_OK
    assert driver.of(E.RcptTo) == [E.RcptTo("bob@b.test", {})]
    out, driver = mail(b"<@hop1.test:alice@a.test>")
    assert driver.of(E.MailFrom) == [E.MailFrom("alice@a.test", {})]


# SIZE
def test_size_parameter():
    out, driver = mail(b"<a@b.test> SIZE=12345")
    assert out == MAIL_OK
    assert driver.of(E.MailFrom)[0].params == {"SIZE": 12345}


@pytest.mark.parametrize("param", [b"SIZE", b"SIZE=x", b"SIZE=-1", b"SIZE=1.5", b"SIZE=\xc2\xb2",
                                   b"SIZE=" + b"9" * 21])
def test_bad_size_parameter(param):
    out, _ = mail(b"<a@b.test> " + param)
    assert out == b"501 5.5.4 Bad SIZE parameter\r\n"


def test_size_over_the_limit():
    out, _ = mail(b"<a@b.test> SIZE=2001", ProtocolLimits(max_message_size=2000))
    assert out == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"


# BODY (8BITMIME)
@pytest.mark.parametrize("value, stored", [(b"8BITMIME", "8BITMIME"), (b"7BIT", "7BIT"),
                                           (b"8bitmime", "8BITMIME")])
def test_body_parameter(value, stored):
    out, driver = mail(b"<a@b.test> BODY=" + value)
    assert out == MAIL_OK
    assert driver.of(E.MailFrom)[0].params == {"BODY": stored}


@pytest.mark.parametrize("value", [b"BINARYMIME", b"8BIT"])
def test_unsupported_body_type(value):
    out, _ = mail(b"<a@b.test> BODY=" + value)
    assert out == b"555 5.5.4 Unsupported BODY type: " + value + b"\r\n"


# SMTPUTF8
def test_non_ascii_sender_needs_smtputf8():
    out, driver = mail("<josé@exämple.test>".encode())
    assert out == b"553 5.6.7 Error: non-ASCII address requires the SMTPUTF8 parameter on MAIL\r\n"
    assert driver.of(E.MailFrom) == []
    out, driver = mail("<josé@exämple.test> SMTPUTF8".encode())
    assert out == MAIL_OK
    assert driver.of(E.MailFrom) == [E.MailFrom("josé@exämple.test", {"SMTPUTF8": None})]


def test_non_ascii_recipient_needs_smtputf8_on_mail():
    out, _ = rcpt("<zoë@b.test>".encode())
    assert out == b"553 5.6.7 Error: non-ASCII address requires the SMTPUTF8 parameter on MAIL\r\n"
    out, driver = rcpt("<zoë@b.test>".encode(), b" SMTPUTF8")
    assert out == RCPT_OK
    assert driver.of(E.RcptTo) == [E.RcptTo("zoë@b.test", {})]


def test_smtputf8_takes_no_value():
    out, _ = mail(b"<a@b.test> SMTPUTF8=yes")
    assert out == b"501 5.5.4 SMTPUTF8 takes no value\r\n"


# DSN (RFC 3461)
def test_dsn_mail_parameters():
    out, driver = mail(b"<a@b.test> RET=hdrs ENVID=QQ+2B314+3Dx")
    assert out == MAIL_OK
    assert driver.of(E.MailFrom)[0].params == {"RET": "HDRS", "ENVID": "QQ+314=x"}


@pytest.mark.parametrize("param, reply", [
    (b"RET=NONE", b"501 5.5.4 Bad RET parameter: FULL or HDRS\r\n"),
    (b"RET", b"501 5.5.4 Bad RET parameter: FULL or HDRS\r\n"),
    (b"ENVID=+zz", b"501 5.5.4 Bad xtext encoding\r\n"),
    (b"ENVID", b"501 5.5.4 Bad ENVID parameter\r\n"),
    (b"ENVID=" + b"x" * 101, b"501 5.5.4 Bad ENVID parameter\r\n"),
    (b"ENVID=a+0D+0AReceived:+20forged", b"501 5.5.4 Bad ENVID parameter\r\n"),
    (b"AUTH", b"501 5.5.4 Bad AUTH parameter\r\n"),
    (b"AUTH=a+0Db", b"501 5.5.4 Bad AUTH parameter\r\n"),
])
def test_bad_dsn_mail_parameters(param, reply):
    out, driver = mail(b"<a@b.test> " + param)
    assert out == reply
    assert driver.of(E.MailFrom) == []


def test_auth_parameter_is_xtext_decoded():
    out, driver = mail(b"<a@b.test> AUTH=user+2Bx@b.test")
    assert driver.of(E.MailFrom)[0].params == {"AUTH": "user+x@b.test"}
    out, driver = mail(b"<a@b.test> AUTH=<>")
    assert driver.of(E.MailFrom)[0].params == {"AUTH": "<>"}


@pytest.mark.parametrize("param, parsed", [
    (b"NOTIFY=NEVER", {"NOTIFY": ("NEVER",)}),
    (b"NOTIFY=never", {"NOTIFY": ("NEVER",)}),
    (b"NOTIFY=SUCCESS,FAILURE,DELAY", {"NOTIFY": ("SUCCESS", "FAILURE", "DELAY")}),
    (b"NOTIFY=delay", {"NOTIFY": ("DELAY",)}),
    (b"ORCPT=rfc822;bob+40b.test", {"ORCPT": "rfc822;bob@b.test"}),
    (b"ORCPT=RFC822;x+2By@b.test NOTIFY=FAILURE", {"ORCPT": "rfc822;x+y@b.test", "NOTIFY": ("FAILURE",)}),
])
def test_dsn_rcpt_parameters(param, parsed):
    out, driver = rcpt(b"<bob@b.test> " + param)
    assert out == RCPT_OK
    assert driver.of(E.RcptTo) == [E.RcptTo("bob@b.test", parsed)]


@pytest.mark.parametrize("param, reply", [
    (b"NOTIFY=NEVER,SUCCESS", b"501 5.5.4 Bad NOTIFY parameter\r\n"),
    (b"NOTIFY=DELAY,NEVER", b"501 5.5.4 Bad NOTIFY parameter\r\n"),
    (b"NOTIFY=SUCCESS,SUCCESS", b"501 5.5.4 Bad NOTIFY parameter\r\n"),
    (b"NOTIFY=SOMETIMES", b"501 5.5.4 Bad NOTIFY parameter\r\n"),
    (b"NOTIFY", b"501 5.5.4 Bad NOTIFY parameter\r\n"),
    (b"ORCPT=bob@b.test", b"501 5.5.4 Bad ORCPT parameter: addr-type;xtext\r\n"),
    (b"ORCPT=rfc822;", b"501 5.5.4 Bad ORCPT parameter: addr-type;xtext\r\n"),
    (b"ORCPT=;bob@b.test", b"501 5.5.4 Bad ORCPT parameter: addr-type;xtext\r\n"),
    (b"ORCPT=rfc822;+zz", b"501 5.5.4 Bad xtext encoding\r\n"),
    (b"ORCPT=rfc822;bob+0D+0ABcc:+20x@y", b"501 5.5.4 Bad ORCPT parameter: addr-type;xtext\r\n"),
])
def test_bad_dsn_rcpt_parameters(param, reply):
    out, driver = rcpt(b"<bob@b.test> " + param)
    assert out == reply
    assert driver.of(E.RcptTo) == []


# unknown and misplaced parameters
@pytest.mark.parametrize("param, key", [(b"FOO=bar", "FOO"), (b"X-EXTRA", "X-EXTRA"),
                                        (b"NOTIFY=NEVER", "NOTIFY"), (b"MT-PRIORITY=3", "MT-PRIORITY")])
def test_unknown_mail_parameters_are_555(param, key):
    out, _ = mail(b"<a@b.test> " + param)
    assert out == UNSUPPORTED.format(key).encode()


@pytest.mark.parametrize("param, key", [(b"FOO=bar", "FOO"), (b"SIZE=10", "SIZE"), (b"RET=FULL", "RET")])
def test_unknown_rcpt_parameters_are_555(param, key):
    out, _ = rcpt(b"<bob@b.test> " + param)
    assert out == UNSUPPORTED.format(key).encode()


def test_parameters_after_helo_are_555():
    after_helo = b"555 5.5.4 Error: MAIL/RCPT parameters need EHLO\r\n"
    out, _ = mail(b"<a@b.test> SIZE=10", verb=b"HELO")
    assert out == after_helo
    out, _ = mail(b"<a@b.test> BODY=8BITMIME", verb=b"HELO")
    assert out == after_helo
    out, driver = rcpt(b"<bob@b.test> NOTIFY=NEVER", verb=b"HELO")
    assert out == after_helo
    out, driver = rcpt(b"<bob@b.test>", verb=b"HELO")
    assert out == RCPT_OK


def test_repeated_parameter_is_501():
    out, _ = mail(b"<a@b.test> SIZE=1 SIZE=2")
    assert out == b"501 5.5.4 Parameter SIZE given twice\r\n"


def test_parameter_glued_to_the_path_is_501():
    out, _ = mail(b"<a@b.test>SIZE=1")
    assert out == b"501 5.1.7 Syntax: a space must follow the address\r\n"
