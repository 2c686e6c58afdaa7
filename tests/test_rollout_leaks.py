"""An adversarial run through the rollout's own tool path: 10,000 calls written as a model writes them (some with
dates of their own, many far in the future), parsed, run by the rollout worker's `ToolRunner` against the real
service, whose upstream lies on a quarter of its answers, over redirects whose targets change, pages created after
the as-of date and searches for later events. Nothing later than a question's date may reach a conversation."""

import json
import random

from rollout.chat_format import ChatFormat
from rollout.multiturn import ToolRunner
from tests.fake_mediawiki import FakeMediaWiki
from tests.test_tools_adversarial import FUTURE, MARK, day, generate_world
from tools.config import ToolsConfig
from tools.service import serve_in_thread

KINDS = ["wiki", "wiki_search"]


def model_call(rng: random.Random, titles: list[str], queries: list[str]) -> str:
    if rng.random() < 0.25:
        args, name = {"query": rng.choice(queries)}, "wiki_search"
    else:
        args, name = {"title": rng.choice(titles)}, "wiki"
    if rng.random() < 0.3:  # a model that asks for another date: the question's date is used anyway
        args[rng.choice(["as_of", "date", "year"])] = rng.choice([str(FUTURE), "2026-01-01", "today"])
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


def test_ten_thousand_model_calls_let_nothing_later_into_a_conversation(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    fmt = ChatFormat(AutoTokenizer.from_pretrained(tiny_model), KINDS)  # Qwen2.5's call layout: vLLM's hermes parser
    world = generate_world(seed=3)
    rng = random.Random(4)
    titles = [*world, "Nowhere"]
    queries = [f"keyword{k}" for k in range(6)] + [f"report{y}" for y in range(2015, 2027)]
    dates = [day(rng, 2012, 2025) for _ in range(24)]
    results, shown_later, kinds = 0, [], {}
    with FakeMediaWiki({"pages": world}) as fake:
        fake.lie = 0.25
        cfg = ToolsConfig(wiki=fake.config(tmp_path / "cache.sqlite", retries=0))
        service = serve_in_thread(cfg)
        runner = ToolRunner(service.url, timeout_s=30)
        try:
            for _ in range(100):  # 100 rollout batches of 100 calls, all in flight at once
                batch = [(rng.choice(dates), model_call(rng, titles, queries)) for _ in range(100)]
                runner.new_batch()  # as a rollout batch does: repeated calls share an answer within it only
                tasks = [(as_of, runner.submit(fmt.parse_calls(text), as_of, KINDS))
                         for as_of, text in batch]
                runner.wait([t for _, t in tasks], timeout=120, every=True)
                for as_of, task in tasks:
                    for r in task.result():
                        results += 1
                        kinds[r.error or "ok"] = kinds.get(r.error or "ok", 0) + 1
                        later = [t for t in r.shown if t > f"{as_of}T23:59:59Z"]
                        later += [m for m in MARK.findall(r.content) if m > str(as_of)]
                        if later or r.leak_violation:
                            shown_later.append((as_of, later, r.content[:80]))
        finally:
            runner.close()
            service.stop()
    assert results == 10_000
    assert shown_later == []
    # not a vacuous run: pages were shown, lies were caught upstream, and the other answers happened too
    assert kinds["ok"] > 2_000 and kinds.get("leak", 0) > 100, kinds
    assert {"missing", "not_yet"} <= set(kinds), kinds
