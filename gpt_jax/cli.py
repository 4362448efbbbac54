"""What train.py and sample.py share: argument parsing that fails on one line, and the exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

from gpt_jax.errors import ConfigError, GptJaxError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise ConfigError, so they print as one line and exit 2."""

    def error(self, message: str):
        raise ConfigError(f"{message}; see {self.prog} --help")


def _quiet_exit(code: int) -> None:
    """Exit with nothing printed after the error line: after a failed checkpoint write, the storage
    library's remaining background writes report the same failure, with tracebacks, as the process
    shuts down, and would bury the one line that says what to do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stderr.fileno())
    sys.exit(code)


def run(main: Callable[[list[str]], int | None], prog: str) -> None:
    """Call ``main(sys.argv[1:])``; a user error prints ``prog: error: ...`` and exits 2.

    Warnings print as one line each, ``prog: warning: ...``.
    """
    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    warnings.showwarning = show_warning
    try:
        code = main(sys.argv[1:])
    except GptJaxError as e:
        message = " ".join(str(e).split())
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        _quiet_exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or 0)
