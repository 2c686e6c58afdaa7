"""The real loop with tools on, as a user runs it: Ray, vLLM, DeepSpeed and the tool service (started by the job),
on the tool world and on a few real ForecastBench questions whose wiki calls go through the real client to a local
fake of the MediaWiki API; and `forecast-grpo eval --tools on`."""

import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from rollout import importers
from rollout import questions as qio
from tests.conftest import ROOT, SHARED, needs_shared
from tests.fake_mediawiki import ILLEGAL, FakeMediaWiki, normalise

pytestmark = pytest.mark.e2e
FB = SHARED / "data" / "forecastbench"
DEMO = str(ROOT / "cluster/configs/demo-cpu.yaml")


def train(tmp_path, model, *sets, timeout=600):
    cmd = [sys.executable, "-m", "cluster.train", "--config", DEMO, "--set", f"model.path={model}",
           "--set", f"run.out_dir={tmp_path}", "--set", "run.progress=false", "--set", "run.eval_samples=2",
           "--set", "run.eval_max_questions=8", "--set", "run.trajectories_every=1",
           "--set", f"tools.wiki.tokenizer={model}", *[a for s in sets for a in ("--set", s)]]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_trajectories(run_dir):
    """Masks: 0 on the prompt and on every tool result, 1 on the model's tokens; sampler logprobs only there."""
    tables = [pq.read_table(p) for p in sorted((run_dir / "trajectories").glob("step_*.parquet"))]
    assert tables
    with_tools = 0
    for t in tables:
        for row in t.to_pylist():
            mask, lp, plen = row["loss_mask"], row["sampler_logprobs"], row["prompt_len"]
            assert len(row["tokens"]) == len(mask) == len(lp)
            assert not any(mask[:plen]) and mask[plen] == 1
            assert all((v <= 0) if m else (v == 0) for m, v in zip(mask, lp))
            if row["tool_calls"]:
                with_tools += 1
                assert 0 in mask[plen:] and row["turns"] >= 2
            assert row["leak_violations"] == 0
    return with_tools


def test_tool_world_loop(tmp_path, tiny_model, tool_world_files):
    cache = tmp_path / "cache.sqlite"
    res = train(tmp_path, tiny_model, "run.name=tw", "run.steps=3", f"tools.wiki.cache={cache}",
                f"tools.wiki.snapshot={tool_world_files / 'wiki.parquet'}")
    run_dir = tmp_path / "tw"
    m = metrics(run_dir)
    assert [r["step"] for r in m] == [0, 1, 2]
    for r in m:
        assert r["tool_calls"] > 0 and r["leak_violations"] == 0 and r["turns_mean"] > 1
        assert 0 <= r["cache_hit_rate"] <= 1 and r["tool_errors"] >= 0
    assert check_trajectories(run_dir) > 0
    assert "| turns" in res.stdout and "leaks 0" in res.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["eval_after"]) == {"train", "heldout", "train (no tools)", "heldout (no tools)"}
    assert summary["tools"]["tool_calls"] == sum(r["tool_calls"] for r in m)
    assert summary["tools"]["leak_violations"] == 0
    assert "leak violations" in res.stdout


class EveryTitle(FakeMediaWiki):
    """A lying upstream where every title the model asks for exists: a revision from long before the questions and
    one from after them, which it shows for half of the requests whatever date was asked."""

    def _revisions(self, p, lie, cut):
        title = normalise(p.get("titles", ""))
        if title and not ILLEGAL.search(title) and title not in self.pages:
            n = len(self.pages)
            self.pages[title] = [{"revid": 2 * n + 1, "timestamp": "2015-01-01T00:00:00Z",
                                  "content": f"{title} is a page from 2015."},
                                 {"revid": 2 * n + 2, "timestamp": "2030-01-01T00:00:00Z",
                                  "content": f"{title} was WRITTEN IN 2030."}]
            self.pageids[title] = len(self.pageids) + 1
        return super()._revisions(p, lie, cut)


