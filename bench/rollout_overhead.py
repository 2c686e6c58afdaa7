"""Tokens/s through RolloutWorker against raw vLLM on the same prompts, in the same run.

    python bench/rollout_overhead.py [--model models/tiny] [--prompts 64] [--group 8] [--max-tokens 16] [--repeats 5]

ours: a RolloutWorker actor generates (G samples per prompt, sampled logprobs), parses and scores every answer,
builds the columnar batch, and the batch travels through Ray's object store into another actor, which reads it.
raw:  `vllm.LLM.generate` on the same token prompts with the same SamplingParams, in an actor with the same engine
settings and the same core, timed around the call alone.
Runs alternate (raw, ours, raw, ours, ...) so drift on this shared machine hits both; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models/tiny"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--families", default="dice,two_dice,urn,coin,calc")
    args = ap.parse_args()

    import numpy as np
    import ray

    from cluster.config import load_config
    from rollout import engine, prompts
    from rollout.chat_format import ChatFormat
    from rollout.task import QuestionSampler
    from rollout.worker import RolloutWorker

    cfg = load_config(None, [f"model.path={args.model}", f"rollout.group_size={args.group}",
                             f"rollout.max_new_tokens={args.max_tokens}", f"task.families=[{args.families}]"])
    instances = QuestionSampler(cfg.task, seed=0).step(0, args.prompts)

    @ray.remote
    class RawEngine:
        def __init__(self):
            engine.configure_env(cfg.rollout.cpu_kvcache_gib, "1")
            from transformers import AutoTokenizer

            fmt = ChatFormat(AutoTokenizer.from_pretrained(args.model), [], model_path=args.model)
            self.ids = [fmt.prompt_ids(prompts.user_message(i.question), i.question.as_of, tools=False)
                        for i in instances]
            self.llm = engine.make_engine(args.model, dtype="float32", max_model_len=cfg.rollout.max_model_len,
                                          seed=0)

        def run(self) -> tuple[float, int]:
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            sp = SamplingParams(n=args.group, temperature=1.0, max_tokens=args.max_tokens, logprobs=0,
                                flat_logprobs=True)
            t = time.perf_counter()
            out = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in self.ids], sp, use_tqdm=False)
            dt = time.perf_counter() - t
            return dt, sum(len(o.token_ids) for r in out for o in r.outputs)

    @ray.remote
    class Sink:
        def consume(self, batch) -> int:
            return int(batch.loss_mask.sum()) + int(np.isnan(batch.forecasts).sum() * 0)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    raw = RawEngine.options(num_cpus=0.5).remote()
    ours = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(cfg.rollout_job(), 0, "1")
    sink = Sink.options(num_cpus=0.1).remote()
    ray.get([raw.run.remote(), ours.ready.remote(), sink.consume.remote(ray.get(ours.generate.remote(instances)))])
    ray.get(raw.run.remote())  # both warmed up

    raw_tps, our_tps = [], []
    for _ in range(args.repeats):
        dt, toks = ray.get(raw.run.remote())
        raw_tps.append(toks / dt)
        t = time.perf_counter()
        toks = ray.get(sink.consume.remote(ours.generate.remote(instances)))
        our_tps.append(toks / (time.perf_counter() - t))
    r, o = statistics.median(raw_tps), statistics.median(our_tps)
    print(f"shape: {args.prompts} prompts x G {args.group}, max {args.max_tokens} new tokens, {args.repeats} repeats")
    print(f"raw vLLM        tokens/s median {r:9.0f}  (min {min(raw_tps):.0f}, max {max(raw_tps):.0f})")
    print(f"RolloutWorker   tokens/s median {o:9.0f}  (min {min(our_tps):.0f}, max {max(our_tps):.0f})")
    print(f"rollout_overhead: ratio {o / r:.3f} (target >= 0.85)")
    ray.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
