"""What multi-turn tool calling costs, against references run in the same command.

    python bench/multiturn_cost.py [--model models/tiny] [--config cluster/configs/demo-cpu.yaml] [--repeats 5]
                                   [--upstream-latency 0.05] [--no-misses]

1. Seconds per rollout step with tools on (every call a cache hit: the tool world's snapshot, offline) against the
   same batch shape with tools off (one turn, no tool schemas in the prompt).
2. Generation tokens/s through the multi-turn rollout against raw `vllm.LLM.generate` on the same token counts:
   the reference replays every conversation's turns in turn order, each turn of every conversation in one
   `generate` call from its exact context, forced to the length the model sampled (no tool round trips, perfect
   batching, the same prefix cache). Model tokens only count, in both.
3. Generation tokens/s with `rollout.deterministic_turns` (every answer of a step's calls in before the engine's next
   step, the next turns in conversation order) against today's order (a turn goes in once its answers are read):
   both each round, which one first alternating; the median of each round's ratio, and the ratio of each order's
   best round (the least disturbed by whatever else the machine runs), are reported.
4. The whole rollout step, `RolloutWorker.rollout` as the driver calls it (today's order, cache hits): the engine's
   reseed, the prompts' fit check, the conversation loop, scoring every conversation, and building the
   `TrajectoryBatch`; not the object store put that Ray does with the return value (that needs a Ray instance:
   `bench/rollout_overhead.py` measures it). Its model tokens/s against the raw replay of its own batch's turns,
   and the milliseconds it spends outside the conversation loop (the loop timed inside the step).
5. Cache misses: the same loop (1.) against a tool service with a fresh, empty cache every run (no snapshot, not
   offline) in front of the fake MediaWiki (`tests/fake_mediawiki.py`, its own process, the tool world's pages)
   answering every request after `--upstream-latency` seconds: every distinct call of a step goes upstream, at most
   `tools.wiki.max_concurrency` (3) at a time. Both orders each round, like 3.; each against the cache-hit run in the
   same order (seconds per step) and against the raw replay of its own turns (model tokens/s).

The tool service runs as a user runs it, in its own process (`forecast-grpo wiki serve`, the job's `tools:` section
after the overrides); the rollout worker (one engine for all of them: tools on in both orders, off, the whole step,
the misses and the raw replays) is in this process, on core 1. Rounds alternate them; medians are reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ORDER = {False: "today's order", True: "deterministic turns"}


def start_service(tools, workdir: Path, name: str) -> tuple[subprocess.Popen, str]:
    """`forecast-grpo wiki serve` on a free port with `tools` (a ToolsConfig) as its config; returns once it answers."""
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"tools": tools.model_dump(mode="json")}))
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "wiki", "serve", "--config", str(config), "--port",
                             "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    found = re.search(r"serving on (http://\S+)", proc.stdout.readline())  # printed once it listens
    if found is not None:
        url = found.group(1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                time.sleep(0.5)
    proc.kill()
    sys.exit("the tool service did not start")


def stop(proc: subprocess.Popen | mp.Process) -> None:
    proc.kill()
    if isinstance(proc, subprocess.Popen):
        proc.wait(10)
    else:
        proc.join(10)


def serve_upstream(latency_s: float, ready) -> None:
    """A child process: the fake MediaWiki holding the tool world's pages, every answer `latency_s` late. In a process
    of its own, so that the engine's steps never delay its answers. Serves until killed."""
    from rollout import tool_world
    from tests.fake_mediawiki import FakeMediaWiki

    pages: dict[str, list[dict]] = {}
    for title, revid, timestamp, wikitext in tool_world.revisions():
        pages.setdefault(title, []).append({"revid": revid, "timestamp": timestamp, "content": wikitext})
    with FakeMediaWiki({"pages": pages}) as fake:
        fake.latency_s = latency_s
        ready.put(fake.url)
        threading.Event().wait()


def start_upstream(latency_s: float) -> tuple[mp.Process, str]:
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=serve_upstream, args=(latency_s, ready), daemon=True)
    proc.start()
    return proc, ready.get(timeout=120)


