"""Progress of long steps: a tqdm bar in the terminal, and the same steps reported to a host UI.

Engines and adapters iterate their long loops with :func:`tqdm`, a drop-in for ``tqdm.auto.tqdm``
over a sized iterable. Its terminal bar shows unless ``disable`` (the engines' ``progress=``
flag). Independently of that flag, a host that installed a reporter with :func:`reporting`
receives every step: a host UI (ComfyUI's node progress bar, ``adapters/comfy_host.py``) has no
terminal, and a node runs the engines with their terminal bars off.

The reporter sees one bar per phase (prompt encoding, C0 batches, stage I, layer solves), as
``report(done, total, desc)`` with ``0 <= done <= total``: ``done`` starts at 0 when a phase
opens, never decreases within it and ends at ``total``. A bar opened inside another one (stage I
steps inside stage I chunks) is folded into the outer bar as a fraction of the current outer step,
so ``done`` is a float. The reporter may raise (ComfyUI's Cancel does): the loop stops there.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterable

from tqdm.auto import tqdm as _terminal_tqdm

Reporter = Callable[[float, int, str], None]


class _Bar:
    __slots__ = ("done", "total", "desc")

    def __init__(self, total: int, desc: str):
        self.done, self.total, self.desc = 0, total, desc


class _Tracker:
    """The bars open in one context, outermost first, and what was last sent to the reporter."""

    def __init__(self, report: Reporter):
        self.report = report
        self.bars: list[_Bar] = []
        self.sent: tuple | None = None

    def emit(self) -> None:
        top = self.bars[0]
        frac = 0.0  # progress through the current outer step, from the inner bars
        for bar in reversed(self.bars[1:]):
            frac = min(1.0, (bar.done + frac) / bar.total) if bar.total > 0 else 0.0
        value = min(float(top.total), top.done + frac)
        if self.sent is not None and self.sent[0] is top:
            if value <= self.sent[1]:  # an inner phase restarting inside one outer step
                return
        self.sent = (top, value)
        if top.total > 0:
            self.report(value, top.total, top.desc)

    def steps(self, iterable: Iterable, total: int, desc: str):
        bar = _Bar(total, desc)
        self.bars.append(bar)
        try:
            self.emit()
            for item in iterable:
                yield item
                bar.done += 1
                self.emit()
        finally:
            self.bars.remove(bar)  # by identity (_Bar has no __eq__); also when the loop is left early


class _Reported:
    """The terminal bar, iterated through the tracker; other attributes (``set_postfix``, ...)
    are the terminal bar's."""

    def __init__(self, tracker: _Tracker, bar, total: int, desc: str):
        self._tracker, self._bar, self._total, self._desc = tracker, bar, total, desc

    def __iter__(self):
        return self._tracker.steps(self._bar, self._total, self._desc)

    def __getattr__(self, name):
        return getattr(self._bar, name)


_ACTIVE: ContextVar[_Tracker | None] = ContextVar("concept_edit_progress", default=None)


@contextlib.contextmanager
def reporting(report: Reporter):
    """Send the progress of every :func:`tqdm` loop run inside this block (in this thread or
    context) to ``report(done, total, desc)``."""
    token = _ACTIVE.set(_Tracker(report))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def tqdm(iterable, *, desc: str | None = None, total: int | None = None, disable: bool = False, **kw):
    """``tqdm.auto.tqdm(iterable, ...)`` whose steps also go to the installed reporter, if any
    (whether or not the terminal bar is disabled)."""
    bar = _terminal_tqdm(iterable, desc=desc, total=total, disable=disable, **kw)
    tracker = _ACTIVE.get()
    if tracker is None:
        return bar
    if total is None:
        try:
            total = len(iterable)
        except TypeError:  # unsized: nothing to show a fraction of
            return bar
    return _Reported(tracker, bar, int(total), desc or "")
