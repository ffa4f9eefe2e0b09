"""moec's logger: `logging.getLogger("moec")`, shown through rich. `MOEC_LOGS=debug` (one of the
comma-separated MOEC_LOGS words) turns on debug messages, e.g. which Triton config ran."""

import logging
import os

log = logging.getLogger("moec")
if not log.handlers:
    from rich.logging import RichHandler

    log.addHandler(RichHandler(show_time=False, show_path=False, markup=False))
    debug = "debug" in {s.strip() for s in os.environ.get("MOEC_LOGS", "").split(",")}
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False

_status = [lambda text: None]


def status(text: str) -> None:
    """Say what a long compile is doing now (compile's progress display shows it; a no-op otherwise)."""
    _status[-1](text)
