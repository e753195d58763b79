"""The pieces of a reload that need no server: restart-only settings, log files, releases."""

from __future__ import annotations

import dataclasses
import os

from twisted.logger import FilteringLogObserver, LogPublisher, textFileLogObserver
from twisted.python.logfile import LogFile
from zope.interface import implementer

from pymta.config.loader import load_config
from pymta.interfaces import IClosable
from pymta.logtext import ClassicTextObserver
from pymta.reload.logfiles import log_files, reopen_log_files
from pymta.reload.restart_only import RESTART_ONLY, hold_for_restart
from pymta.server.generation import release_plugins


def config_at(tmp_path, spool: str = "spool", extra: str = ""):
    path = tmp_path / "pymta.toml"
    path.write_text(f'[spool]\ndirectory = "{spool}"\n{extra}')
    return load_config(str(path))


def test_a_restart_only_change_keeps_the_running_value_and_is_named(tmp_path):
    running = config_at(tmp_path)
    new = config_at(tmp_path, "elsewhere", 'sync = "syncfs"\n[limits]\nmax_recipients = 7\n')
    held, keys = hold_for_restart(running, new)
    # the control socket's default is in the spool directory: it moves with it
    assert keys == ["spool.directory", "spool.sync", "control.socket"]
    assert (held.spool_dir, held.spool_sync) == (running.spool_dir, running.spool_sync)
    assert held.control_socket == running.control_socket
    assert held.limits.max_recipients == 7                 # the rest is the new file's
    assert hold_for_restart(running, config_at(tmp_path))[1] == []


def test_entries_for_tables_a_config_lacks_are_skipped(tmp_path, monkeypatch):
    running = config_at(tmp_path)
    monkeypatch.setitem(RESTART_ONLY, "a_table_to_come", "[later]")
    assert not hasattr(running, "a_table_to_come")
    assert hold_for_restart(running, dataclasses.replace(running))[1] == []


def test_log_files_are_found_behind_the_observers_and_reopened(tmp_path):
    path = tmp_path / "pymta.log"
    logfile = LogFile.fromFullPath(str(path))
    publisher = LogPublisher()
    publisher.addObserver(FilteringLogObserver(ClassicTextObserver(logfile, lambda e: None), []))
    publisher.addObserver(textFileLogObserver(open(os.devnull, "w")))      # not a LogFile
    assert log_files(publisher) == [logfile]
    logfile.write("before\n")
    os.rename(path, tmp_path / "pymta.log.1")
    assert reopen_log_files(publisher) == []
    logfile.write("after\n")
    logfile.flush()
    assert path.read_text() == "after\n" and (tmp_path / "pymta.log.1").read_text() == "before\n"


def test_a_log_file_that_cannot_be_reopened_stays_in_use(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    logfile = LogFile.fromFullPath(str(directory / "pymta.log"))
    publisher = LogPublisher()
    publisher.addObserver(ClassicTextObserver(logfile, lambda e: None))
    os.rename(directory, tmp_path / "moved")                # the path is gone
    [problem] = reopen_log_files(publisher)
    assert f"cannot reopen the log file {directory / 'pymta.log'}" in problem
    logfile.write("still here\n")
    logfile.flush()
    assert (tmp_path / "moved" / "pymta.log").read_text() == "still here\n"


@implementer(IClosable)
class Holder:
    closed = 0

    def close(self):
        self.closed += 1


def test_release_closes_closable_plugins_once_and_an_unshared_resolver(tmp_path):
    old = config_at(tmp_path)
    holder = Holder()
    old.backends = {"local": holder}
    successor = config_at(tmp_path)
    assert successor.resolver is not old.resolver
    assert release_plugins(old, successor) == ["backends.local", "dns resolver"]
    assert holder.closed == 1
    again = load_config(str(tmp_path / "pymta.toml"), previous=successor)
    assert again.resolver is successor.resolver          # [dns] unchanged: shared, cache and all
    assert release_plugins(successor, again)[-1:] != ["dns resolver"]
