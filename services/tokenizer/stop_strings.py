"""Stop strings on a stream of text deltas: emit what cannot be part of a stop string, hold back the rest.

The emitted text of a whole stream equals the full text cut at the first stop occurrence: the one that starts
earliest, and of those that start at the same place the shortest (it completes first). With
`include_stop_str_in_output` the stop string itself is emitted too. Nothing after the match ever leaves.

Held back: the longest tail of the pending text that is still the beginning of some stop string, e.g. with
stop "</answer>" a stream ending in "...42</ans" emits "...42" and waits. A completed stop string is reported
only once no stop string that would start earlier can still complete.
"""
from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}]: a stop string must be a non-empty string")
        self.stop = tuple(dict.fromkeys(stop))
        self.include_stop_str_in_output = include_stop_str_in_output
        self.matched: str | None = None
        self._pending = ""  # text received but not emitted yet; always shorter than the longest stop + a delta

    def push(self, delta: str) -> tuple[str, str | None]:
        """Add a text delta; return (text safe to emit now, the stop string if the stream stops here)."""
        if self.matched is not None:
            return "", None  # already stopped: everything after the stop string is dropped
        if not self.stop:
            return delta, None
        pending = self._pending + delta
        match_start, match = _first_match(pending, self.stop)
        hold_from = _first_partial_match(pending, self.stop, until=match_start)
        if match is not None and hold_from == match_start:
            self.matched, self._pending = match, ""
            return pending[:match_start] + (match if self.include_stop_str_in_output else ""), match
        self._pending = pending[hold_from:]
        return pending[:hold_from], None

    def flush(self) -> str:
        """At the end of the stream nothing held back can grow into an earlier match any more: emit it, cut at
        a stop string it already contains (then `matched` says which)."""
        pending, self._pending = self._pending, ""
        if self.matched is not None or not pending:
            return ""
        match_start, match = _first_match(pending, self.stop)
        if match is None:
            return pending
        self.matched = match
        return pending[:match_start] + (match if self.include_stop_str_in_output else "")


def _first_match(text: str, stops: Sequence[str]) -> tuple[int, str | None]:
    """(start, stop) of the earliest stop string in `text` (the shortest on a tie); (len(text), None) if none."""
    best = (len(text), 0, None)
    for s in stops:
        start = text.find(s)
        if start != -1 and (start, len(s)) < best[:2]:
            best = (start, len(s), s)
    return best[0], best[2]


def _first_partial_match(text: str, stops: Sequence[str], until: int) -> int:
    """The earliest i < until where text[i:] is a proper prefix of some stop string (could still complete);
    `until` if there is none."""
    longest = max(map(len, stops))
    for i in range(max(0, len(text) - longest + 1), until):
        tail = text[i:]
        if any(len(s) > len(tail) and s.startswith(tail) for s in stops):
            return i
    return until
