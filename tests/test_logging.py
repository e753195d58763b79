"""The log for operations: JSON lines, and twistd's log file left to logrotate.

``[log] format = "json"`` and ``twistd --logger pymta.logjson.observer`` are
read back with ``json.loads`` from a real server that delivered a message;
etc/logrotate.d/pymta is run by logrotate itself.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
from pathlib import Path

import pytest
from twisted.logger import LogLevel, LogPublisher, Logger
from twisted.python.failure import Failure

from conftest import BACKEND_TOML, ROOT, TWISTD, PymtaServer, require_program, wait_for_log
from pymta.logjson import JSONLineObserver
from test_systemd import readme_blocks

LOGROTATE = ROOT / "etc" / "logrotate.d" / "pymta"


def logrotate_config(tmp_path: Path, logs: Path, pid_file: Path) -> Path:
    """etc/logrotate.d/pymta for the test: its user, its log directory, its pid file."""
    import grp
    import pwd
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    text = LOGROTATE.read_text()
    assert "create 0640 pymta adm" in text and "/var/log/pymta/*.log {" in text
    assert "/run/pymta/twistd.pid" in text
    text = text.replace("create 0640 pymta adm", f"create 0640 {user} {group}")
    text = text.replace("/var/log/pymta/*.log", f"{logs}/*.log")
    text = text.replace("/run/pymta/twistd.pid", str(pid_file))
    config = tmp_path / "pymta.logrotate"
    config.write_text(text)
    config.chmod(0o644)
    return config


def test_the_logrotate_snippet_is_accepted_by_logrotate(tmp_path):
    """logrotate reads the snippet (its user and directory made local) and rotates the file."""
    logrotate = require_program("logrotate")
    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "pymta.log").write_text("a line\n")
    config = logrotate_config(tmp_path, logs, tmp_path / "none.pid")     # no server here
    run = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(config)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (logs / "pymta.log.1").read_text() == "a line\n"
    assert (logs / "pymta.log").read_text() == ""


def test_after_logrotate_the_server_writes_into_the_new_file(tmp_path):
    """twistd --logfile, logrotate -f with the snippet's postrotate (SIGHUP through the pid
    file): the server lives on and logs its next message into the new pymta.log."""
    logrotate = require_program("logrotate")
    from conftest import wait_until_serving
    logs = tmp_path / "log"
    logs.mkdir()
    server = PymtaServer(tmp_path, BACKEND_TOML)
    log_file, pid_file = logs / "pymta.log", tmp_path / "twistd.pid"
    proc = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile", str(pid_file), "--logfile", str(log_file),
                             "pymta", "--config", str(server.config)], cwd=tmp_path)
    server.proc, server.log = proc, log_file
    try:
        wait_until_serving(proc, server.port, log_file)
        config = logrotate_config(tmp_path, logs, pid_file)
        run = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(config)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "starting up" in (logs / "pymta.log.1").read_text()
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
            client.sendmail("a@example.org", ["alice@example.test"], b"Subject: r\r\n\r\nx\r\n")
        wait_for_log(server, r"to=<alice@example\.test>.*status=sent")
        assert proc.poll() is None
    finally:
        server.stop()


# -- JSON logs ----------------------------------------------------------------------------


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_json_log_lines_of_a_delivered_message(make_server):
    server = make_server(BACKEND_TOML + '\n[log]\nformat = "json"\n')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
        client.sendmail("a@example.org", ["alice@example.test"], b"Subject: j\r\n\r\nbody\r\n")
    wait_for_log(server, r'"status": "sent"')
    server.stop()
    text = server.log_text()
    started = text.index("\n{") + 1              # twistd's own first lines are text
    for line in text[started:].splitlines():     # from then on, every line is one object
        assert isinstance(json.loads(line), dict), line
    records = json_lines(text)
    [received] = [r for r in records if r["text"].endswith("nrcpt=1")]
    queue_id = received["fields"]["queue_id"]
    assert received["fields"]["sender"] == "a@example.org"
    assert received["namespace"] == "pymta.smtpd" and received["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", received["time"])
    [sent] = [r for r in records if r.get("fields", {}).get("status") == "sent"]
    assert sent["fields"]["queue_id"] == queue_id
    assert sent["fields"]["to"] == "alice@example.test"
    assert sent["text"].startswith(f"{queue_id}: to=<alice@example.test>, relay=local[maildir:")
    assert sent["text"].endswith(")") and "status=sent (250 2.0.0" in sent["text"]
    assert set(sent) == {"time", "level", "namespace", "text", "fields"}
    # the README's example is such a line
    [example] = [json.loads(block) for block in readme_blocks("json")]
    assert set(example) == set(sent) and set(example["fields"]) == set(sent["fields"])
    assert example["namespace"] == sent["namespace"]
    assert re.sub(r"\S+", "W", example["text"]) == re.sub(r"\S+", "W", sent["text"])


def test_twistd_logger_option_makes_every_line_json(tmp_path):
    server = PymtaServer(tmp_path, BACKEND_TOML)
    with server.log.open("ab") as log:
        proc = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "--logger", "pymta.logjson.observer",
                                 "pymta", "--config", str(server.config)],
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    server.proc = proc
    try:
        from conftest import wait_until_serving
        wait_until_serving(proc, server.port, server.log)
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
            client.sendmail("a@example.org", ["alice@example.test"], b"Subject: j\r\n\r\nbody\r\n")
        wait_for_log(server, r'"status": "sent"')
    finally:
        server.stop()
    lines = server.log_text().splitlines()
    records = [json.loads(line) for line in lines]        # every line, twistd's first ones too
    assert records[0]["text"].startswith("pymta on mx=")
    assert any(r["text"].startswith("twistd ") for r in records)
    assert any(r.get("fields", {}).get("status") == "sent" for r in records)


def test_json_observer_fields_tracebacks_and_legacy_events():
    import io
    out = io.StringIO()
    publisher = LogPublisher(JSONLineObserver(out, lambda event: None))
    log = Logger(namespace="pymta.test", observer=publisher)
    log.warn("{queue_id}: {what}\nsecond line", queue_id="Q1", what="odd", obj=object(),
             error=OSError("disk full"), size=12, flag=True)
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("it broke", Failure())
    publisher({"log_format": "legacy text", "log_system": "-", "log_level": LogLevel.info,
               "log_namespace": "log_legacy", "log_time": 1e9, "message": ("legacy text",),
               "isError": 0, "system": "-"})
    first, second, third = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["text"] == "Q1: odd\nsecond line" and first["level"] == "warn"
    assert first["fields"] == {"queue_id": "Q1", "what": "odd", "error": "disk full", "size": 12,
                               "flag": True}
    assert second["text"] == "it broke" and "ZeroDivisionError" in second["traceback"]
    assert third == {"time": third["time"], "level": "info", "namespace": "log_legacy",
                     "text": "legacy text", "system": "-"}


def test_a_wrong_log_format_is_one_line(tmp_path):
    from twisted.internet.testing import MemoryReactor

    from pymta.config.errors import ConfigError
    from pymta.config.loader import load_config
    config = tmp_path / "pymta.toml"
    config.write_text('[log]\nformat = "xml"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(str(config), MemoryReactor())
    assert str(raised.value).startswith(f"{config}: log.format: ")
    assert "json" in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_twistds_log_file_is_left_to_logrotate(tmp_path, log_format):
    """LogSetup's observer writes into twistd's --logfile, which no longer rotates at 1 MB."""
    from twisted.logger import textFileLogObserver
    from twisted.python.logfile import LogFile

    from pymta.logtext import speed_up_text_log
    log_file = LogFile.fromFullPath(str(tmp_path / "pymta.log"))
    assert log_file.rotateLength == 1_000_000            # twistd's default
    publisher = LogPublisher(textFileLogObserver(log_file))
    replacement = {"json": (JSONLineObserver,), "text": ()}[log_format]   # text: the default
    assert speed_up_text_log(publisher, *replacement) == 1
    assert log_file.rotateLength is None
    Logger(namespace="pymta", observer=publisher).info("{big}", big="x" * 1_100_000)
    Logger(namespace="pymta", observer=publisher).info("after")
    log_file.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pymta.log"]
    last = (tmp_path / "pymta.log").read_text().splitlines()[-1]
    assert (json.loads(last)["text"] if log_format == "json" else last).endswith("after")
