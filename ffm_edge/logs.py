"""Logging set-up shared by the command-line tools."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging"]

# Third-party loggers whose INFO/WARNING lines are noise on a device or hub log.
_QUIET = ("bitsandbytes", "transformers", "peft", "urllib3", "filelock", "amqtt")


def setup_logging(verbose: bool = False) -> None:
    """Timestamped lines on stderr; third-party chatter only at ERROR unless ``verbose``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
