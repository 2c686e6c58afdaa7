"""What multi-turn tool calling costs, against references run in the same command.

    python bench/multiturn_cost.py [--model models/tiny] [--config cluster/configs/demo-cpu.yaml] [--repeats 5]

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

The tool service runs as a user runs it, in its own process (`forecast-grpo wiki serve`); the rollout worker (one
engine for all of them: tools on in both orders, off, and the raw replay) is in this process, on core 1. Rounds
alternate them; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_service(config: str, cache: str) -> tuple[subprocess.Popen, str]:
    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "wiki", "serve", "--config", config, "--port",
                             str(port), "--cache", cache], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the tool service did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/tiny"))
    ap.add_argument("--config", default=str(ROOT / "cluster/configs/demo-cpu.yaml"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from rollout import engine

    engine.configure_env(1, "1")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from cluster.config import load_config
    from rollout.task import QuestionSampler
    from rollout.worker import RolloutWorker

    cfg = load_config(args.config, [f"model.path={args.model}", f"tools.wiki.tokenizer={args.model}"])
    sampler = QuestionSampler(cfg.task, seed=0)
    proc, url = start_service(args.config, str(Path(tempfile.mkdtemp()) / "cache.sqlite"))
    try:
        worker = RolloutWorker(cfg.rollout_job(), tool_url=url)  # one engine: vLLM is one per process here
        steps = {"tools on": [], "tools off": []}
        ours_tps, raw_tps, order_tps = [], [], {False: [], True: []}
        for r in range(args.repeats + 1):  # the first round warms both up
            instances = sampler.step(r, cfg.rollout.prompts_per_step)
            tps = {}
            for deterministic in (False, True) if r % 2 else (True, False):  # alternate which goes first: noise
                worker._rollout.cfg.deterministic_turns = deterministic
                t = time.perf_counter()
                got = worker._converse(instances, cfg.rollout.group_size)
                took = time.perf_counter() - t
                tps[deterministic] = sum(sum(c.mask) for c in got) / took
                if not deterministic:
                    convs, on_s = got, took
            kinds, worker.kinds = worker.kinds, []  # the same worker and engine with tools off: one turn
            t = time.perf_counter()
            worker.generate(instances)
            off_s = time.perf_counter() - t
            worker.kinds = kinds
            # the same turns through raw generate, turn by turn, each from its exact context and to its length
            turns = []  # per conversation: [(context, generated length), ...]
            for c in convs:
                ctx, out, pos = list(c.prompt), [], 0
                mask = c.mask + [0]
                while pos < len(c.ids):
                    end = pos
                    while mask[end] == 1:
                        end += 1
                    if end > pos:
                        out.append((list(ctx), end - pos))
                    nxt = end
                    while nxt < len(c.ids) and mask[nxt] == 0:
                        nxt += 1
                    ctx += c.ids[pos:nxt]
                    pos = nxt
                turns.append(out)
            model_tokens = sum(n for t in turns for _, n in t)
            t = time.perf_counter()
            for k in range(max(len(t) for t in turns)):
                batch = [t[k] for t in turns if len(t) > k]
                params = [SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=1.0, logprobs=0,
                                         detokenize=False) for _, n in batch]
                worker.llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in batch], params, use_tqdm=False)
            raw_s = time.perf_counter() - t
            if r:
                steps["tools on"].append(on_s)
                steps["tools off"].append(off_s)
                ours_tps.append(model_tokens / on_s)
                raw_tps.append(model_tokens / raw_s)
                for deterministic, v in tps.items():
                    order_tps[deterministic].append(v)
            calls = sum(c.calls for c in convs)
            hits = sum(c.cache_hits for c in convs)
            asked = len(worker._rollout.runner._shared)  # distinct calls: the rest shared their answers
            print(f"round {r}: {len(convs)} conversations, {calls} tool calls ({asked} distinct, {hits} cache hits), "
                  f"{model_tokens} "
                  f"model tokens; tools on {on_s:.2f}s, tools off {off_s:.2f}s, raw replay {raw_s:.2f}s; tokens/s "
                  f"deterministic turns {tps[True]:.0f}, today's order {tps[False]:.0f}", flush=True)
    finally:
        proc.kill()
    on, off_ = statistics.median(steps["tools on"]), statistics.median(steps["tools off"])
    o, r = statistics.median(ours_tps), statistics.median(raw_tps)
    print(f"shape: {cfg.rollout.prompts_per_step} questions x G {cfg.rollout.group_size}, {args.repeats} repeats")
    print(f"rollout step: tools on {on:.3f}s (median), tools off {off_:.3f}s: {on / off_:.2f}x")
    print(f"generation tokens/s: multi-turn rollout {o:.0f}, raw vLLM replay {r:.0f}")
    print(f"multiturn_cost: step ratio on/off {on / off_:.2f}; tokens/s ratio {o / r:.3f} (target >= 0.8)")
    ratios = [d / f for d, f in zip(order_tps[True], order_tps[False])]
    print(f"deterministic turns: tokens/s ratio to today's order {statistics.median(ratios):.3f} (median of "
          f"{len(ratios)} rounds: {', '.join(f'{x:.2f}' for x in ratios)}); best rounds {max(order_tps[True]):.0f} "
          f"vs {max(order_tps[False]):.0f}: {max(order_tps[True]) / max(order_tps[False]):.3f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
