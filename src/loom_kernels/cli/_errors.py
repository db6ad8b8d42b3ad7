"""The command lines' errors and warnings: one line each, naming the option and the fix; ``--debug`` shows
the traceback.

A library error (``ValueError``, ``FileNotFoundError``, a missing optional dependency...) already says
what is wrong in the library's terms; :func:`option` puts the command-line option in front of it, and
:func:`entry` turns whatever escapes ``main`` into ``prog: error: ...`` on stderr with exit status 1
(argparse's own usage errors keep their status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import warnings

__all__ = ["CliError", "HelpFormatter", "entry", "option", "add_debug", "say"]

# Errors whose message is the whole story; anything else is likely a bug, so the line invites --debug.
_USER_ERRORS = (ValueError, TypeError, OSError, ImportError, FloatingPointError, KeyError)


class CliError(Exception):
    """A command-line mistake; the message names the option and the fix."""


def say(msg: str) -> None:
    """A one-line note or warning on stderr (stdout stays for results)."""
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def option(name: str, value=None):
    """Errors raised inside name the option (and its value) they came from: ``--data x.npy: <message>``."""
    try:
        yield
    except CliError:
        raise
    except _USER_ERRORS as exc:
        shown = name if value is None else f"{name} {value}"
        raise CliError(f"{shown}: {_one_line(exc)}") from exc


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once, as ``(default: X)``; none for flags and for None (the help says what
    None means), so no option carries two."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def add_debug(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="on an error, show the full Python traceback")


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    return " ".join(msg.split())


def _warning_line(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001  (showwarning's)
    say(f"warning: {' '.join(str(message).split())}")


def entry(prog: str):
    """Decorates ``main(argv)``: errors become ``prog: error: <one line>`` (exit 1) unless ``--debug`` is given."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            args = sys.argv[1:] if argv is None else list(argv)
            if "--debug" in args:
                return main(argv)
            shown = warnings.showwarning
            warnings.showwarning = _warning_line
            try:
                return main(argv)
            except (CliError, *_USER_ERRORS) as exc:
                raise SystemExit(f"{prog}: error: {_one_line(exc)}") from exc
            except Exception as exc:  # noqa: BLE001  (a bug, most likely: one line, and how to see more)
                raise SystemExit(
                    f"{prog}: error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)"
                ) from exc
            finally:
                warnings.showwarning = shown

        return run

    return wrap
