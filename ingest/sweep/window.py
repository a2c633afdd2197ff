"""When sweeps may work: the off-peak window (``PREREAD_SWEEP_WINDOW``) and the nightly cron schedule."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta

_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True, slots=True)
class Window:
    """A daily local-time window; ``start > end`` spans midnight (``20:00-06:00``)."""

    start: time
    end: time

    def contains(self, moment: datetime) -> bool:
        """Whether local ``moment`` falls inside the window."""
        now = moment.time().replace(tzinfo=None)
        if self.start <= self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def parse_window(text: str | None) -> Window | None:
    """``'20:00-06:00'`` as a :class:`Window`; ``None`` or empty means always."""
    if not text or not text.strip():
        return None
    match = _WINDOW.match(text)
    if not match:
        raise ValueError(f"PREREAD_SWEEP_WINDOW={text!r}: expected HH:MM-HH:MM in local time, e.g. 20:00-06:00")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"PREREAD_SWEEP_WINDOW={text!r}: hours are 0-23 and minutes 0-59")
    return Window(time(h1, m1), time(h2, m2))


# --- cron -------------------------------------------------------------------------------

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))  # 0 and 7 are Sunday
_ALIASES = {"@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *", "@weekly": "0 0 * * 0"}


@dataclass(frozen=True, slots=True)
class Cron:
    """A five-field cron expression (minute hour day-of-month month day-of-week)."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool
    any_weekday: bool

    def matches(self, moment: datetime) -> bool:
        """Whether the minute of ``moment`` is a firing time."""
        if moment.minute not in self.minutes or moment.hour not in self.hours or moment.month not in self.months:
            return False
        day_ok = moment.day in self.days
        weekday_ok = (moment.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:  # cron: both restricted means either may match
            return day_ok and weekday_ok
        return day_ok or weekday_ok

    def previous(self, moment: datetime, horizon: timedelta = timedelta(days=8)) -> datetime | None:
        """The latest firing minute at or before ``moment`` within ``horizon``, or None."""
        candidate = moment.replace(second=0, microsecond=0)
        stop = moment - horizon
        # whole hours that cannot match are skipped in one step
        while candidate >= stop:
            if candidate.hour not in self.hours or candidate.month not in self.months:
                candidate = candidate.replace(minute=0) - timedelta(minutes=1)
                continue
            if self.matches(candidate):
                return candidate
            candidate -= timedelta(minutes=1)
        return None


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            step = int(step_text)
            if step < 1:
                raise ValueError(f"{name}: step must be positive")
        if part == "*":
            start, end = low, high
        elif "-" in part:
            a, b = part.split("-", 1)
            start, end = int(a), int(b)
        else:
            start = int(part)
            end = high if step > 1 else start
        if not (low <= start <= high and low <= end <= high and start <= end):
            raise ValueError(f"{name}: {part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    if name == "day of week":
        values = {v % 7 for v in values}
    return frozenset(values)


def parse_cron(text: str) -> Cron:
    """Parse a cron expression; raises ``ValueError`` naming ``PREREAD_SWEEP_SCHEDULE`` and the bad field."""
    expr = _ALIASES.get(text.strip(), text.strip())
    parts = expr.split()
    if len(parts) != 5:
        raise ValueError(f"PREREAD_SWEEP_SCHEDULE={text!r}: expected five fields (minute hour day month weekday)")
    try:
        sets = [_field(p, n, lo, hi) for p, (n, lo, hi) in zip(parts, _FIELDS)]
    except ValueError as exc:
        raise ValueError(f"PREREAD_SWEEP_SCHEDULE={text!r}: {exc}") from None
    minutes, hours, days, months, weekdays = sets
    return Cron(minutes, hours, days, months, weekdays, any_day=parts[2] == "*", any_weekday=parts[4] == "*")