def upstream_requests(url: str) -> int:
    """Requests the service has sent to the MediaWiki API (its /metrics)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return int(float(re.search(r"^forecast_tools_upstream_requests_total (\S+)$", text, re.M).group(1)))


def turns_of(prompt, ids, mask) -> list[tuple[list[int], int]]:
    """A conversation's model turns as (the exact context it was sampled from, the number of tokens sampled)."""
    ctx, out, pos = list(prompt), [], 0
    mask = list(mask) + [0]
    while pos < len(ids):
        end = pos
        while mask[end] == 1:
            end += 1
        if end > pos:
            out.append((list(ctx), end - pos))
        nxt = end
        while nxt < len(ids) and mask[nxt] == 0:
            nxt += 1
        ctx += ids[pos:nxt]
        pos = nxt
    return out


def batch_turns(batch) -> list[list[tuple[list[int], int]]]:
    """`turns_of` every sequence of a TrajectoryBatch."""
    out = []
    for i in range(batch.num_sequences):
        seq, p = batch.sequence(i), int(batch.prompt_lens[i])
        tokens, mask = batch.tokens[seq].tolist(), batch.loss_mask[seq].tolist()
        out.append(turns_of(tokens[:p], tokens[p:], mask[p:]))
    return out


def replay(llm, turns) -> float:
    """Seconds for raw `generate` to replay the turns: the k-th turn of every conversation in one call, each from
    its exact context and forced to its sampled length."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t = time.perf_counter()
    for k in range(max(len(t) for t in turns)):
        batch = [t[k] for t in turns if len(t) > k]
        params = [SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=1.0, logprobs=0,
                                 detokenize=False) for _, n in batch]
        llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in batch], params, use_tqdm=False)
    return time.perf_counter() - t


def time_calls(obj, name: str) -> list[float]:
    """Wrap obj's method `name` (on the instance; `del obj.<name>` unwraps it): the seconds of each call go to the
    list returned."""
    method, took = getattr(obj, name), []

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return method(*a, **kw)
        finally:
            took.append(time.perf_counter() - t)

    setattr(obj, name, timed)
    return took


def model_tokens(turns) -> int:
    return sum(n for t in turns for _, n in t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/tiny"))
    ap.add_argument("--config", default=str(ROOT / "cluster/configs/demo-cpu.yaml"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--upstream-latency", type=float, default=0.05,
                    help="seconds the fake MediaWiki takes to answer each request in the cache-miss runs (5.)")
    ap.add_argument("--no-misses", action="store_true", help="skip the cache-miss runs (5.)")
    args = ap.parse_args()

    from rollout import engine

    engine.configure_env(1, "1")

    from cluster.config import load_config
    from rollout import tool_world
    from rollout.task import QuestionSampler
    from rollout.worker import RolloutWorker

    cfg = load_config(args.config, [f"model.path={args.model}", f"tools.wiki.tokenizer={args.model}"])
    sampler = QuestionSampler(cfg.task, seed=0)
    workdir = Path(tempfile.mkdtemp(prefix="multiturn_cost_"))
    hit_tools = cfg.tools.model_copy(deep=True)
    hit_tools.wiki.cache = str(workdir / "hit.sqlite")  # the snapshot imported into it: every lookup a hit
    proc, url = start_service(hit_tools, workdir, "hit")
    upstream = None
    try:
        if not args.no_misses:  # the service of a miss run: no snapshot, online, the fake MediaWiki its upstream
            upstream, upstream_url = start_upstream(args.upstream_latency)
            miss_tools = cfg.tools.model_copy(deep=True)
            miss_tools.wiki.snapshot, miss_tools.wiki.offline, miss_tools.wiki.endpoint = None, False, upstream_url
            miss_tools.wiki.contact = "bench/multiturn_cost.py"
            warm_title = next(tool_world.revisions())[0]
        worker = RolloutWorker(cfg.rollout_job(), tool_url=url)  # one engine: vLLM is one per process here
        rcfg = worker._rollout.cfg  # the worker's rollout config: deterministic_turns is switched per run
        steps = {"tools on": [], "tools off": [], "whole step": [], "outside the loop": []}
        ours_tps, raw_tps, order_tps = [], [], {False: [], True: []}
        hit_s = {False: [], True: []}
        whole_ratio = []
        miss_s, miss_ratio, miss_upstream = {False: [], True: []}, {False: [], True: []}, {False: [], True: []}
        for r in range(args.repeats + 1):  # the first round warms everything up
            instances = sampler.step(r, cfg.rollout.prompts_per_step)
            orders = (False, True) if r % 2 else (True, False)  # alternate which goes first: noise
            # 1. and 3.: the conversation loop alone, cache hits, in both orders
            tps, took_s = {}, {}
            for deterministic in orders:
                rcfg.deterministic_turns = deterministic
                t = time.perf_counter()
                got = worker._converse(instances, cfg.rollout.group_size)
                took_s[deterministic] = took = time.perf_counter() - t
                tps[deterministic] = sum(sum(c.mask) for c in got) / took
                if not deterministic:
                    convs, on_s = got, took
                    asked = len(worker._rollout.runner._shared)  # distinct calls: the rest shared their answers
            kinds, worker.kinds = worker.kinds, []  # the same worker and engine with tools off: one turn
            t = time.perf_counter()
            worker.generate(instances)
            off_s = time.perf_counter() - t
            worker.kinds = kinds
            # 2.: the same turns through raw generate, turn by turn, each from its exact context and to its length
            turns = [turns_of(c.prompt, c.ids, c.mask) for c in convs]
            tokens = model_tokens(turns)
            raw_s = replay(worker.llm, turns)
            # 4.: the whole step as the driver asks for it, today's order, and the raw replay of its own batch
            rcfg.deterministic_turns = False
            loop = time_calls(worker, "_converse")  # the loop's share of the step, timed inside it
            t = time.perf_counter()
            batch, _ = worker.rollout(instances, r)
            whole_s = time.perf_counter() - t
            del worker._converse
            rest_s = whole_s - loop[0]  # reseed, fit check, scoring, batch building
            whole_turns = batch_turns(batch)
            whole_raw_s = replay(worker.llm, whole_turns)
            whole_tokens = model_tokens(whole_turns)
            # 5.: cache misses, each run against a service of its own with an empty cache
            missed = {}
            for deterministic in orders if upstream is not None else ():
                miss_tools.wiki.cache = str(workdir / f"miss-{r}-{int(deterministic)}.sqlite")
                service, service_url = start_service(miss_tools, workdir, "miss")
                # one page as of a date no question has (after the world ends): loads the service's tokenizer,
                # once per process and no miss's cost, and leaves nothing in the cache that this round asks
                httpx.get(service_url + "/revision", params={"title": warm_title, "as_of": str(
                    tool_world.END + dt.timedelta(days=1))}, timeout=60).raise_for_status()
                before = upstream_requests(service_url)
                worker.set_tool_url(service_url)
                rcfg.deterministic_turns = deterministic
                try:
                    t = time.perf_counter()
                    got = worker._converse(instances, cfg.rollout.group_size)
                    took = time.perf_counter() - t
                    sent = upstream_requests(service_url) - before
                finally:
                    worker.set_tool_url(url)
                    stop(service)
                got_turns = [turns_of(c.prompt, c.ids, c.mask) for c in got]
                got_raw_s = replay(worker.llm, got_turns)
                missed[deterministic] = (got, took, sent, got_raw_s / took)  # tokens/s ratio: the same tokens
            if r:
                steps["tools on"].append(on_s)
                steps["tools off"].append(off_s)
                steps["whole step"].append(whole_s)
                steps["outside the loop"].append(rest_s)
                ours_tps.append(tokens / on_s)
                raw_tps.append(tokens / raw_s)
                whole_ratio.append(whole_raw_s / whole_s)
                for deterministic, v in tps.items():
                    order_tps[deterministic].append(v)
                    hit_s[deterministic].append(took_s[deterministic])
                for deterministic, (_, took, sent, ratio) in missed.items():
                    miss_s[deterministic].append(took)
                    miss_ratio[deterministic].append(ratio)
                    miss_upstream[deterministic].append(sent)
            calls = sum(c.calls for c in convs)
            hits = sum(c.cache_hits for c in convs)
            print(f"round {r}: {len(convs)} conversations, {calls} tool calls ({asked} distinct, {hits} cache hits), "
                  f"{tokens} "
                  f"model tokens; tools on {on_s:.2f}s, tools off {off_s:.2f}s, raw replay {raw_s:.2f}s; tokens/s "
                  f"deterministic turns {tps[True]:.0f}, today's order {tps[False]:.0f}", flush=True)
            print(f"  whole step {whole_s:.2f}s ({rest_s * 1e3:.1f} ms outside the conversation loop; "
                  f"{batch.num_sequences} sequences, {whole_tokens} model tokens), its raw replay {whole_raw_s:.2f}s",
                  flush=True)
            for deterministic, (got, took, sent, ratio) in missed.items():
                errors = sum((c.errors for c in got), start=Counter())
                print(f"  misses, {ORDER[deterministic]}: "
                      f"{took:.2f}s (cache hits {took_s[deterministic]:.2f}s), {sum(c.calls for c in got)} tool "
                      f"calls, {sent} upstream requests, {sum(c.cache_hits for c in got)} cache hits of "
                      f"{sum(c.cache_lookups for c in got)} lookups, tool errors {dict(errors) or 'none'}, "
                      f"{sum(sum(c.mask) for c in got)} model tokens; tokens/s ratio to its raw replay {ratio:.3f}",
                      flush=True)
    finally:
        stop(proc)
        if upstream is not None:
            stop(upstream)
        shutil.rmtree(workdir, ignore_errors=True)
    med = statistics.median
    on, off_ = med(steps["tools on"]), med(steps["tools off"])
    o, r = med(ours_tps), med(raw_tps)
    print(f"shape: {cfg.rollout.prompts_per_step} questions x G {cfg.rollout.group_size}, {args.repeats} repeats")
    print(f"rollout step: tools on {on:.3f}s (median), tools off {off_:.3f}s: {on / off_:.2f}x")
    print(f"generation tokens/s: multi-turn rollout {o:.0f}, raw vLLM replay {r:.0f}")
    print(f"multiturn_cost: step ratio on/off {on / off_:.2f}; tokens/s ratio {o / r:.3f} (target >= 0.8)")
    ratios = [d / f for d, f in zip(order_tps[True], order_tps[False])]
    print(f"deterministic turns: tokens/s ratio to today's order {med(ratios):.3f} (median of "
          f"{len(ratios)} rounds: {', '.join(f'{x:.2f}' for x in ratios)}); best rounds {max(order_tps[True]):.0f} "
          f"vs {max(order_tps[False]):.0f}: {max(order_tps[True]) / max(order_tps[False]):.3f}")
    whole, rest = med(steps["whole step"]), med(steps["outside the loop"])
    print(f"whole step (RolloutWorker.rollout: reseed, fit check, conversation loop, scoring, batch building; no "
          f"object store put): {whole:.3f}s (median), of which {rest * 1e3:.1f} ms outside the conversation loop; "
          f"tokens/s ratio to the raw replay of its own turns {med(whole_ratio):.3f} (the loop alone {o / r:.3f})")
    if upstream is None:
        return
    line = []
    for deterministic, name in ORDER.items():
        m, h, vs_raw = med(miss_s[deterministic]), med(hit_s[deterministic]), med(miss_ratio[deterministic])
        print(f"cache misses, {name} (fresh cache each run, upstream {args.upstream_latency * 1e3:.0f} ms a request, "
              f"{med(miss_upstream[deterministic]):.0f} upstream requests a step): {m:.3f}s a step (median) vs "
              f"{h:.3f}s on cache hits: {m / h:.2f}x; tokens/s ratio to its raw replay {vs_raw:.3f}")
        line.append(f"miss/hit {name} {m / h:.2f}x, tokens/s vs raw {vs_raw:.3f}")
    print(f"multiturn_cost whole step and misses: whole step tokens/s vs raw {med(whole_ratio):.3f} ({rest * 1e3:.1f} "
          f"ms outside the loop); " + "; ".join(line))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
