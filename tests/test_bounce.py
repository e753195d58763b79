"""Delivery status notifications: RFC 3464 composition, who gets what, and the scheduler hooks."""

from __future__ import annotations

import email
import email.policy

import pytest
from twisted.logger import capturedLogs, formatEvent

from pymta.bounce import dsn
from pymta.bounce.notifier import DeliveryNotifier, NotificationHeld, postmaster_address, wants
from pymta.config.model import Retry
from pymta.delivery.result import DeliveryResult
from pymta.envelope import DELIVERED, FAILED, PENDING, Envelope, Recipient
from pymta.spool.message import SpooledMessage
from pymta.delivery.scheduler import DeliveryScheduler
from pymta.spool.store import Spool

from schedulerkit import START, FakeReactor

BODY = b"From: Alice <alice@example.net>\r\nSubject: the report\r\nMessage-ID: <m1@example.net>\r\n\r\nHello,\r\nsee you.\r\n"


def parse(content: bytes):
    return email.message_from_bytes(content, policy=email.policy.default)


def failed_recipient(address="bob@remote.test", original=None, **kw) -> Recipient:
    fields = dict(state=FAILED, attempts=1, finished_at=START + 60,
                  last_result="550 5.1.1 host mx.remote.test[192.0.2.1]:25 said: no such user "
                              "(in reply to RCPT TO command)",
                  remote_mta="mx.remote.test", diagnostic="smtp; 550 5.1.1 no such user")
    fields.update(kw)
    return Recipient(address, original or address, "out", **fields)


def message_on_disk(tmp_path, recipients, body=BODY, sender="alice@example.net", **fields):
    path = tmp_path / "body.msg"
    path.write_bytes(body)
    envelope = Envelope("1K0TQUEUEID00001", sender, recipients, START, size=len(body),
                        prepend=["Received: from client by mx.local.test; today\r\n"], **fields)
    return SpooledMessage(envelope, str(path))


def compose(message, recipients, action=dsn.FAILED, **kw):
    return dsn.compose(action=action, hostname="mx.local.test", envelope=message.envelope,
                       recipients=recipients, prepend=message.prepend_bytes(),
                       body_path=message.body_path, to=message.envelope.sender or "postmaster@x",
                       now=START + 120, **kw)


# -- composition --------------------------------------------------------------------------

