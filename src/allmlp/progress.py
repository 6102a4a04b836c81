"""Progress of long commands on stderr: a tqdm bar on a terminal, a plain line every tenth of the work otherwise
(logs, CI, pipes), so that every command a person waits for says how far it is."""

from __future__ import annotations

import os
import sys
from typing import TextIO

MIN_BAR_WIDTH = 20  # narrower terminals (a width of 0 included) get plain lines: a bar cannot be drawn there


def is_interactive(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stderr) is a terminal wide enough for a bar."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns >= MIN_BAR_WIDTH
    except (AttributeError, OSError, ValueError):  # no file descriptor, or not a terminal after all
        return False


class Progress:
    """Counts work done out of `total` (None: unknown) in `unit`s; use as a context manager or call close()."""

    def __init__(self, total: int | None, desc: str, unit: str = "images", interactive: bool | None = None):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.interactive = is_interactive() if interactive is None else interactive
        self.bar = None
        self._next_line, self._printed_at = 0, 0
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", dynamic_ncols=True, file=sys.stderr)

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.done >= self._next_line:
            self._line()
            # every tenth of a known total; at doubling counts when the total is unknown
            step = max(1, self.total // 10) if self.total else max(1, self.done)
            self._next_line = (self.done // step + 1) * step

    def _line(self) -> None:
        of = f"/{self.total}" if self.total else ""
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        print(f"{self.desc}: {self.done}{of} {self.unit}{share}", file=sys.stderr, flush=True)
        self._printed_at = self.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done != self._printed_at:  # the final count, unless it was just printed
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
