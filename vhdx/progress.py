"""Progress bars for long CLI work, drawn by tqdm: width-aware (redrawn to the
terminal's width, never wrapping), bytes done/total, rate and ETA; silent when
stderr is not a terminal unless forced (``--progress``), off with ``--quiet``.

:class:`Progress` is the callback the library's long operations take
(``progress(done, total)``). :func:`clear_all` removes every bar still drawn,
so a message after Ctrl-C starts on a clean line.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, TextIO

# None: draw when stderr is a terminal; True: always (--progress); False: never (--quiet).
_mode: bool | None = None
_live: "weakref.WeakSet[Progress]" = weakref.WeakSet()


def configure(enabled: bool | None) -> bool | None:
    """Set the process-wide default: None (terminal only), True or False; returns
    the previous one (to restore it)."""
    global _mode
    old, _mode = _mode, enabled
    return old


class Progress:
    """Call with the bytes done (and optionally the total); ``close()`` when finished."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.total = max(int(total or 0), 0)
        self.label = label
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = _mode
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._bar: Any = None
        self._done = 0
        _live.add(self)
        if enabled:
            self._ensure_bar()  # drawn at once: the rate and ETA count from here

    def _ensure_bar(self) -> Any:
        if self._bar is None:
            from tqdm import tqdm

            # leave=False: the line is cleared when the bar closes, so what follows
            # (a result or an error) is never glued to a half-drawn bar.
            self._bar = tqdm(total=self.total or None, desc=self.label, unit="B", unit_scale=True,
                             unit_divisor=1024, dynamic_ncols=True, leave=False, file=self.stream,
                             mininterval=0.1, miniters=1, smoothing=0.1)
        return self._bar

    def __call__(self, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        bar = self._ensure_bar()
        if total is not None and total != self.total:
            self.total = max(int(total), 0)
            bar.total = self.total or None
            bar.refresh()
        if done != self._done:
            bar.update(done - self._done)
            self._done = done
            if self.total and done >= self.total:
                bar.refresh()  # the end is always drawn, however soon it comes

    def close(self) -> None:
        """Remove the bar from the screen (idempotent)."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()
        _live.discard(self)


def clear_all() -> None:
    """Close every bar still on screen (before an interruption or error message)."""
    for p in list(_live):
        p.close()


def human_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: a byte count as the CLI's reports show it."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)
