"""`forecast-grpo wiki ...` and `forecast-grpo news ...`: a page as of a date by hand, the tool service standalone,
cache snapshots, and the news importer.

Exit codes: 0 done; 1 a tool error (missing page, not yet, leak, upstream failure, ...) or nothing to write; 2 a bad
argument, config or file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from tools.config import ToolsConfig
from tools.errors import ToolError


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="a job YAML: its `tools:` section is the starting config")
    ap.add_argument("--cache", help="SQLite cache file (tools.wiki.cache)")


def _wiki_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="forecast-grpo wiki", description="Wikipedia pages as they stood on a date.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    get = sub.add_parser("get", help="print a page as of a date (resolved title, revision id and time, text)")
    get.add_argument("title")
    get.add_argument("--as-of", required=True, help="YYYY-MM-DD: the page as it stood at the end of that day (UTC)")
    get.add_argument("--endpoint", help="MediaWiki api.php URL (tools.wiki.endpoint)")
    get.add_argument("--offline", action="store_true", help="answer from the cache only")
    get.add_argument("--json", action="store_true", help='print one object {"title", "revid", "timestamp", "text"} '
                     'or {"error": {"code", "message"}}')
    _common(get)
    serve = sub.add_parser("serve", help="run the tool service (GET /revision, /search, /news, /health, /metrics)")
    serve.add_argument("--host", help="address to bind (default: tools.service.host, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: tools.service.port; 0 picks a free one)")
    serve.add_argument("--endpoint", help="MediaWiki api.php URL (tools.wiki.endpoint)")
    serve.add_argument("--offline", action="store_true", help="answer from the cache only")
    serve.add_argument("--snapshot", help="a snapshot to import into the cache first (tools.wiki.snapshot)")
    serve.add_argument("--news-corpus", help="news corpus Parquet (tools.news.corpus)")
    _common(serve)
    snap = sub.add_parser("snapshot", help="export the cache to one Parquet file, or import one into it")
    snap_sub = snap.add_subparsers(dest="action", required=True)
    exp = snap_sub.add_parser("export", help="write the whole cache to FILE.parquet")
    exp.add_argument("file")
    _common(exp)
    imp = snap_sub.add_parser("import", help="add FILE.parquet's rows to the cache (rows already there are kept)")
    imp.add_argument("file")
    _common(imp)
    return ap


def _config(args) -> ToolsConfig:
    """The job YAML's `tools:` section (if given), then the flags. Raises ValueError naming the file or flag."""
    cfg = ToolsConfig()
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        try:
            cfg = ToolsConfig.model_validate((yaml.safe_load(path.read_text()) or {}).get("tools") or {})
        except ValidationError as e:
            raise ValueError(f"{path}: tools: {e}") from None
    flags = {"endpoint": (cfg.wiki, "endpoint"), "cache": (cfg.wiki, "cache"), "snapshot": (cfg.wiki, "snapshot"),
             "news_corpus": (cfg.news, "corpus")}
    for flag, (section, name) in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            try:
                setattr(section, name, value)
            except ValidationError as e:
                raise ValueError(f"--{flag.replace('_', '-')}: {e.errors()[0]['msg']}") from None
    if getattr(args, "offline", False):
        cfg.wiki.offline = True
    return cfg


async def _get(cfg: ToolsConfig, title: str, as_of: dt.date) -> dict:
    from tools.cache import WikiCache
    from tools.wiki import WikiRevisionClient
    from tools.wikitext import TextBudget

    client = WikiRevisionClient(cfg.wiki, WikiCache(cfg.wiki.cache))
    try:
        rev = await client.get(title, as_of)
    finally:
        await client.aclose()
    return rev.answer(TextBudget(cfg.wiki.text_max_tokens, cfg.wiki.tokenizer))


def _wiki_get(args, cfg: ToolsConfig) -> int:
    try:
        try:
            as_of = dt.date.fromisoformat(args.as_of)
        except ValueError:
            raise ToolError("bad_request", f"--as-of {args.as_of!r} is not an ISO date (YYYY-MM-DD)") from None
        page = asyncio.run(_get(cfg, args.title, as_of))
    except ToolError as e:
        if args.json:
            print(json.dumps(e.body(), ensure_ascii=False))
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2 if e.code == "bad_request" else 1
    if args.json:
        print(json.dumps({k: page[k] for k in ("title", "revid", "timestamp", "text")}, ensure_ascii=False))
        return 0
    via = f" (redirected from {', '.join(page['redirected_from'])})" if page["redirected_from"] else ""
    cut = f", cut to {cfg.wiki.text_max_tokens} tokens" if page["truncated"] else ""
    print(f"title:     {page['title']}{via}\nrevid:     {page['revid']}\ntimestamp: {page['timestamp']}{cut}\n")
    print(page["text"])
    return 0


def _wiki_serve(args, cfg: ToolsConfig) -> int:
    from tools.service import WikiRevisionService, bind, make_server

    host = args.host or cfg.service.host or "127.0.0.1"
    sock = bind(host, cfg.service.port if args.port is None else args.port)
    service = WikiRevisionService(cfg)
    mode = "offline, cache only" if cfg.wiki.offline else cfg.wiki.endpoint
    print(f"serving on http://{host}:{sock.getsockname()[1]} ({mode}; cache {cfg.wiki.cache}); Ctrl-C stops",
          flush=True)
    try:
        make_server(service.app).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then re-raises the Ctrl-C it caught
        print("stopped")
    finally:
        service.close()
    return 0


def _wiki_snapshot(args, cfg: ToolsConfig) -> int:
    from tools.cache import WikiCache

    cache = WikiCache(cfg.wiki.cache)
    if args.action == "export":
        counts = cache.export_snapshot(args.file)
        verb = f"wrote {args.file}"
    else:
        counts = cache.import_snapshot(args.file)
        verb = f"imported {args.file} into {cfg.wiki.cache} (new rows)"
    print(f"{verb}: " + ", ".join(f"{n} {kind} rows" for kind, n in counts.items()))
    return 0


def wiki_main(argv: list[str]) -> int:
    args = _wiki_parser().parse_args(argv)
    try:
        cfg = _config(args)
        return {"get": _wiki_get, "serve": _wiki_serve, "snapshot": _wiki_snapshot}[args.cmd](args, cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def news_main(argv: list[str]) -> int:
    from tools import news

    ap = argparse.ArgumentParser(prog="forecast-grpo news", description="Dated news items for the news tool.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="validate a file of news items and write the corpus Parquet",
                         description="Columns: date (ISO date or datetime; with a time zone, its UTC day), title, "
                         "summary, source (required), url (may be empty). Every bad row is printed with its number "
                         "and field and skipped; skipped rows are counted by reason.")
    imp.add_argument("format", choices=news.FORMATS)
    imp.add_argument("file")
    imp.add_argument("-o", "--out", required=True, help="corpus.parquet to write")
    args = ap.parse_args(argv)
    try:
        items, report = news.import_news(args.file, args.format)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    if not items:
        print("error: nothing to write", file=sys.stderr)
        return 1
    news.write_corpus(items, args.out)
    print(f"wrote {args.out}")
    return 0
