"""How fast raw vLLM decodes a model on this CPU, against what the cores' arithmetic allows.

    python bench/decode_bound.py [--model models/smollm2-135m] [--cores 1,0-1] [--batches 16,64,256]

The bound: a decoded token costs 2 FLOP per weight of every matmul (attention projections, MLP, the LM head; the
attention over a short context is negligible here), and the cores do at most what `torch.matmul` does on the model's
own weight shapes at the batch's size, timed here with as many threads as the engine gets. Each setting runs raw
`vllm.LLM.generate` (no Ray, no project code) in its own process, because vLLM reads its thread binding
(`VLLM_CPU_OMP_THREADS_BIND`: "1" is one core, "0-1" both) once, at import. Every sequence decodes exactly
`--tokens` tokens (`ignore_eos`), so tokens/s is decode work, not how soon sequences stop.

    python bench/decode_bound.py --shape --model models/smollm2-135m-format [--block-size 128|32]

The step's shape, one change at a time, in one raw engine on one core (the project only builds the prompts): from
the same forced decode to what a GRPO step on dice generates (the recipe's 8 real prompts x G 8 in the model's chat
template, stopping at the model's end of turn, at most 16 tokens), so the gap between the two is split into its
parts: the prompts' prefill, the number of tokens a sequence decodes, and sequences stopping at different lengths.
The warm-started model, so that sequences stop where the step's do. `--block-size`: vLLM's KV-cache block, whose
size decides whether a group's samples share their prompt's prefill (`rollout/engine.CPU_BLOCK_SIZE`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_shapes(model: str) -> list[tuple[int, int]]:
    """(in, out) of every weight matmul a decoded token goes through, from the model's config (Llama-style)."""
    c = json.loads((Path(model) / "config.json").read_text())
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    layer = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    return layer * layers + [(h, c["vocab_size"])]


