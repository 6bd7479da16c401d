"""Entry-point plumbing shared by the jobs: absl start-up and user errors as exit codes.

A mistake of the user's ends the job with a one-line ``error: ...`` naming the fix, no traceback:

- exit code 2 (:data:`EXIT_USER_ERROR`): a bad flag, ``--config`` file or override, a config key,
  the data, the workdir, a weights file (:data:`USER_ERRORS`, absl flag errors);
- exit code 3 (:data:`EXIT_OS_ERROR`): the machine refused a read or a write (disk full, no
  permission, read-only file system, a file where a directory should be): an ``OSError``, or a
  checkpoint-library error that carries an OS error code. The message names the path; what was
  written before (earlier checkpoints) is left as it was.

Anything else is a bug and keeps its traceback (exit code 1). ``docs/bad_inputs.md`` lists the
bad inputs and their messages.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging

from ssl_jax import faults
from ssl_jax.checkpoint import WorkdirError
from ssl_jax.config import ConfigError
from ssl_jax.convert.files import WeightsError
from ssl_jax.data.sources import DataError

USER_ERRORS = (ConfigError, DataError, WorkdirError, WeightsError)
EXIT_USER_ERROR = 2
EXIT_OS_ERROR = 3

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Errors of the checkpoint library (TensorStore) name the OS error as "[os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_QUOTED_PATH = re.compile(r"[\"'](/[^\"']+)[\"']")
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose a --workdir on another disk",
    errno.EDQUOT: "the disk quota is used up: free space or choose a --workdir on another disk",
    errno.EACCES: "no permission there: fix the permissions or choose another path",
    errno.EPERM: "no permission there: fix the permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose a --workdir on a writable disk",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EEXIST: "a file is in the way of a directory: choose another path",
}
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class _OwnInfoOnly(std_logging.Filter):
    """Keeps INFO lines of this project; libraries (Orbax, Grain) speak up at WARNING and above.
    ``--verbosity=1`` shows everything."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return (record.levelno >= std_logging.WARNING or logging.get_verbosity() > 0
                or record.pathname.startswith(_PACKAGE_DIR))


def _chain(error: BaseException, implicit: bool = True) -> list[BaseException]:
    """``error`` and the exceptions it was raised from (``implicit``: or while handling),
    outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or (error.__context__ if implicit else None)
    return chain


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _exit(message: str, code: int) -> None:
    logging.flush()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def os_error(error: BaseException) -> tuple[int, str] | None:
    """``(errno, path)`` if ``error`` (or one it was raised from) is an OS error, else ``None``."""
    for e in _chain(error, implicit=False):
        if isinstance(e, OSError) and e.errno:
            return e.errno, e.filename or ""
        code = _OS_ERROR_CODE.search(str(e))
        if code:
            paths = _QUOTED_PATH.findall(str(e))
            return int(code.group(1)), paths[-1] if paths else ""
    return None


def os_error_message(code: int, path: str) -> str:
    """``error:`` line of an OS error: what failed, where, and what to do."""
    reason = os.strerror(code)
    hint = _OS_HINTS.get(code, "check the disk and the path")
    where = f" at {path}" if path else ""
    kept = (". Checkpoints written before are kept; the run resumes from the newest one"
            if code in _WRITE_ERRORS else "")
    return f"{reason} (errno {code}){where}: {hint}{kept}"


def _flag_error(error: BaseException, argv: list[str]) -> str:
    """One line for a flag that does not parse: a bad ``--config`` argument or override."""
    chain = _chain(error)
    user = [e for e in chain if isinstance(e, USER_ERRORS)]
    if user:  # raised by a config file's get_config (the innermost holds the plain message)
        return _one_line(user[-1])
    missing = [e for e in chain if isinstance(e, KeyError)]
    if missing:  # an override of a key the config does not have
        lines = str(missing[0].args[0]).splitlines()  # the outermost has "Did you mean ..."
        key = lines[0].strip("'\"")
        flag = next((a.split("=")[0] for a in argv[1:]
                     if re.fullmatch(rf"--\w+(\.\w+)*\.{re.escape(key)}(\.\w+)*(=.*)?", a)),
                    key)
        return (f"unknown config key in {flag}: the config has no {key!r}. "
                + _one_line(" ".join(lines[1:]))).strip()
    return _one_line(error)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's flag parsing, but a bad flag, a ``--config`` file that does not load or an override
    of an unknown key ends the job with one ``error:`` line and exit code 2."""
    try:
        rest = flag_values(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        _exit(_flag_error(e, argv), EXIT_USER_ERROR)
    for name in list(flag_values):
        try:  # a config file that failed to load raises on any attribute access
            getattr(flag_values[name].value, "_ssl_jax_probe", None)
        except OSError as e:
            detail = str(e.__cause__ or e).strip().splitlines()[-1].strip()
            _exit(f"--{name}: the config file does not load ({detail}); pass an existing file, "
                  f"e.g. --{name} configs/simclr.py:data=digits", EXIT_USER_ERROR)
    return rest


def guard(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """``main`` with user errors (exit code 2) and OS errors (exit code 3) turned into one
    ``error:`` line; the traceback of an OS error is logged at ``--verbosity=1``."""

    def guarded(argv: list[str]) -> None:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
        try:
            main(argv)
        except (*USER_ERRORS, flags.Error) as e:
            _exit(str(e), EXIT_USER_ERROR)
        except faults.Preempted as e:  # a checkpoint was saved: exit 75, start again
            logging.flush()
            print(e, file=sys.stderr)
            sys.exit(faults.EXIT_PREEMPTED)
        except faults.NonFiniteError as e:
            _exit(str(e), faults.EXIT_NONFINITE)
        except Exception as e:
            found = os_error(e)
            if found is None:
                raise
            logging.debug("traceback of the OS error", exc_info=True)
            _exit(os_error_message(*found), EXIT_OS_ERROR)

    return guarded


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)`` with bad flags and user errors as exit code 2, OS errors as 3."""
    app.run(guard(main), flags_parser=parse_flags)


def workdir_argument(argv: list[str]) -> str:
    """The ``--workdir`` of a job on a run (evaluation, fine-tuning), which takes no positional
    arguments; a flag error (exit code 2) otherwise."""
    if len(argv) > 1:
        raise flags.Error(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.workdir is None:
        raise flags.Error("--workdir is required")
    return flags.FLAGS.workdir
