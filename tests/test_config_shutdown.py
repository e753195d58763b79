"""[server] shutdown_timeout: the loader's reading of it."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactor

from pymta.config.errors import ConfigError
from pymta.config.loader import default_config, load_config


def _load(tmp_path, text: str):
    path = tmp_path / "pymta.toml"
    path.write_text(text)
    return load_config(str(path), MemoryReactor())


def test_the_default_is_30_seconds(tmp_path):
    assert default_config(MemoryReactor()).shutdown_timeout == 30.0
    assert _load(tmp_path, "[server]\ndomains = ['example.org']\n").shutdown_timeout == 30.0


@pytest.mark.parametrize("value, seconds", [("'2m'", 120.0), ("'1s'", 1.0), ("0", 0.0), ("1.5", 1.5)])
def test_a_duration(tmp_path, value, seconds):
    assert _load(tmp_path, f"[server]\nshutdown_timeout = {value}\n").shutdown_timeout == seconds


@pytest.mark.parametrize("value, problem", [
    ("'forever'", "expected a duration such as 30 (seconds)"),
    ("-1", "got negative number -1"),
    ("true", "expected a duration"),
])
def test_a_bad_value_is_one_line_naming_the_file_and_key(tmp_path, value, problem):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"[server]\nshutdown_timeout = {value}\n")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'pymta.toml'}: server.shutdown_timeout: ")
    assert problem in message
