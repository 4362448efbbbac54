"""What train.py and sample.py share: argument parsing that fails on one line, and the exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from gpt_jax.errors import ConfigError, GptJaxError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise ConfigError, so they print as one line and exit 2."""

    def error(self, message: str):
        raise ConfigError(f"{message}; see {self.prog} --help")


def config_parser(prog: str, description: str, shown: str | None = None, default: str = "") -> ArgumentParser:
    """A command line of every Config key (``--key=value``) after an optional preset; ``--help`` shows
    each key's description and the value the preset ``shown`` gives it (Config's defaults without one);
    ``default`` says which preset runs when none is named."""
    from gpt_jax.config import FIELDS, Config, coerce, read_preset

    values = {**Config().to_dict(), **(read_preset(shown) if shown else {})}
    parser = ArgumentParser(
        prog=prog, allow_abbrev=False, argument_default=argparse.SUPPRESS,
        description=f"{description} Options override the config file; the values in brackets are those "
                    f"of {shown or 'the defaults'}.",
    )
    parser.add_argument("config", nargs="?", help="a preset name or file, e.g. configs/shakespeare_char.py"
                        + (f" (default: {default})" if default else ""))
    for name, field in FIELDS.items():
        kind = field.type if isinstance(field.type, str) else field.type.__name__
        extra = {"nargs": "?", "const": "True"} if kind == "bool" else {}
        parser.add_argument(f"--{name}", metavar=kind.upper(), type=lambda s, n=name: coerce(n, s),
                            help=f"{field.metadata['help']} [{values[name]!r}]", **extra)
    return parser


def parse_config_args(prog: str, description: str, argv: list[str],
                      default_preset: Callable[[], str] | None = None) -> tuple[str | None, dict[str, Any]]:
    """(preset or None, {key: value}) from ``[CONFIG] --key=value ...``; ``--help`` prints the keys with
    the values of the preset that would run (``default_preset()`` when none is named) and exits. Raises
    ConfigError naming an unknown key."""
    from gpt_jax.config import parse_overrides

    if any(a in ("-h", "--help") for a in argv):
        named = next((a for a in argv if not a.startswith("-")), None)
        shown = named or (default_preset() if default_preset else None)
        default = "shakespeare_char on an accelerator, else shakespeare_char_cpu" if default_preset else ""
        config_parser(prog, description, shown, default).parse_args(["--help"])
    parsed, unknown = config_parser(prog, description).parse_known_args(argv)
    parse_overrides(unknown)  # raises a ConfigError that names the unknown key
    args = vars(parsed)
    preset = args.pop("config", None)
    if preset and not preset.endswith(".py") and os.path.exists(os.path.expanduser(preset)):
        raise ConfigError(f"{preset} is data, not a config file (a preset name or a .py file); did you mean "
                          f"--dataset={preset}?")
    return preset, args


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