def test_a_bounce_is_a_multipart_report_with_every_rfc3464_field(tmp_path):
    bob = failed_recipient(orcpt="rfc822;bob-alias@remote.test")
    carol = failed_recipient("carol@other.test", original="c@local.test", remote_mta=None,
                             diagnostic=None, last_result="550 5.1.2 Host or domain name not found")
    message = message_on_disk(tmp_path, [bob, carol], envid="ENV-42")
    report = compose(message, [bob, carol], full=True)
    bounce = parse(report.content)
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    assert bounce["To"] == "alice@example.net"
    assert bounce["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.local.test"
    assert bounce["Subject"] == "Undelivered Mail Returned to Sender"
    assert bounce["Auto-Submitted"] == "auto-replied"
    human, status, original = bounce.iter_parts()
    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    assert "<bob@remote.test>: host mx.remote.test[192.0.2.1]:25 said: no such user" in text
    assert "<carol@other.test>: Host or domain name not found" in text
    assert status.get_content_type() == "message/delivery-status"
    per_message, first, second = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.local.test"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_message["Arrival-Date"]
    assert first["Final-Recipient"] == "rfc822; bob@remote.test"
    assert first["Original-Recipient"] == "rfc822; bob-alias@remote.test"
    assert (first["Action"], first["Status"]) == ("failed", "5.1.1")
    assert first["Remote-MTA"] == "dns; mx.remote.test"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert first["Last-Attempt-Date"]
    assert second["Final-Recipient"] == "rfc822; carol@other.test"
    assert second["Original-Recipient"] == "rfc822; c@local.test"
    assert second["Status"] == "5.1.2" and second["Remote-MTA"] is None
    assert second["Diagnostic-Code"].startswith("X-Pymta; 550 5.1.2")
    assert original.get_content_type() == "message/rfc822"
    returned = original.get_payload()[0]
    assert returned["Subject"] == "the report" and returned["Received"]
    assert b"Hello,\r\nsee you.\r\n" in report.content


@pytest.mark.parametrize("full, size_limit, expect_type", [
    (False, 50_000, "text/rfc822-headers"),          # RET=HDRS
    (True, 50_000, "message/rfc822"),
    (True, 20, "text/rfc822-headers"),               # too big to return whole
])
def test_what_is_returned_follows_ret_and_the_size_limit(tmp_path, full, size_limit, expect_type):
    bob = failed_recipient()
    message = message_on_disk(tmp_path, [bob])
    report = compose(message, [bob], full=full, return_limit=size_limit)
    original = list(parse(report.content).iter_parts())[2]
    assert original.get_content_type() == expect_type
    assert (b"see you." in report.content) == (expect_type == "message/rfc822")
    assert b"Subject: the report" in report.content


def test_a_delay_warning(tmp_path):
    pending = Recipient("slow@remote.test", "slow@remote.test", "out", attempts=3,
                        last_result="451 4.4.1 connect to mx.remote.test:25: Connection refused")
    message = message_on_disk(tmp_path, [pending])
    report = compose(message, [pending], action=dsn.DELAYED, lifetime=5 * 86400)
    warning = parse(report.content)
    assert warning["Subject"] == "Delayed Mail (still being retried)"
    human, status, original = warning.iter_parts()
    assert "THIS IS A WARNING ONLY" in human.get_content()
    block = status.get_payload()[1]
    assert (block["Action"], block["Status"]) == ("delayed", "4.4.1")
    assert block["Will-Retry-Until"]
    assert original.get_content_type() == "text/rfc822-headers"


def test_success_reports_say_delivered_or_relayed(tmp_path):
    local = Recipient("me@local.test", "me@local.test", "local", state=DELIVERED,
                      last_result="250 2.0.0 delivered to maildir", notify=("SUCCESS",))
    message = message_on_disk(tmp_path, [local])
    block = list(parse(compose(message, [local], action=dsn.DELIVERED).content).iter_parts())[1]
    assert (block.get_payload()[1]["Action"], block.get_payload()[1]["Status"]) == ("delivered", "2.0.0")
    relayed = Recipient("x@remote.test", "x@remote.test", "out", state=DELIVERED, remote_mta="mx.r",
                        last_result="250 2.0.0 Ok: queued", notify=("SUCCESS",))
    block = list(parse(compose(message, [relayed], action=dsn.RELAYED).content).iter_parts())[1]
    assert block.get_payload()[1]["Action"] == "relayed"


def test_an_smtputf8_message_is_reported_with_the_global_types(tmp_path):
    bob = failed_recipient("bøb@rëmote.test")
    message = message_on_disk(tmp_path, [bob], smtputf8=True,
                              body="Subject: grüße\r\n\r\nhej\r\n".encode())
    report = compose(message, [bob], full=True)
    assert report.smtputf8 and report.eight_bit
    assert b"Content-Type: message/global-delivery-status" in report.content
    assert b"Content-Type: message/global\r\n" in report.content
    assert "Final-Recipient: utf-8; bøb@rëmote.test".encode() in report.content


def test_reply_text_cannot_inject_header_lines(tmp_path):
    evil = failed_recipient(diagnostic="smtp; 550 5.1.1 no\r\nX-Injected: yes")
    message = message_on_disk(tmp_path, [evil])
    report = compose(message, [evil])
    assert b"\r\nX-Injected: yes" not in report.content


# -- who is notified ------------------------------------------------------------------------

def test_notify_defaults_and_values():
    plain = Recipient("a@x", "a@x", "r")
    assert wants(plain, "FAILURE") and wants(plain, "DELAY") and not wants(plain, "SUCCESS")
    never = Recipient("a@x", "a@x", "r", notify=("NEVER",))
    assert not any(wants(never, what) for what in ("FAILURE", "DELAY", "SUCCESS"))
    success = Recipient("a@x", "a@x", "r", notify=("SUCCESS",))
    assert wants(success, "SUCCESS") and not wants(success, "FAILURE")


def notifier(routes=None):
    routes = routes if routes is not None else {"example.net": "out", "local.test": "local"}
    return DeliveryNotifier("mx.local.test", "postmaster@local.test",
                            lambda address: routes.get(address.rpartition("@")[2]))


def test_failures_go_to_the_sender_once_with_every_failed_recipient(tmp_path):
    a, b, c = failed_recipient("a@r.test"), failed_recipient("b@r.test"), \
        failed_recipient("c@r.test", notify=("NEVER",))
    message = message_on_disk(tmp_path, [a, b, c])
    [notice] = notifier().failures(message, [a, b, c], START)
    assert notice.envelope.sender == "" and notice.envelope.notification == "bounce"
    assert [r.address for r in notice.envelope.recipients] == ["alice@example.net"]
    assert notice.envelope.recipients[0].route == "out"
    blocks = list(parse(notice.content).iter_parts())[1].get_payload()[1:]
    assert [blk["Final-Recipient"] for blk in blocks] == ["rfc822; a@r.test", "rfc822; b@r.test"]
    assert all(r.notified for r in (a, b, c))
    assert notifier().failures(message, [c], START) == []


def test_a_bounce_is_never_bounced_a_double_bounce_goes_to_the_postmaster(tmp_path):
    lost = failed_recipient("alice@example.net")
    message = message_on_disk(tmp_path, [lost], sender="", notification="bounce")
    [notice] = notifier().failures(message, [lost], START)
    assert notice.envelope.recipients[0].address == "postmaster@local.test"
    assert notice.envelope.recipients[0].route == "local"
    assert notice.envelope.notification == "postmaster"
    assert parse(notice.content)["Subject"].startswith("Postmaster Copy:")
    # and a failed postmaster copy ends there: held, not reported to anyone
    again = failed_recipient("postmaster@local.test")
    message = message_on_disk(tmp_path, [again], sender="", notification="postmaster")
    with pytest.raises(NotificationHeld) as held:
        notifier().failures(message, [again], START)
    assert held.value.reason.startswith("undeliverable postmaster notification: "
                                        "<postmaster@local.test>: 550 5.1.1 ")
    assert not again.notified


def test_a_bounce_that_cannot_reach_the_postmaster_is_held(tmp_path):
    lost = failed_recipient("alice@example.net")
    message = message_on_disk(tmp_path, [lost], sender="", notification="bounce")
    with pytest.raises(NotificationHeld) as held:
        notifier(routes={}).failures(message, [lost], START)
    assert held.value.reason == ("no delivery route for the postmaster <postmaster@local.test>: "
                                 "the non-delivery notification cannot be sent")


def test_a_sender_without_route_gets_its_bounce_via_the_postmaster(tmp_path):
    lost = failed_recipient()
    message = message_on_disk(tmp_path, [lost], sender="someone@unrouted.test")
    [notice] = notifier().failures(message, [lost], START)
    assert notice.envelope.recipients[0].address == "postmaster@local.test"


def test_postmaster_address_from_config():
    class Config:
        hostname = "mx.example.org"
        domains = ("example.org", "mx.example.org")
    assert postmaster_address(Config) == "postmaster@mx.example.org"
    Config.domains = ("example.org",)
    assert postmaster_address(Config) == "postmaster@example.org"


# -- the scheduler hooks ------------------------------------------------------------------------

class ScriptedBackend:
    """Answers by recipient address: a callable(address) -> DeliveryResult; records bodies."""

    def __init__(self, decide):
        self.decide = decide
        self.received: list[tuple[Envelope, list[str], bytes]] = []

    def deliver(self, message, recipients):
        with message.open_body() as fp:
            self.received.append((message.envelope, [r.address for r in recipients], fp.read()))
        return [self.decide(r.address) for r in recipients]


def ok(address):
    return DeliveryResult.delivered("delivered to maildir", "maildir:/mail")


class Harness:
    def __init__(self, tmp_path, decide_out, decide_local=ok, delay_warning=0.0, lifetime=86400.0):
        self.reactor = FakeReactor()
        self.spool = Spool(str(tmp_path / "spool"), reactor=self.reactor)
        self.out = ScriptedBackend(decide_out)
        self.local = ScriptedBackend(decide_local)
        retry = Retry(initial=300, maximum=600, lifetime=lifetime, concurrency=4,
                      delay_warning=delay_warning)
        self.scheduler = DeliveryScheduler(self.spool, {"out": self.out, "local": self.local}, retry,
                                           reactor=self.reactor, notifier=notifier())
        self.scheduler.startService()

    def submit(self, *recipients, sender="alice@example.net", **fields) -> Envelope:
        writer = self.spool.new_message()
        writer.write(BODY)
        envelope = Envelope("", sender, list(recipients), self.reactor.seconds(), **fields)
        writer.commit(envelope)
        self.scheduler.submit(envelope)
        return envelope


def rcpt(address, route="out", **kw):
    return Recipient(address, address, route, **kw)


def fail_for(*addresses):
    def decide(address):
        if address in addresses:
            return DeliveryResult("failed", 550, "5.1.1", f"host mx said: no {address}",
                                  "mx.r.test[192.0.2.1]:25", remote_mta="mx.r.test",
                                  diagnostic=f"smtp; 550 5.1.1 no {address}")
        return ok(address)
    return decide


def test_one_bounce_for_all_failures_is_spooled_before_the_original_goes(tmp_path):
    h = Harness(tmp_path, fail_for("x@r.test", "y@r.test"))
    requests = []
    submit = h.spool._submit

    def tracking_submit(request):
        requests.append((type(request).__name__, request.queue_id))
        return submit(request)
    h.spool._submit = tracking_submit
    original = h.submit(rcpt("x@r.test"), rcpt("ok@r.test"), rcpt("y@r.test"))
    h.reactor.advance(0)
    # the bounce went to alice through "out", then nothing is left
    bounces = [(env, addrs, body) for env, addrs, body in h.out.received if env.sender == ""]
    assert len(bounces) == 1
    env, addrs, body = bounces[0]
    assert addrs == ["alice@example.net"] and env.notification == "bounce"
    report = parse(body)
    finals = [blk["Final-Recipient"] for blk in list(report.iter_parts())[1].get_payload()[1:]]
    assert finals == ["rfc822; x@r.test", "rfc822; y@r.test"]
    assert requests.index(("_Commit", env.queue_id)) < requests.index(("_Remove", original.queue_id))
    assert h.spool.queue_ids() == []


def held_postmaster_copy(tmp_path):
    """A bounce that fails, then its postmaster copy that fails: (harness, the held copy)."""
    h = Harness(tmp_path, fail_for("x@r.test", "alice@example.net"),
                decide_local=fail_for("postmaster@local.test"))
    with capturedLogs() as events:
        h.submit(rcpt("x@r.test"))
        h.reactor.advance(0)
    senders = [env.notification for env, _, _ in h.out.received + h.local.received]
    assert senders == [None, "bounce", "postmaster"]
    [(_, _, _), (_, _, _), (copy, _, _)] = h.out.received + h.local.received
    # the original and the bounce are gone; the postmaster copy stays, held
    assert h.spool.queue_ids() == [copy.queue_id]
    assert h.scheduler.queued() == []
    reason = h.scheduler.held()[copy.queue_id]
    assert reason.startswith("undeliverable postmaster notification: <postmaster@local.test>: 550 5.1.1")
    stored = h.spool.load(copy.queue_id)
    assert stored.held == reason
    assert [(r.state, r.notified) for r in stored.recipients] == [(FAILED, False)]
    lines = [formatEvent(e) for e in events]
    assert [line for line in lines if "held" in line] == [
        f"{copy.queue_id}: held: {reason}; kept in the queue, neither retried nor expired, "
        "until an administrator releases or removes it"]
    assert not any("discarded" in line for line in lines)
    # neither retried nor expired, however long it waits
    with capturedLogs() as events:
        h.reactor.advance(10 * 86400)
    assert not any(copy.queue_id in formatEvent(e) for e in events)
    assert len(h.local.received) == 1 and h.spool.queue_ids() == [copy.queue_id]
    return h, copy


def test_failed_bounce_goes_to_the_postmaster_and_a_failed_postmaster_copy_is_held(tmp_path):
    held_postmaster_copy(tmp_path)


def test_a_held_message_stays_held_across_a_restart_and_is_delivered_when_released(tmp_path):
    h, copy = held_postmaster_copy(tmp_path)
    h.scheduler.stopService()
    h.scheduler.startService()                 # recovery skips it
    h.reactor.advance(86400)
    assert len(h.local.received) == 1
    assert list(h.scheduler.held()) == [copy.queue_id] and h.scheduler.queued() == []
    # the postmaster's mailbox works again; an administrator releases the copy
    h.local.decide = ok
    assert h.scheduler.release("no-such-id") is False
    with capturedLogs() as events:
        assert h.scheduler.release(copy.queue_id) is True
        h.reactor.advance(0)
    assert f"{copy.queue_id}: released" in [formatEvent(e) for e in events]
    assert [addrs for _, addrs, _ in h.local.received] == [["postmaster@local.test"]] * 2
    assert h.scheduler.held() == {} and h.spool.queue_ids() == []


def test_a_released_message_that_fails_again_is_held_again(tmp_path):
    h, copy = held_postmaster_copy(tmp_path)
    assert h.scheduler.release(copy.queue_id)
    assert h.spool.queue_ids() == [copy.queue_id]
    h.reactor.advance(0)
    assert len(h.local.received) == 2
    assert list(h.scheduler.held()) == [copy.queue_id]
    assert h.spool.load(copy.queue_id).held is not None


def test_an_expired_postmaster_copy_is_held_not_discarded(tmp_path):
    def busy(address):
        return DeliveryResult.deferred("mailbox busy", 451, "4.2.0")
    h = Harness(tmp_path, fail_for("x@r.test"), decide_local=busy, lifetime=3600)
    h.submit(rcpt("x@r.test"), sender="")         # a null-sender message: its failure to the postmaster
    h.reactor.advance(0)
    [copy_id] = h.spool.queue_ids()
    h.reactor.advance(2 * 3600)                      # the copy expires in the queue
    assert h.spool.queue_ids() == [copy_id]
    assert "4.4.7 message expired" in h.scheduler.held()[copy_id]
    stored = h.spool.load(copy_id)
    assert stored.held and stored.recipients[0].state == FAILED


def test_envelope_release_makes_unreported_failures_pending():
    done = Recipient("a@x", "a@x", "r", state=DELIVERED)
    lost = Recipient("p@x", "p@x", "r", state=FAILED, finished_at=5.0, attempts=3)
    envelope = Envelope("ID", "", [done, lost], 0.0, held="undeliverable")
    envelope.release(100.0)
    assert envelope.held is None
    assert (done.state, lost.state, lost.next_attempt, lost.finished_at, lost.attempts) == \
        (DELIVERED, PENDING, 100.0, None, 3)
    assert Envelope.from_json(envelope.to_json()) == envelope


def test_null_sender_mail_is_never_bounced_to_its_sender(tmp_path):
    h = Harness(tmp_path, fail_for("x@r.test"))
    h.submit(rcpt("x@r.test"), sender="")
    h.reactor.advance(0)
    [postmaster_copy] = h.local.received
    assert postmaster_copy[1] == ["postmaster@local.test"]
    assert all(env.sender == "" for env, _, _ in h.out.received)
    assert [addrs for _, addrs, _ in h.out.received] == [["x@r.test"]]


def test_one_delay_warning_after_the_configured_time_unless_notify_excludes_it(tmp_path):
    def defer_remote(address):
        if address.endswith("@r.test"):
            return DeliveryResult.deferred("connect to mx.r.test: Connection refused", 451, "4.4.1")
        return ok(address)
    h = Harness(tmp_path, defer_remote, delay_warning=900)
    h.submit(rcpt("slow@r.test"), rcpt("quiet@r.test", notify=("FAILURE",)))
    for _ in range(8):
        h.reactor.advance(600)
    warnings = [(env, addrs, body) for env, addrs, body in h.out.received if env.notification]
    assert len(warnings) == 1
    env, addrs, body = warnings[0]
    assert env.notification == "delay" and addrs == ["alice@example.net"]
    blocks = list(parse(body).iter_parts())[1].get_payload()[1:]
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; slow@r.test"]
    assert blocks[0]["Action"] == "delayed"
    stored = h.spool.load(h.scheduler.queued()[0])
    assert [r.delay_notified for r in stored.recipients] == [True, True]


def test_success_reports_only_when_asked_and_not_taken_over_by_the_next_hop(tmp_path):
    def relayed(address):
        forwarded = address == "dsn-capable@r.test"
        return DeliveryResult("delivered", 250, "2.0.0", "Ok: queued", "mx.r.test[192.0.2.1]:25",
                              remote_mta="mx.r.test", notify_forwarded=forwarded)
    h = Harness(tmp_path, relayed)
    h.submit(rcpt("dsn-capable@r.test", notify=("SUCCESS",)),
             rcpt("old-mta@r.test", notify=("SUCCESS", "FAILURE")),
             rcpt("me@local.test", "local", notify=("SUCCESS",)),
             rcpt("quiet@r.test"))
    h.reactor.advance(0)
    reports = [parse(body) for env, _, body in h.out.received if env.notification == "success"]
    actions = sorted((blk["Final-Recipient"], blk["Action"])
                     for report in reports
                     for blk in list(report.iter_parts())[1].get_payload()[1:])
    assert actions == [("rfc822; me@local.test", "delivered"), ("rfc822; old-mta@r.test", "relayed")]


def test_an_unreported_failure_found_at_start_is_bounced(tmp_path):
    reactor = FakeReactor()
    spool = Spool(str(tmp_path / "spool"), reactor=reactor)
    writer = spool.new_message()
    writer.write(BODY)
    writer.commit(Envelope("", "alice@example.net", [failed_recipient("x@r.test")], START))
    out = ScriptedBackend(ok)
    scheduler = DeliveryScheduler(spool, {"out": out, "local": ScriptedBackend(ok)}, Retry(),
                                  reactor=reactor, notifier=notifier())
    scheduler.startService()
    reactor.advance(0)
    assert [env.notification for env, _, _ in out.received] == ["bounce"]
    assert spool.queue_ids() == []


# -- ETRN -------------------------------------------------------------------------------------

def test_flush_makes_pending_recipients_of_a_domain_due_now(tmp_path):
    attempts = []

    def defer_all(address):
        attempts.append(address)
        return DeliveryResult.deferred("try later", 451, "4.4.1")
    h = Harness(tmp_path, defer_all)
    h.submit(rcpt("a@example.org"))
    h.submit(rcpt("b@sub.example.org"))
    h.submit(rcpt("c@other.test"))
    h.reactor.advance(0)
    assert len(attempts) == 3
    assert h.scheduler.flush("example.org") == 1
    h.reactor.advance(0)
    assert attempts[3:] == ["a@example.org"]
    assert h.scheduler.flush("@example.org") == 2
    h.reactor.advance(0)
    assert sorted(attempts[4:]) == ["a@example.org", "b@sub.example.org"]
    assert h.scheduler.flush("nothing.test") == 0
    assert h.scheduler.flush(None) == 3


def test_a_bounce_that_cannot_be_spooled_is_decided_again_and_the_original_kept(tmp_path):
    h = Harness(tmp_path, fail_for("x@r.test"))
    original = h.submit(rcpt("x@r.test"), rcpt("later@r.test", "local"))
    new_message = h.spool.new_message
    broken = [True]

    def failing_new_message():
        if broken[0]:
            raise OSError(28, "No space left on device")
        return new_message()
    h.spool.new_message = failing_new_message
    with capturedLogs() as events:
        h.local.decide = lambda address: DeliveryResult.deferred("busy", 451, "4.2.0")
        h.reactor.advance(0)
    assert any("cannot spool a delivery status notification" in formatEvent(e) for e in events)
    stored = h.spool.load(original.queue_id)
    assert [r.notified for r in stored.recipients] == [False, False]   # not marked on disk
    broken[0] = False
    h.local.decide = ok
    h.reactor.advance(300)                                            # the next round
    bounces = [env for env, _, _ in h.out.received if env.notification == "bounce"]
    assert len(bounces) == 1
    assert h.spool.queue_ids() == []
