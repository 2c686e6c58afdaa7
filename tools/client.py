"""ToolClient: how a rollout worker calls the tool service, with one pooled async httpx client.

Every call has a timeout; a dead, slow or garbled service is `ToolError("unavailable", ...)`, and an error answer
is `ToolError(code, message)` as the service sent it, so a rollout always gets an answer or a tool error, never a
hang.
"""

from __future__ import annotations

import datetime as dt
import json

import httpx

from tools.errors import CODES, ToolError


def _query(query: str, as_of: dt.date, limit: int | None) -> dict:
    return {"q": query, "as_of": as_of.isoformat(), **({"limit": limit} if limit else {})}


class ToolClient:
    def __init__(self, base_url: str, timeout_s: float = 30.0, max_connections: int = 64):
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout_s, trust_env=False,  # the service is ours: never via a proxy
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    async def _get(self, path: str, params: dict | None = None) -> dict:
        try:
            r = await self._http.get(path, params=params)
        except httpx.TimeoutException:
            raise ToolError("unavailable", f"the tool service at {self.base_url} did not answer {path} within "
                            f"{self.timeout_s:g} s") from None
        except httpx.HTTPError as e:  # refused, reset, or a body cut short
            raise ToolError("unavailable", f"the tool service at {self.base_url} failed on {path}: "
                            f"{type(e).__name__}: {e}") from None
        try:
            body = json.loads(r.content)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ToolError("unavailable", f"the tool service at {self.base_url} sent no JSON object for {path} "
                            f"(HTTP {r.status_code})")
        error = body.get("error")
        if isinstance(error, dict) and error.get("code") in CODES:
            raise ToolError(error["code"], str(error.get("message", "")))
        if r.status_code != 200:
            raise ToolError("unavailable", f"the tool service at {self.base_url} answered {path} with HTTP "
                            f"{r.status_code} and no tool error")
        return body

    async def revision(self, title: str, as_of: dt.date) -> dict:
        return await self._get("/revision", {"title": title, "as_of": as_of.isoformat()})

    async def search(self, query: str, as_of: dt.date, limit: int | None = None) -> dict:
        return await self._get("/search", _query(query, as_of, limit))

    async def news(self, query: str, as_of: dt.date, limit: int | None = None) -> dict:
        return await self._get("/news", _query(query, as_of, limit))

    async def health(self) -> dict:
        return await self._get("/health")

    async def aclose(self) -> None:
        await self._http.aclose()
