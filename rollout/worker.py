"""RolloutWorker: owns one vLLM engine; turns question instances into a scored trajectory batch.

A plain class; `cluster/actors.py` makes it a Ray actor. Its `generate` returns the batch as the call's return
value, so the batch lands in Ray's object store and the driver only ever holds a reference to it.

Without tools a step is one `generate` call (G samples per prompt). With tools (`task.tools`) every sample is a
conversation that may call them (`rollout/multiturn.py`); its calls go to the tool service at `tool_url`.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from rollout import engine, prompts, weights
from rollout.chat_format import ChatFormat, constrained_patterns
from rollout.config import RolloutJob
from rollout.evaluate import Samples
from rollout.questions import Question
from rollout.task import Instance, scorer
from rollout.trajectory import DROPPED_ENDS, TrajectoryBatch, TrajectoryBuilder

MIN_ANSWER_TOKENS = 16
"""Room a prompt must leave in rollout.max_model_len: the shortest answer, `<answer>0.37</answer>`, is 10 tokens in
SmolLM2's and the tiny model's tokenizers; a prompt that leaves less can only be cut off, a format failure that says
nothing of the model."""


class RolloutWorker:
    def __init__(self, cfg: RolloutJob, worker_index: int = 0, cpu_core: str | None = None,
                 model_path: str | None = None, tool_url: str | None = None):
        engine.configure_env(cfg.rollout.cpu_kvcache_gib, cpu_core, cfg.rollout.tensor_parallel_size)
        from transformers import AutoTokenizer

        self.cfg, self.index = cfg, worker_index
        path = model_path or cfg.model.path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.kinds = list(cfg.task.tools)
        # before the engine: a template that cannot do what the task asks is refused in seconds, not after a load
        self.fmt = ChatFormat.for_model(cfg.model, self.kinds, path, self.tokenizer)
        # constrained decoding (task.answer, task.tool_choice): the pattern a turn must match, None where it is free
        call, self.answer_pattern = constrained_patterns(self.fmt, cfg.task)
        self.llm = engine.make_engine(path, dtype=cfg.model.dtype, max_model_len=cfg.rollout.max_model_len,
                                      seed=cfg.seed + worker_index, enforce_eager=cfg.rollout.enforce_eager,
                                      gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                                      tensor_parallel_size=cfg.rollout.tensor_parallel_size)
        self.scorer = scorer(cfg.task)
        self.version = 0
        self.load_seconds = 0.0
        self._prompt_cache: dict[tuple[str, bool], list[int]] = {}
        self._receiver = None
        self._rollout = None
        if self.kinds:
            from rollout.multiturn import Rollout, ToolRunner

            runner = ToolRunner(tool_url, cfg.tools.service.request_timeout_s)
            self._rollout = Rollout(engine.TurnEngine(self.llm, self.tokenizer, self.fmt.end_ids), self.fmt, runner,
                                    cfg.rollout, call_pattern=call, answer_pattern=self.answer_pattern,
                                    first_call_required=cfg.task.tool_choice == "required")

    def ready(self) -> dict:
        return {"worker": self.index, "version": self.version}

    def set_tool_url(self, url: str | None) -> None:
        """Where the tool service answers (again, after a restart)."""
        if self._rollout is not None:
            self._rollout.runner.set_url(url)

    def _prompt(self, q: Question, tools: bool) -> list[int]:
        key = (q.id, tools)
        ids = self._prompt_cache.get(key)
        if ids is None:
            user = prompts.user_message(q, self.cfg.task.reasoning, tools)
            ids = self._prompt_cache[key] = self.fmt.prompt_ids(user, q.as_of, tools)
        return ids

    def _fits(self, q: Question, tools: bool) -> bool:
        """Whether q's prompt leaves room for an answer in rollout.max_model_len (`MIN_ANSWER_TOKENS`, or
        max_new_tokens if fewer). One that does not is never sampled: skipped in evaluation, dropped in training,
        counted in both."""
        rc = self.cfg.rollout
        return len(self._prompt(q, tools)) + min(MIN_ANSWER_TOKENS, rc.max_new_tokens) <= rc.max_model_len

    def _sample(self, questions: list[Question], n: int, temperature: float):
        rc = self.cfg.rollout
        prompt_ids = [self._prompt(q, False) for q in questions]
        out = engine.generate(self.llm, self.tokenizer, prompt_ids, n=n, temperature=temperature, top_p=rc.top_p,
                              max_tokens=[min(rc.max_new_tokens, rc.max_model_len - len(p)) for p in prompt_ids],
                              stop_token_ids=self.fmt.end_ids, pattern=self.answer_pattern)
        return prompt_ids, out

    def _converse(self, instances: list[Instance], n: int):
        from rollout.multiturn import Conversation

        deadline = time.monotonic() + self.cfg.rollout.trajectory_timeout_s
        convs = [Conversation(inst, self._prompt(inst.question, True), deadline)
                 for inst in instances for _ in range(n)]
        return self._rollout.run(convs, self.cfg.rollout.temperature)

    def rollout(self, instances: list[Instance], step: int) -> tuple[TrajectoryBatch, dict]:
        """The driver's call (with `num_returns=2`): step's batch, its sampling seeded from (run.seed, step, this
        worker) so that a resumed run draws what an uninterrupted one drew; and a small receipt the driver fetches
        to learn that the batch is in the object store (the batch itself it never fetches)."""
        engine.reseed(self.llm, int(np.random.SeedSequence([self.cfg.seed, step, self.index]).generate_state(1)[0]))
        batch = self.generate(instances)
        return batch, {"worker": self.index, "sequences": batch.num_sequences, "version": self.version}

    def generate(self, instances: list[Instance]) -> TrajectoryBatch:
        """G samples per instance, scored. Every sequence is stamped with the weights version that produced it. An
        instance whose prompt does not fit is dropped, its G trajectories counted as `dropped_too_long` (a batch of
        none is empty: the learner skips the step)."""
        t0 = time.perf_counter()
        fitting = [i for i in instances if self._fits(i.question, bool(self.kinds))]
        if not fitting:
            batch = TrajectoryBuilder().build(load_seconds=self.load_seconds)
        elif self.kinds:
            batch = self._generate_conversations(fitting, t0)
        else:
            batch = self._generate_completions(fitting, t0)
        if len(fitting) < len(instances):
            batch.tool_stats["dropped_too_long"] = (len(instances) - len(fitting)) * self.cfg.rollout.group_size
        return batch

    def _generate_completions(self, instances: list[Instance], t0: float) -> TrajectoryBatch:
        prompt_ids, out = self._sample([i.question for i in instances], self.cfg.rollout.group_size,
                                       self.cfg.rollout.temperature)
        builder = TrajectoryBuilder()
        for inst, prompt, group in zip(instances, prompt_ids, out):
            for s in group:
                reward, q = self.scorer(s.text, inst.target)
                builder.add(prompt, s.token_ids, [1] * len(s.token_ids), s.logprobs, **self._row(inst, reward, q),
                            truncated=s.truncated)
        return builder.build(gen_seconds=time.perf_counter() - t0, load_seconds=self.load_seconds)

    def _row(self, inst: Instance, reward: float, q: float | None) -> dict:
        return dict(rewards=reward, group_ids=inst.group_id, policy_version=self.version,
                    forecasts=np.nan if q is None else q, targets=inst.target,
                    p_true=np.nan if inst.question.p_true is None else inst.question.p_true,
                    question_ids=inst.question.id)

    def _generate_conversations(self, instances: list[Instance], t0: float) -> TrajectoryBatch:
        builder, stats, dropped = TrajectoryBuilder(), Counter(), []
        for c in self._converse(instances, self.cfg.rollout.group_size):
            if c.end in DROPPED_ENDS:  # the clock's or ours, not the model's: never trained on, counted and named
                stats[f"dropped_{c.end}"] += 1
                dropped.append({"question_id": c.instance.question.id, "group_id": c.instance.group_id,
                                "reason": c.end, "detail": c.failure or f"cut by rollout.trajectory_timeout_s after "
                                f"{c.turns} turns and {c.calls} tool calls"})
                continue
            reward, q = self.scorer(c.final_text, c.instance.target) if c.end == "answer" else \
                (self.scorer.format_penalty, None)
            reward -= self.cfg.task.tool_error_penalty * c.bad_calls
            builder.add(c.prompt, c.ids, c.mask, c.logprobs, **self._row(c.instance, reward, q),
                        truncated=c.end != "answer", end_reason=c.end, turns=c.turns, tool_calls=c.calls,
                        tool_errors=sum(c.errors.values()), leak_violations=c.leaks)
            stats.update({f"tool_errors_{k}": v for k, v in c.errors.items()})
            stats.update(tool_shared_answers=c.shared_answers, cache_hits=c.cache_hits, cache_lookups=c.cache_lookups)
        return builder.build(gen_seconds=time.perf_counter() - t0, load_seconds=self.load_seconds,
                             tool_stats=stats, dropped=dropped)

    def forecasts(self, questions: list[Question], n: int, tools: bool | None = None) -> Samples:
        """n samples per question, parsed, with what each wrote and why it ended: the evaluation's view of the
        policy. tools: with the task's tools (the default when it has any) or without. A question whose prompt does
        not fit is skipped (`Samples.asked`)."""
        tools = bool(self.kinds) and tools is not False
        asked = np.array([self._fits(q, tools) for q in questions], dtype=bool)
        res = Samples(np.full((len(questions), n), np.nan), [[] for _ in questions], [[] for _ in questions], asked)
        rows = np.flatnonzero(asked)
        if not len(rows):
            return res
        if tools:  # the text kept is the last turn's: the answer, or what the conversation ended on
            convs = self._converse([Instance(questions[j], 0.5, int(j)) for j in rows], n)
            got = [(c.instance.group_id, self.scorer(c.final_text, 0.5)[1] if c.end == "answer" else None,
                    next((m["content"] for m in reversed(c.messages) if m["role"] == "assistant"), ""), c.end)
                   for c in convs]
        else:
            _, out = self._sample([questions[j] for j in rows], n, self.cfg.rollout.temperature)
            got = [(j, self.scorer(s.text, 0.5)[1], s.text, "length" if s.truncated else "answer")
                   for j, group in zip(rows, out) for s in group]
        for j, q, text, end in got:
            res.forecasts[j, len(res.texts[j])] = np.nan if q is None else q
            res.texts[j].append(text)
            res.ends[j].append(end)
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
