"""Learner tokens/s on a real model, full fine-tuning and LoRA, against a plain PyTorch loop in the same run.

    python bench/learner_throughput.py [--model models/smollm2-135m] [--modes full,lora] [--reference both]
        [--prompts 8] [--group 8] [--completion-tokens 16] [--micro-batch 16] [--lora-r 16] [--zero-stage 0]
        [--repeats 3] [--steps-per-repeat 2] [--threads 2]

The batch, the same TrajectoryBatch for every side: `--prompts` questions of `--families` in the model's chat
template (dice_sizes: 62-63 tokens with SmolLM2), each with `--group` completions of random token ids, lengths uniform
in [completion_tokens / 2, completion_tokens], rewards drawn per completion (every group has reward variance, so
every sequence trains: checked).

ours:         the project's `Learner` in this process (DeepSpeed on gloo, world size 1, no Ray), timed around
              `train_step`: advantages, keep/drop, micro-batches of `--micro-batch` sequences, the GRPO token loss
              with `grpo.tis_cap` off (its gradient is then exactly -A * grad logp), backward, clipping at 1.0,
              AdamW. Its forward runs each group's prompt once and the completions on a copy of its KV cache
              (`learner/forward.py`).
plain-full:   torch + transformers (+ peft for LoRA: same r, alpha, dropout, target modules and seed), no DeepSpeed:
              per micro-batch, the full sequences (left-padded prompt, right-padded completion, logits for the
              completion positions only), loss -sum(exp(logp - logp.detach()) * A) / (completion tokens in the batch)
              (the GRPO loss at ratio 1: the same value and gradient), clip_grad_norm_ 1.0, torch.optim.AdamW with
              the same hyper-parameters, one optimizer step per batch.
plain-shared: the same loop, forwarding through the project's prompt-once `learner.forward.completion_logprobs`:
              what the Learner and DeepSpeed add on top of the same arithmetic (plain-full also counts what
              computing a group's prompt once saves).

tokens/s counts the batch's tokens: every sequence's prompt plus its completion (a group's prompt once per
completion: what a full-sequence forward sees), the same count on every side, so a ratio is the inverse of a time
ratio. GFLOP/s = 6 x params x tokens / s (full fine-tuning: forward 2, backward 4 per parameter and token) or
4 x params x tokens / s (LoRA: no gradient for the frozen weights), params = the model's parameters (a tied
embedding once, the adapters left out): nominal figures, the same formula for every side. Every side does less
than that: the lm_head runs on completion positions only, and ours and plain-shared compute a group's prompt once.

The first step's gradient norm of every side (from the same weights, on the same batch) is printed: equal norms
show the sides compute the same loss. Sides alternate within each repeat (ours, plain-full, plain-shared, ours, ...)
so drift on this shared machine hits all; medians are reported.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LR = 1e-5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models/smollm2-135m"))
    ap.add_argument("--modes", default="full,lora", help="comma-separated: full, lora")
    ap.add_argument("--reference", choices=["full", "shared", "both"], default="both",
                    help="which plain loop(s) to run: full sequences, prompt-once forward, or both")
    ap.add_argument("--families", default="dice_sizes")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--completion-tokens", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward, every side")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--zero-stage", type=int, default=0, help="ours' learner.zero_stage (SmolLM2's configs: 0)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps-per-repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    batch = make_batch(args)
    tokens, completion = len(batch.tokens), int(batch.loss_mask.sum())
    refs = {"full": ["plain-full"], "shared": ["plain-shared"], "both": ["plain-full", "plain-shared"]}[args.reference]
    print(f"model {args.model}; batch {args.prompts} prompts x G {args.group}: {tokens} tokens ({completion} "
          f"completion tokens, prompts of {sorted(set(batch.prompt_lens.tolist()))} tokens); micro-batch "
          f"{args.micro_batch}, ours zero_stage {args.zero_stage}, {args.threads} threads; {args.repeats} repeats x "
          f"{args.steps_per_repeat} steps")

    summary = []
    for mode in args.modes.split(","):
        sides = {"ours": OurSide(args, mode)}
        for name in refs:
            sides[name] = PlainSide(args, mode, shared_prompt=name == "plain-shared")
        params = sides["ours"].params  # LoRA: the base model's, without the adapters
        first = {name: side.step(batch) for name, side in sides.items()}  # warm-up; from the same weights
        tps = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, side in sides.items():
                t = time.perf_counter()
                for _ in range(args.steps_per_repeat):
                    side.step(batch)
                tps[name].append(args.steps_per_repeat * tokens / (time.perf_counter() - t))
        flops = (6 if mode == "full" else 4) * params
        print(f"{mode} ({params / 1e6:.3f}M params, {sides['ours'].trained / 1e6:.3f}M trained):")
        med = {name: statistics.median(v) for name, v in tps.items()}
        for name, v in tps.items():
            ratio = "" if name == "ours" else f"  ours/{name} {med['ours'] / med[name]:.3f}"
            print(f"  {name:13s} tokens/s median {med[name]:8.1f} (min {min(v):.1f}, max {max(v):.1f})  "
                  f"{flops * med[name] / 1e9:6.2f} GFLOP/s  first-step grad norm {first[name]:.6g}{ratio}")
        summary.append(f"{mode} ours {med['ours']:.0f} tok/s " +
                       " ".join(f"{name} {med[name]:.0f} ratio {med['ours'] / med[name]:.3f}" for name in refs))
        del sides
        gc.collect()
    print("learner_throughput: " + "; ".join(summary) + " (target ratio >= 0.9)")


def make_batch(args):
    """Dice-like prompts in the model's chat template, random completions, rewards with variance in every group."""
    import numpy as np
    from transformers import AutoTokenizer

    from cluster.config import load_config
    from rollout import prompts
    from rollout.chat_format import ChatFormat
    from rollout.task import QuestionSampler
    from rollout.trajectory import TrajectoryBuilder

    cfg = load_config(None, [f"model.path={args.model}", f"task.families=[{args.families}]"])
    tok = AutoTokenizer.from_pretrained(args.model)
    fmt = ChatFormat.for_model(cfg.model, [], args.model, tok)
    rng = np.random.default_rng(0)
    b = TrajectoryBuilder()
    for g, inst in enumerate(QuestionSampler(cfg.task, seed=0).step(0, args.prompts)):
        p = fmt.prompt_ids(prompts.user_message(inst.question), inst.question.as_of, tools=False)
        for r in rng.normal(size=args.group):
            n = int(rng.integers(args.completion_tokens // 2, args.completion_tokens + 1))
            c = rng.integers(3, len(tok), size=n).tolist()
            b.add(p, c, [1] * n, [-1.0] * n, rewards=float(r), group_ids=g, policy_version=0, forecasts=0.5,
                  targets=0.5, p_true=0.5, truncated=False, question_ids=f"q{g}")
    return b.build()


class OurSide:
    def __init__(self, args, mode: str):
        from cluster.config import load_config
        from learner.learner import Learner

        overrides = [f"model.path={args.model}", "run.progress=false", f"task.families=[{args.families}]",
                     f"learner.zero_stage={args.zero_stage}", f"learner.micro_batch_size={args.micro_batch}",
                     f"learner.lr={LR}", "grpo.tis_cap=null", "grpo.kl_beta=0", "sync.max_staleness=1000000000",
                     "run.trajectories_every=0", f"learner.torch_threads={args.threads}"]
        if mode == "lora":
            overrides.append(f"learner.lora.r={args.lora_r}")
        self.learner = Learner(load_config(None, overrides).learner_job())
        module = self.learner.engine.module
        self.trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        self.params = sum(p.numel() for p in module.parameters()) - (self.trained if mode == "lora" else 0)

    def step(self, batch) -> float:
        m = self.learner.train_step(batch)
        assert m["trained_sequences"] == batch.num_sequences, m
        return m["grad_norm"]


class PlainSide:
    """A plain loop: transformers model (peft for LoRA), hand-written loss, torch AdamW; no DeepSpeed, no Learner."""

    def __init__(self, args, mode: str, shared_prompt: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from learner.config import LoraConfig

        self.mb, self.shared_prompt = args.micro_batch, shared_prompt
        self.pad = AutoTokenizer.from_pretrained(args.model).pad_token_id or 0
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model.config.use_cache = False
        if mode == "lora":
            import peft

            lc = LoraConfig(r=args.lora_r)  # the defaults ours gets: alpha, dropout, target modules
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # run.seed, as ours draws its A matrices
                model = peft.get_peft_model(model, peft.LoraConfig(
                    r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                    task_type="CAUSAL_LM"))
        self.model = model.train()
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trained, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step(self, batch) -> float:
        import numpy as np
        import torch

        from learner import grpo

        adv, _ = grpo.group_advantages(torch.from_numpy(batch.rewards), torch.from_numpy(batch.group_ids), True)
        n_tokens = float(batch.loss_mask.sum())
        for start in range(0, batch.num_sequences, self.mb):
            idx = np.arange(start, min(start + self.mb, batch.num_sequences))
            logp, mask = self._shared(batch, idx) if self.shared_prompt else self._full(batch, idx)
            a = adv[idx].unsqueeze(1)
            loss = -(torch.exp(logp - logp.detach()) * a * mask).sum() / n_tokens
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def _full(self, batch, idx):
        """Logprobs of the completion tokens, [n, C], from one forward of the full sequences."""
        import numpy as np
        import torch

        prompts = [batch.tokens[batch.offsets[i]:batch.offsets[i] + batch.prompt_lens[i]] for i in idx]
        comps = [batch.tokens[batch.offsets[i] + batch.prompt_lens[i]:batch.offsets[i + 1]] for i in idx]
        P, C = max(map(len, prompts)), max(map(len, comps))
        ids = torch.full((len(idx), P + C), self.pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros((len(idx), C))
        for k, (i, p, c) in enumerate(zip(idx, prompts, comps)):
            ids[k, P - len(p):P + len(c)] = torch.from_numpy(np.concatenate([p, c]).astype(np.int64))
            attn[k, P - len(p):P + len(c)] = 1
            mask[k, :len(c)] = torch.from_numpy(batch.loss_mask[batch.offsets[i + 1] - len(c):batch.offsets[i + 1]])
        logits = self.model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                            logits_to_keep=C + 1).logits[:, :-1].float()
        target = ids[:, P:]
        logp = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        return logp, mask

    def _shared(self, batch, idx):
        from learner import forward

        mb = forward.build(batch, idx, self.pad, "cpu")
        return forward.completion_logprobs(self.model, mb, 1.0)[0], mb.loss_mask


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
