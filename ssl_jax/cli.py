"""Entry-point plumbing shared by the jobs: absl start-up and user errors as exit codes.

A mistake of the user's (a config key, a data path, a workdir) ends the job with a one-line
message naming the fix and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
from collections.abc import Callable

from absl import app, logging

from ssl_jax.checkpoint import WorkdirError
from ssl_jax.config import ConfigError
from ssl_jax.data.sources import DataError

USER_ERRORS = (ConfigError, DataError, WorkdirError)
EXIT_USER_ERROR = 2


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _OwnInfoOnly(std_logging.Filter):
    """Keeps INFO lines of this project; libraries (Orbax, Grain) speak up at WARNING and above.
    ``--verbosity=1`` shows everything."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return (record.levelno >= std_logging.WARNING or logging.get_verbosity() > 0
                or record.pathname.startswith(_PACKAGE_DIR))


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)`` with user errors turned into a message and exit code 2."""

    def guarded(argv: list[str]) -> None:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
        try:
            main(argv)
        except USER_ERRORS as e:
            logging.flush()
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    app.run(guarded)
