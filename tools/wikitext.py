"""Wikitext to the plain text a model reads, redirect targets, and the token budget that text is cut to.

Parsing is mwparserfromhell's. Dropped: templates (infoboxes, citations, navboxes), references, comments, galleries,
and links to files and categories (their captions are layout, not prose). Kept: section headings (as `== Title ==`,
so the model sees the page's structure), link text, list items, table cells.
"""

from __future__ import annotations

import functools
import math
import re

import mwparserfromhell
from mwparserfromhell.nodes import Comment, Tag, Template, Text, Wikilink

DROPPED_TAGS = {"ref", "references", "gallery"}
DROPPED_LINK_NAMESPACES = {"file", "image", "category"}


def _dropped(node) -> bool:
    if isinstance(node, (Template, Comment)):
        return True
    if isinstance(node, Tag):
        return str(node.tag).strip().lower() in DROPPED_TAGS
    if isinstance(node, Wikilink):
        namespace, colon, _ = str(node.title).strip().lstrip(":").partition(":")
        return bool(colon) and namespace.strip().lower() in DROPPED_LINK_NAMESPACES
    return False


def plain_text(wikitext: str) -> str:
    code = mwparserfromhell.parse(wikitext)
    for node in code.filter(recursive=True):
        if _dropped(node):
            try:
                code.remove(node)
            except ValueError:  # inside something removed already
                pass
    for heading in code.filter_headings(recursive=True):
        marks = "=" * heading.level
        code.replace(heading, Text(f"\n{marks} {heading.title.strip_code().strip()} {marks}\n"))
    text = code.strip_code(normalize=True, collapse=True)
    lines = (line.strip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def redirect_target(wikitext: str) -> str | None:
    """The page a redirect points to (without a #section), or None for an article.

    MediaWiki's redirect magic word is `#REDIRECT` in any case at the very start, followed by a link; localised
    spellings (`#WEITERLEITUNG`) are not recognised here.
    """
    head = wikitext.lstrip()
    if head[:9].lower() != "#redirect":
        return None
    links = mwparserfromhell.parse(head).filter_wikilinks(recursive=False)
    if not links:
        return None
    target = str(links[0].title).split("#", 1)[0].strip().lstrip(":")
    return target or None


class TextBudget:
    """Cuts text to `max_tokens`: tokens of `tokenizer` (a Hugging Face name or folder) if given, else 4 characters
    to a token. The tokenizer loads once, on first use."""

    def __init__(self, max_tokens: int, tokenizer: str | None = None):
        self.max_tokens, self.tokenizer_name = max_tokens, tokenizer
        self._tokenizer = None
        # tokenising a long page takes milliseconds, and the same pages are asked for again and again
        self._end = functools.lru_cache(maxsize=4096)(self._end)

    def _end(self, text: str) -> int | None:
        """Where the text must be cut (a token boundary), or None when it fits."""
        if self.tokenizer_name is None:
            return None if math.ceil(len(text) / 4) <= self.max_tokens else self.max_tokens * 4
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        offsets = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return None if len(offsets) <= self.max_tokens else offsets[self.max_tokens - 1][1]

    def cut(self, text: str) -> tuple[str, bool]:
        """(the text, whether it was cut)."""
        end = self._end(text)
        return (text, False) if end is None else (text[:end], True)