@needs_shared(FB)
def test_forecastbench_questions_with_the_wiki_tool(tmp_path, tiny_model):
    """Real questions train with the wiki tool, its calls going through the real service and client to a lying fake
    of the MediaWiki API. The tiny model calls tools on its own only on tool-world players, so the first turn is a
    required call (task.tool_choice: required): the model still writes the title."""
    from transformers import AutoTokenizer

    qs, _ = importers.import_forecastbench(FB / "2025-10-26-llm.json", FB / "2025-10-26_resolution_set.json")
    short = [q for q in qs if len(q.text + q.background + q.resolution_criteria) < 600]  # prompts that fit
    market = [q for q in short if q.market_prob is not None][:6]
    data = tmp_path / "fb.parquet"
    qio.write_parquet(market, data)
    with EveryTitle({"pages": {}}) as wiki:
        wiki.lie = 0.5
        res = train(tmp_path, tiny_model, "run.name=fb", "run.steps=2", "task.source=parquet", f"task.data={data}",
                    "task.families=[]", "task.tool_choice=required", "rollout.prompts_per_step=4",
                    "rollout.max_model_len=1024", "rollout.max_new_tokens=64", "rollout.max_trajectory_tokens=320",
                    f"tools.wiki.endpoint={wiki.url}", "tools.wiki.offline=false", "tools.wiki.snapshot=null",
                    f"tools.wiki.cache={tmp_path / 'fb-cache.sqlite'}", "tools.wiki.contact=tests@example.org")
        asked = {r["params"].get("titles") for r in wiki.requests} - {None}
    assert "tool service: http://" in res.stdout
    m = metrics(tmp_path / "fb")
    assert [r["step"] for r in m] == [0, 1]
    assert all(r["tool_calls"] > 0 and r["leak_violations"] == 0 for r in m)
    assert sum(r.get("tool_errors_leak", 0) for r in m) > 0, m  # the lies were caught, by the service
    assert check_trajectories(tmp_path / "fb") > 0 and asked
    tok = AutoTokenizer.from_pretrained(tiny_model)
    shown = 0
    for t in sorted((tmp_path / "fb" / "trajectories").glob("step_*.parquet")):
        for row in pq.read_table(t, columns=["tokens", "prompt_len", "loss_mask"]).to_pylist():
            plen = row["prompt_len"]
            prompt, rest = tok.decode(row["tokens"][:plen]), tok.decode(row["tokens"][plen:])
            # what the tools showed (mask 0 after the prompt): the model's own titles may hold any digits
            shown_text = tok.decode([t for t, m in zip(row["tokens"][plen:], row["loss_mask"][plen:]) if not m])
            assert "<tools>" in prompt and "wiki" in prompt.split("</tools>")[0]
            assert any(q.text in prompt for q in market)
            assert rest.startswith("<tool_call>") and "2030" not in shown_text
            shown += "is a page from 2015" in shown_text
    assert shown > 0  # and honest pages were shown


def test_eval_with_tools_on_and_off(tmp_path, tiny_model):
    """`forecast-grpo eval --tools on` has the model call the wiki: its calls go through the service the command
    starts to a fake of the MediaWiki API holding the tool world's pages, which is asked for the players in the
    questions; `--tools off` asks it nothing."""
    from rollout import synthetic, tool_world

    qs = synthetic.questions(["tool_world"], "heldout")[:6]
    data = tmp_path / "tw.parquet"
    qio.write_parquet(qs, data)
    pages = {}
    for title, revid, timestamp, wikitext in tool_world.revisions():
        pages.setdefault(title, []).append({"revid": revid, "timestamp": timestamp, "content": wikitext})
    out, asked = {}, {}
    with FakeMediaWiki({"pages": pages}) as wiki:
        for tools in ("on", "off"):
            n = len(wiki.requests)
            res = subprocess.run([sys.executable, "-m", "cluster.cli", "eval", "--model", str(tiny_model), "--data",
                                  str(data), "--samples", "2", "--tools", tools, "--config", DEMO, "-o",
                                  str(tmp_path / tools), "--set", f"tools.wiki.cache={tmp_path / 'c.sqlite'}",
                                  "--set", "tools.wiki.snapshot=null", "--set", "tools.wiki.offline=false",
                                  "--set", f"tools.wiki.endpoint={wiki.url}",
                                  "--set", "tools.wiki.contact=tests@example.org",
                                  "--set", f"tools.wiki.tokenizer={tiny_model}"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
            out[tools] = json.loads((tmp_path / tools / "summary.json").read_text())
            asked[tools] = {r["params"].get("titles") for r in wiki.requests[n:]} - {None}
            assert ("tool service answers at" in res.stdout) == (tools == "on")
    assert out["on"]["sampling"]["tools"] == ["wiki"] and out["off"]["sampling"]["tools"] == []
    for s in out.values():
        assert s["forecasters"]["model"]["questions"] == 6
    players = {re.search(r"Player \d+", q.text).group(0) for q in qs}
    assert asked["on"] & players, asked["on"]  # the model looked its players up
    assert asked["off"] == set()
