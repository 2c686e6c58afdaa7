"""RolloutWorker: owns one vLLM engine; turns question instances into a scored trajectory batch.

A plain class; `cluster/actors.py` makes it a Ray actor. Its `generate` returns the batch as the call's return
value, so the batch lands in Ray's object store and the driver only ever holds a reference to it.
"""

from __future__ import annotations

import time

import numpy as np

from rollout import engine, prompts, weights
from rollout.config import RolloutJob
from rollout.questions import Question
from rollout.task import Instance, scorer
from rollout.trajectory import TrajectoryBatch, TrajectoryBuilder


class RolloutWorker:
    def __init__(self, cfg: RolloutJob, worker_index: int = 0, cpu_core: str | None = None,
                 model_path: str | None = None):
        engine.configure_env(cfg.rollout.cpu_kvcache_gib, cpu_core)
        from transformers import AutoTokenizer

        self.cfg, self.index = cfg, worker_index
        path = model_path or cfg.model.path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.llm = engine.make_engine(path, dtype=cfg.model.dtype, max_model_len=cfg.rollout.max_model_len,
                                      seed=cfg.seed + worker_index, enforce_eager=cfg.rollout.enforce_eager,
                                      gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                                      tensor_parallel_size=cfg.rollout.tensor_parallel_size)
        self.scorer = scorer(cfg.task)
        self.version = 0
        self.load_seconds = 0.0
        self._prompt_cache: dict[str, list[int]] = {}
        self._receiver = None

    def ready(self) -> dict:
        return {"worker": self.index, "version": self.version}

    def _prompt(self, q: Question) -> list[int]:
        ids = self._prompt_cache.get(q.id)
        if ids is None:
            ids = self._prompt_cache[q.id] = prompts.chat_prompt_ids(self.tokenizer, q, self.cfg.task.reasoning)
        return ids

    def _sample(self, questions: list[Question], n: int, temperature: float):
        rc = self.cfg.rollout
        prompt_ids = [self._prompt(q) for q in questions]
        too_long = [q.id for q, p in zip(questions, prompt_ids) if len(p) >= rc.max_model_len]
        if too_long:
            raise ValueError(f"prompts longer than rollout.max_model_len={rc.max_model_len}: {too_long[:5]}")
        out = engine.generate(self.llm, self.tokenizer, prompt_ids, n=n, temperature=temperature, top_p=rc.top_p,
                              max_tokens=[min(rc.max_new_tokens, rc.max_model_len - len(p)) for p in prompt_ids])
        return prompt_ids, out

    def generate(self, instances: list[Instance]) -> TrajectoryBatch:
        """G samples per instance, scored. Every sequence is stamped with the weights version that produced it."""
        t0 = time.perf_counter()
        prompt_ids, out = self._sample([i.question for i in instances], self.cfg.rollout.group_size,
                                       self.cfg.rollout.temperature)
        builder = TrajectoryBuilder()
        for inst, prompt, group in zip(instances, prompt_ids, out):
            p_true = np.nan if inst.question.p_true is None else inst.question.p_true
            for s in group:
                reward, q = self.scorer(s.text, inst.target)
                builder.add(prompt, s.token_ids, [1] * len(s.token_ids), s.logprobs,
                            rewards=reward, group_ids=inst.group_id, policy_version=self.version,
                            forecasts=np.nan if q is None else q, targets=inst.target, p_true=p_true,
                            truncated=s.truncated, question_ids=inst.question.id)
        return builder.build(gen_seconds=time.perf_counter() - t0, load_seconds=self.load_seconds)

    def forecasts(self, questions: list[Question], n: int) -> np.ndarray:
        """[len(questions), n] parsed forecasts (NaN where unparseable): the evaluation's view of the policy."""
        _, out = self._sample(questions, n, self.cfg.rollout.temperature)
        res = np.full((len(questions), n), np.nan, dtype=np.float64)
        for j, group in enumerate(out):
            for k, s in enumerate(group):
                q = self.scorer(s.text, 0.5)[1]
                res[j, k] = np.nan if q is None else q
        return res

    # ------------------------------------------------------------------ weights in

    def load_weights(self, payload: dict, version: int) -> int:
        """Object-store transport: payload is the learner's export, resolved zero-copy by Ray."""
        t0 = time.perf_counter()
        engine.load_weights(self.llm, engine.as_tensors(payload["arrays"].items(), payload["dtypes"]))
        self.version, self.load_seconds = version, time.perf_counter() - t0
        return version

    def join_weight_group(self, host: str, port: int, rank: int, world: int, manifest: list, timeout_s: float):
        self._receiver = weights.CollectiveReceiver(host, port, rank, world, manifest, timeout_s)
        return rank

    def receive_weights(self, version: int) -> int:
        """Collective transport: join the learner's broadcast and load what arrives."""
        if self._receiver is None:
            raise RuntimeError("receive_weights before join_weight_group")
        t0 = time.perf_counter()  # includes waiting for the learner's gather: the collective's whole cost
        engine.load_weights(self.llm, self._receiver.receive())
        self.version, self.load_seconds = version, time.perf_counter() - t0
        return version
