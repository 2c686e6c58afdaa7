"""The one error every tool raises: a code the caller can branch on and a message the model can read.

Codes, and the HTTP status the service answers them with:

| code | meaning | HTTP |
| --- | --- | --- |
| `bad_request` | bad query parameters (as_of not a date, empty title or query, control characters, > 255 bytes) | 400 |
| `invalid_title` | the wiki says the title cannot exist, or its redirects loop | 400 |
| `missing` | no such page | 404 |
| `not_yet` | no revision at or before the as-of date: the page did not exist yet | 404 |
| `offline_miss` | offline mode and the answer is not in the cache | 404 |
| `leak` | the upstream answered with a revision later than the as-of date; refused, nothing kept | 502 |
| `upstream` | the upstream failed (after retries) | 502 |
| `internal` | a bug in the service (the message names the exception) | 500 |
| `unavailable` | the service itself could not be reached, timed out or sent no JSON (raised by `ToolClient`) | - |
"""

from __future__ import annotations

HTTP_STATUS = {"bad_request": 400, "invalid_title": 400, "missing": 404, "not_yet": 404, "offline_miss": 404,
               "leak": 502, "upstream": 502, "internal": 500}
CODES = (*HTTP_STATUS, "unavailable")
UNDATED = " (what it showed, and when, is in the service's log only: the date of a later edit is itself a leak)"
"""Ends every `leak` message, which the model reads: it never names the later revision, item or date."""


class ToolError(Exception):
    def __init__(self, code: str, message: str):
        if code not in CODES:
            raise ValueError(f"unknown tool error code {code!r}; codes: {', '.join(CODES)}")
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}
