"""A model's free-text query as an SQLite FTS5 query: every word a quoted string, any of them may match (bm25 ranks
pages matching more of them higher), so punctuation and FTS5 keywords in the query are text, never syntax."""

from __future__ import annotations


def fts_match(query: str) -> str:
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in query.split())
