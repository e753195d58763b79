"""The faster text log observer writes exactly the lines twistd's would."""

from __future__ import annotations

import io
import time

import pytest
from twisted.logger import (FileLogObserver, FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            LogPublisher, Logger, jsonFileLogObserver, textFileLogObserver)
from twisted.python.failure import Failure

from pymta.logtext import ClassicTextObserver, speed_up_text_log


def twistd_and_ours():
    """twistd's observer and ours, each writing into its own buffer."""
    theirs_out, ours_out = io.StringIO(), io.StringIO()
    theirs = textFileLogObserver(theirs_out)
    ours = ClassicTextObserver(ours_out, theirs.formatEvent)
    return theirs, theirs_out, ours, ours_out


def emit(observer, log_format, **fields):
    publisher = LogPublisher(observer)
    Logger(namespace="pymta.smtpd", observer=publisher).info(log_format, **fields)


@pytest.mark.parametrize("log_format, fields", [
    ("{queue_id}: client={client}, from=<{sender}>, size={size}, nrcpt={nrcpt}",
     dict(queue_id="1K0V33JNMR6MZQ8A", client="unknown[127.0.0.1]:5000", sender="a@b.example",
          size=1192, nrcpt=1)),
    ("connect from {client}", dict(client="mx.example[192.0.2.1]")),
    ("multi\nline {x!r} {y:>5}", dict(x="é", y=3)),
    ("{a.real} and {{braces}}", dict(a=5)),
    ("no fields at all", {}),
])
def test_the_same_line_as_twistd(log_format, fields):
    theirs, theirs_out, ours, ours_out = twistd_and_ours()
    for observer in (theirs, ours):
        emit(observer, log_format, **fields)
    assert ours_out.getvalue() == theirs_out.getvalue()
    assert ours_out.getvalue().count("\n") >= 1


@pytest.mark.parametrize("event", [
    # a format with a call only Twisted's formatter applies
    {"log_format": "{thing.upper()}", "thing": "x"},
    # a missing field: Twisted writes its "Unable to format event" line
    {"log_format": "{missing}"},
    # legacy event with its own system
    {"log_format": "legacy", "log_system": "-"},
    # no format at all: no line
    {"message": ("hello",)},
])
def test_what_it_cannot_format_goes_to_twisted(event):
    theirs, theirs_out, ours, ours_out = twistd_and_ours()
    base = {"log_time": time.time(), "log_level": LogLevel.warn, "log_namespace": "ns"}
    theirs({**base, **event})
    ours({**base, **event})
    assert ours_out.getvalue() == theirs_out.getvalue()


def test_a_traceback_is_written_as_twisted_writes_it():
    theirs, theirs_out, ours, ours_out = twistd_and_ours()
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    for observer in (theirs, ours):
        Logger(namespace="t", observer=LogPublisher(observer)).failure("it broke: {why}", failure, why="x")
    assert "ZeroDivisionError" in ours_out.getvalue()
    assert ours_out.getvalue() == theirs_out.getvalue()


def test_timestamps_follow_the_clock_across_seconds():
    theirs, theirs_out, ours, ours_out = twistd_and_ours()
    for when in (1_000_000_000.2, 1_000_000_000.9, 1_000_000_001.1, 1_000_000_061.0):
        event = {"log_format": "tick", "log_time": when, "log_level": LogLevel.info, "log_namespace": "n"}
        theirs(event)
        ours(event)
    assert ours_out.getvalue() == theirs_out.getvalue()
    assert len(set(line.split(" ")[0] for line in ours_out.getvalue().splitlines())) == 3


def test_twistds_observer_is_replaced_inside_its_filters_and_others_are_left_alone():
    text_out, json_out = io.StringIO(), io.StringIO()
    text = textFileLogObserver(text_out)
    filtered = FilteringLogObserver(FilteringLogObserver(text, [LogLevelFilterPredicate()]), [])
    json_observer = jsonFileLogObserver(json_out)
    custom = FileLogObserver(io.StringIO(), lambda event: "custom\n")
    publisher = LogPublisher(filtered, json_observer, custom)
    assert speed_up_text_log(publisher) == 1
    assert isinstance(filtered._observer._observer, ClassicTextObserver)
    assert publisher._observers[1:] == [json_observer, custom]
    Logger(namespace="pymta", observer=publisher).info("hello {who}", who="world")
    assert text_out.getvalue().endswith(" [pymta#info] hello world\n")
    assert '"who": "world"' in json_out.getvalue()


def test_an_observer_straight_in_the_publisher_is_replaced_too():
    out = io.StringIO()
    publisher = LogPublisher(textFileLogObserver(out))
    assert speed_up_text_log(publisher) == 1
    assert isinstance(publisher._observers[0], ClassicTextObserver)
    Logger(namespace="pymta", observer=publisher).warn("careful")
    assert out.getvalue().endswith(" [pymta#warn] careful\n")


def test_a_line_logged_by_a_signal_handler_during_a_write_does_not_hang():
    """twistd's SIGTERM handler logs "Received SIGTERM" in the main thread, between any
    two bytecodes: also while that thread is writing a line. The second write must not
    wait for the first (it never ends then: no clean stop, no STOPPING=1 to systemd)."""
    import threading

    written: list[str] = []

    class InterruptedFile(io.StringIO):
        def write(self, text):
            if not written:                 # the signal arrives during the first line
                written.append("")
                emit(ours, "Received SIGTERM, shutting down.")
            written.append(text)
            return super().write(text)

    ours = ClassicTextObserver(InterruptedFile(), lambda event: None)
    writer = threading.Thread(target=emit, args=(ours, "disconnect from {client}"),
                              kwargs={"client": "x[127.0.0.1]"}, daemon=True)
    writer.start()
    writer.join(30)
    assert not writer.is_alive(), "the log write from the signal handler waits for itself"
    assert [line.split("] ", 1)[1] for line in written[1:]] == [
        "Received SIGTERM, shutting down.\n", "disconnect from x[127.0.0.1]\n"]
