"""Build glue that pyproject.toml cannot express: the wheel carries etc/ as pymta/etc/.

``pymta example-config`` prints the commented example configuration from
there (pymta/config/example_command.py); the source tree keeps it in etc/.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

EXAMPLES = "etc"


class BuildWithExamples(build_py):
    """build_py, plus the files of etc/ as package data of pymta (pymta/etc/...)."""

    def _get_data_files(self):
        files = super()._get_data_files()
        names = []
        for root, dirs, filenames in os.walk(EXAMPLES):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            names += [os.path.relpath(os.path.join(root, name), EXAMPLES)
                      for name in sorted(filenames) if not name.endswith((".pyc", ".pyo"))]
        return files + [("pymta", EXAMPLES, os.path.join(self.build_lib, "pymta", "etc"), names)]


setup(cmdclass={"build_py": BuildWithExamples})
