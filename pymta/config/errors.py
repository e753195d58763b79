"""Configuration problems: the loader's ConfigError, a plugin factory's OptionError."""

import re


def one_line(text: str) -> str:
    """A problem text on one line (config errors are one line each)."""
    return re.sub(r"\s*\n\s*", " ", text).strip()


class ConfigError(Exception):
    """A configuration problem, reported as one line: '<file>: <key>: <problem>'."""
    def __init__(self, source: str, key: str, problem: str):
        super().__init__(f"{source}: {key}: {problem}")
        self.source, self.key, self.problem = source, key, problem
class OptionError(Exception):
    """Raised by a plugin factory for a bad option; the loader adds file and table."""
    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem
