"""moec's logger: `logging.getLogger("moec")`, shown through rich when on a terminal."""

import logging

log = logging.getLogger("moec")
if not log.handlers:
    from rich.logging import RichHandler

    log.addHandler(RichHandler(show_time=False, show_path=False, markup=False))
    log.setLevel(logging.INFO)
    log.propagate = False
