"""What "as of a date" means, in one place: through the end of that day in UTC.

Timestamps are MediaWiki's (`2024-05-01T12:00:00Z`): fixed width, UTC, so they compare as strings.
"""

from __future__ import annotations

import datetime as dt

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def end_of(as_of: dt.date) -> str:
    """The last second shown as of `as_of`: a revision stamped then is shown, one a second later is not."""
    return f"{as_of.isoformat()}T23:59:59Z"


def is_after(timestamp: str, as_of: dt.date) -> bool:
    return timestamp > end_of(as_of)


def check_timestamp(value: str) -> str:
    """`value` if it is a MediaWiki timestamp, else a ValueError saying what is expected."""
    try:
        dt.datetime.strptime(value, TIMESTAMP_FORMAT)
    except (TypeError, ValueError):
        raise ValueError("not a MediaWiki timestamp (YYYY-MM-DDTHH:MM:SSZ)") from None
    return value


def is_over(as_of: dt.date) -> bool:
    """Whether the day is over in UTC; until then its newest revision may still change, so answers aren't kept."""
    return as_of < dt.datetime.now(dt.timezone.utc).date()