def matmul_gflops(shapes: list[tuple[int, int]], batch: int, threads: int) -> float:
    """GFLOP/s of torch.matmul over the model's weight shapes at `batch` rows, fp32, `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    distinct = {s: (torch.randn(batch, s[0]), torch.randn(s[0], s[1])) for s in set(shapes)}
    for x, w in distinct.values():
        x @ w  # warm-up
    flop = 2 * batch * sum(i * o for i, o in shapes)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for s in shapes:
            x, w = distinct[s]
            x @ w
        best = min(best, time.perf_counter() - t)
    return flop / best / 1e9


def generate(model: str, cores: str, prompts: int, group: int, tokens: int) -> dict:
    """Raw vLLM in this process (called in a child: the thread binding is read at import)."""
    os.environ.update(VLLM_CPU_OMP_THREADS_BIND=cores, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2",
                      VLLM_LOGGING_LEVEL="ERROR")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, enforce_eager=True)
    texts = [f"Question {i}: will the die roll a six?" for i in range(prompts)]
    sp = SamplingParams(n=group, temperature=1.0, max_tokens=tokens, ignore_eos=True, logprobs=0)
    llm.generate(texts[:2], sp, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    out = llm.generate(texts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    n = sum(len(o.token_ids) for r in out for o in r.outputs)
    return {"tokens": n, "seconds": dt}


def step_shape(model: str, repeats: int, block_size: int) -> list[dict]:
    """The shape ladder (`--shape`), raw vLLM on one core; each row the median of `repeats` timed calls."""
    os.environ.update(VLLM_CPU_OMP_THREADS_BIND="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2",
                      VLLM_LOGGING_LEVEL="ERROR")
    import statistics

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from cluster.config import load_config
    from rollout import prompts
    from rollout.chat_format import ChatFormat
    from rollout.task import QuestionSampler

    cfg = load_config(str(ROOT / "cluster/configs/smollm2-dice-cpu.yaml"), [f"model.path={model}"])
    tok = AutoTokenizer.from_pretrained(model)
    fmt = ChatFormat(tok, [], model_path=model)
    questions = QuestionSampler(cfg.task, seed=0).step(0, cfg.rollout.prompts_per_step)
    real = [TokensPrompt(prompt_token_ids=fmt.prompt_ids(prompts.user_message(i.question), i.question.as_of,
                                                         tools=False)) for i in questions]
    short = [TokensPrompt(prompt_token_ids=tok(f"Question {i}: will the die roll a six?").input_ids)
             for i in range(len(real))]
    llm = LLM(model=model, dtype="float32", max_model_len=cfg.rollout.max_model_len, seed=0, enforce_eager=True,
              block_size=block_size)
    g, max_new = cfg.rollout.group_size, cfg.rollout.max_new_tokens

    def sp(tokens: int, forced: bool, n: int = g):
        return SamplingParams(n=n, temperature=cfg.rollout.temperature, max_tokens=tokens, ignore_eos=forced,
                              stop_token_ids=None if forced else list(fmt.end_ids), logprobs=0, flat_logprobs=True,
                              detokenize=False)

    natural = llm.generate(real, sp(max_new, False), use_tqdm=False)  # warm-up, and the step's own lengths
    mean_len = round(sum(len(o.token_ids) for r in natural for o in r.outputs) / (len(real) * g))
    ladder = [("short prompts, forced", short, sp(max_new, True)),
              ("the step's prompts, forced", real, sp(max_new, True)),
              (f"the step's prompts, forced to their mean length ({mean_len})", real, sp(mean_len, True)),
              ("the step's prompts, stopping at end of turn (the step)", real, sp(max_new, False)),
              ("the step's prompts, 1 token (prefill)", real, sp(1, True)),
              ("the step's prompts, 1 token, 1 sample each instead of G (each prompt prefilled once)", real,
               sp(1, True, 1))]
    rows = []
    for name, batch, params in ladder:
        times, tokens = [], 0
        for _ in range(repeats):
            t = time.perf_counter()
            out = llm.generate(batch, params, use_tqdm=False)
            times.append(time.perf_counter() - t)
            tokens = sum(len(o.token_ids) for r in out for o in r.outputs)
        rows.append({"name": name, "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in batch) // len(batch),
                     "tokens": tokens, "seconds": statistics.median(times)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/smollm2-135m"))
    ap.add_argument("--cores", default="1,0-1", help="VLLM_CPU_OMP_THREADS_BIND values to compare")
    ap.add_argument("--batches", default="16,64,256", help="sequences decoded together (prompts x 8 samples)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--shape", action="store_true", help="split the step's shape instead (see above)")
    ap.add_argument("--repeats", type=int, default=3, help="with --shape: timed calls per row")
    ap.add_argument("--block-size", type=int, default=128, help="with --shape: the KV-cache block (vLLM's CPU default "
                    "128; the prefix cache shares whole blocks only; the rollout's engine uses 32)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shape:
        print(f"{args.model}, raw vLLM on one core, 8 prompts x G 8, KV block {args.block_size}; median of "
              f"{args.repeats} calls")
        print("| shape | prompt tokens | tokens generated | seconds | tokens/s |")
        print("| --- | --- | --- | --- | --- |")
        for r in step_shape(args.model, args.repeats, args.block_size):
            print(f"| {r['name']} | {r['prompt_tokens']} | {r['tokens']} | {r['seconds']:.2f} | "
                  f"{r['tokens'] / r['seconds']:.0f} |", flush=True)
        return
    if args.child:  # one setting, in its own process
        cores, batch = args.child.split(":")
        print(json.dumps(generate(args.model, cores, int(batch) // 8, 8, args.tokens)))
        return

    shapes = matmul_shapes(args.model)
    flop_per_token = 2 * sum(i * o for i, o in shapes)
    print(f"{args.model}: {flop_per_token / 1e6:.0f} MFLOP a decoded token (weight matmuls)")
    print("| cores | sequences | raw vLLM tokens/s | matmul GFLOP/s at that batch | bound tokens/s | vLLM / bound |")
    print("| --- | --- | --- | --- | --- | --- |")
    for cores in args.cores.split(","):
        threads = len(range(int(cores.split("-")[0]), int(cores.split("-")[-1]) + 1))
        for batch in (int(b) for b in args.batches.split(",")):
            res = subprocess.run([sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
                                  "--child", f"{cores}:{batch}"], capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                sys.exit(f"vLLM with cores {cores}, {batch} sequences failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            tps = r["tokens"] / r["seconds"]
            gflops = matmul_gflops(shapes, batch, threads)
            bound = gflops * 1e9 / flop_per_token
            print(f"| {cores} | {batch} | {tps:.0f} | {gflops:.0f} | {bound:.0f} | {tps / bound:.2f} |", flush=True)


if __name__ == "__main__":
    main()
