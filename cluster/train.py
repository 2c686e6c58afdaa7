"""The driver: places the roles, runs the GRPO loop, writes the run folder. It passes references, never bulk data.

    python -m cluster.train --config cluster/configs/demo-cpu.yaml [--set learner.lr=2e-5 ...]
    python -m cluster.train --resume runs/demo [--set run.steps=2000]      # continue a run
    python -m cluster.train --config FILE --resume auto                     # continue if there is anything to

This is also the entry point for `ray job submit`: it joins the cluster at RAY_ADDRESS (or `ray.address`) if set,
else starts a local Ray. Ctrl-C or `ray job stop` (SIGINT/SIGTERM) finishes the current step, saves, and exits.

One step: rollout workers sample G completions for each of the step's questions (trajectory batches stay in the
object store), the learner ranks train on the batch references, and every `sync.every` steps the learner's weights
are broadcast to every worker, which bumps the policy version. With `sync.overlap` the next step's generation is
launched before the learner trains, so generation and training run at the same time (one step of staleness).

Failures: a rollout worker that dies is restarted by Ray (`rollout.max_restarts`); the driver gives it the current
weights and has it generate its share of the step again, and counts what was lost (`dropped_trajectories`). The
tool service is restarted the same way, on its cache. A dead learner rank ends the job with a message naming it
and the last complete checkpoint, from which `--resume` continues exactly: a checkpoint holds the learner's whole
DeepSpeed state, the step (the question sampler's position: its draws depend only on the seed and the step), the
policy version, and the batch already generated for the next step; every step's sampling is seeded from
(run.seed, step, worker), so a resumed run draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import posixpath
import re
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster import weight_sync
from cluster.config import ConfigError, JobConfig, dump_config, load_config
from learner.storage import RunStorage, parquet_bytes
from model.warmstart import WarmstartError
from rollout import evaluate, synthetic
from rollout.chat_format import ChatFormat, ChatFormatError, constrained_patterns
from rollout.scoring import reference_levels
from rollout.task import Instance, QuestionSampler, load_pool, real_split


class StopRequest:
    """First SIGINT/SIGTERM: stop after the current step, save, exit cleanly. Second: stop now."""

    def __init__(self):
        self.requested = False

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving, then exiting "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast and clearly on an unreachable cluster instead of hanging in ray.init."""
    if address in ("auto", "local") or address.startswith("ray://"):
        hostport = address.removeprefix("ray://") if address.startswith("ray://") else None
    else:
        hostport = address
    if not hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or hostport, int(port or 6379)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r} (RAY_ADDRESS / ray.address) within "
                          f"{timeout_s:.0f}s: {e}") from None


def init_ray(cfg: JobConfig):
    import ray

    address = cfg.ray_address()
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::UserWarning"}}
    if address:
        check_reachable(address, cfg.timeouts.connect_s)
        try:
            ctx = ray.init(address=address, runtime_env=env, log_to_driver=True)
        except (ConnectionError, RuntimeError) as e:  # a port that answers but is no Ray head
            raise ConfigError(f"cannot reach the Ray cluster at {address!r} (RAY_ADDRESS / ray.address): {e}") from None
    else:
        # "local": a new Ray of our own even when another one runs on this machine (plain ray.init() would join it)
        ctx = ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.dashboard, runtime_env=env,
                       log_to_driver=True)
    if ctx.dashboard_url:
        print(f"Ray dashboard: http://{ctx.dashboard_url}", flush=True)
    return ray


# ------------------------------------------------------------------ the run folder


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if "://" in base else str(Path(base) / name)


def open_run(cfg: JobConfig, resume: str | None) -> tuple[RunStorage, str | None]:
    """The run's storage, and the checkpoint to continue from (None: a fresh start).

    resume None: a new folder under run.out_dir (`name`, or `name-1`, ... if taken); "auto": exactly
    run.out_dir/run.name, continued from its last complete checkpoint if it has one; a path: that run, which must
    have one."""
    base = _join(cfg.run.out_dir, cfg.run.name)
    if resume is None:
        storage, k = RunStorage(base), 1
        while storage.files():
            storage, k = RunStorage(f"{base}-{k}"), k + 1
        return storage, None
    storage = RunStorage(base if resume == "auto" else resume)
    good, skipped = storage.complete_checkpoints()
    for name, why in skipped.items():
        print(f"skipping checkpoint {storage.path('checkpoints', name)}: {why}", file=sys.stderr, flush=True)
    if good:
        return storage, f"checkpoints/{good[-1]}"
    if resume == "auto":
        return storage, None
    raise ConfigError(f"--resume {resume}: no complete checkpoint in {storage.path('checkpoints')}"
                      + (f" ({len(skipped)} incomplete, skipped)" if skipped else ""))


class MetricsLog:
    """metrics.jsonl: a line per step, appended on a filesystem; an object store cannot append, so there the file
    is rewritten whole at every flush (each checkpoint, every 50 steps, the end). Evaluations ride on the step lines
    (`evals`), so the file keeps one line per step."""

    FLUSH_EVERY = 50

    def __init__(self, storage: RunStorage, keep_steps: int):
        self.storage = storage
        old = storage.read_text("metrics.jsonl").splitlines() if storage.exists("metrics.jsonl") else []
        # a resumed run redoes every step after its checkpoint: their lines go (nothing is counted twice)
        self.lines = [ln for ln in old if ln.strip() and json.loads(ln).get("step", -1) < keep_steps]
        self.storage.write_text("metrics.jsonl", "".join(ln + "\n" for ln in self.lines))
        self._file = open(storage.local_path() / "metrics.jsonl", "a") if storage.local else None
        self._unflushed = 0
        self._evals: list[dict] = []  # taken before any step line was written: they go on the first

    def write(self, m: dict) -> None:
        if self._evals:
            m, self._evals = {**m, "evals": self._evals}, []
        line = json.dumps(evaluate.jsonable(m))
        self.lines.append(line)
        if self._file:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._unflushed += 1
            if self._unflushed >= self.FLUSH_EVERY:
                self.flush()

    def flush(self) -> None:
        if not self._file:
            self.storage.write_text("metrics.jsonl", "".join(ln + "\n" for ln in self.lines))
            self._unflushed = 0

    def add_evals(self, records: list[dict]) -> None:
        """Evaluation records go on the last step's line (its `evals` list, the file rewritten whole), or before the
        first step on the first line written."""
        if not self.lines:
            self._evals += records
            return
        last = json.loads(self.lines[-1])
        self.lines[-1] = json.dumps(evaluate.jsonable({**last, "evals": last.get("evals", []) + records}))
        self.storage.write_text("metrics.jsonl", "".join(ln + "\n" for ln in self.lines))
        if self._file:  # the rewrite replaced the file: append to the new one
            self._file.close()
            self._file = open(self.storage.local_path() / "metrics.jsonl", "a")

    def rows(self) -> list[dict]:
        return [json.loads(ln) for ln in self.lines]


@dataclass
class Chunk:
    """One worker's share of a step: the questions it was given, and the references to what it returns."""

    worker: int
    instances: list[Instance]
    batch: object  # ray.ObjectRef of the TrajectoryBatch (stays in the object store)
    info: object  # ray.ObjectRef of a small dict: fetched to learn that the batch is there, or that it is lost
    # (None for a batch a checkpoint kept: no worker to wait for)


class Driver:
    def __init__(self, cfg: JobConfig, storage: RunStorage, stop: StopRequest):
        self.cfg, self.storage, self.stop = cfg, storage, stop
        self.t0 = time.perf_counter()
        self.final_forecasts: dict = {}
        self.version = 0
        self.trained = 0  # steps the learner has trained: the version of the weights a worker replaced now gets
        self.last_checkpoint: str | None = None
        self.dropped: dict[str, int] = {}

    def start(self):
        from cluster import actors

        cfg, to = self.cfg, self.cfg.timeouts
        self.pg = actors.placement(cfg, to.startup_s)
        self.tool_service = actors.start_tool_service(cfg)
        self.tool_url = None
        if self.tool_service is not None:
            self.tool_url = actors.wait([("the tool service", self.tool_service.url.remote())], to.startup_s,
                                        "start")[0]
            print(f"tool service: {self.tool_url}", flush=True)
        self.learners = actors.start_learners(cfg, self.pg, self.storage.uri)
        self.workers = actors.start_workers(cfg, self.pg, self.tool_url)
        actors.wait(self._named(self.workers, "ready") + [(f"learner rank {r}", lr.__ray_ready__.remote())
                                                          for r, lr in enumerate(self.learners)],
                    to.startup_s, "start")
        self.sync = weight_sync.make(cfg.sync.transport, to.sync_s)
        actors.wait(self.sync.setup(self.learners, self.workers), to.sync_s, "join the weight broadcast group")

    def _named(self, workers, method, *args):
        return [(f"rollout worker {i}", getattr(w, method).remote(*args)) for i, w in enumerate(workers)]

    # ------------------------------------------------------------------ generation, and lost workers

    def launch(self, sampler: QuestionSampler, step: int) -> list[Chunk]:
        """Start generating step's batch on every worker (nothing is fetched)."""
        instances = sampler.step(step, self.cfg.rollout.prompts_per_step)
        chunks = np.array_split(np.arange(len(instances)), len(self.workers))
        return [self._submit(i, [instances[j] for j in c], step) for i, c in enumerate(chunks) if len(c)]

    def _submit(self, worker: int, instances: list[Instance], step: int) -> Chunk:
        batch, info = self.workers[worker].rollout.options(num_returns=2).remote(instances, step)
        return Chunk(worker, instances, batch, info)

    def collect(self, chunks: list[Chunk], step: int) -> list[Chunk]:
        """Wait until every chunk's batch is in the object store. A chunk whose worker died is generated again,
        on the worker Ray restarted, once that worker has the current weights; what was lost is counted."""
        from ray.exceptions import RayActorError

        from cluster import actors

        out = []
        for c in chunks:
            while c.info is not None:
                try:
                    actors.wait([(f"rollout worker {c.worker}", c.info)], self.cfg.timeouts.generate_s,
                                "generate", reraise_death=True)
                    break
                except RayActorError as e:
                    if self.cfg.rollout.max_restarts == 0:
                        raise actors.RoleError(f"rollout worker {c.worker} died while the job waited to generate: "
                                               f"{actors._cause(e)}") from None
                    lost = len(c.instances) * self.cfg.rollout.group_size
                    self.dropped["worker_died"] = self.dropped.get("worker_died", 0) + lost
                    print(f"rollout worker {c.worker} died during step {step}: {lost} trajectories lost, "
                          "generating them again", file=sys.stderr, flush=True)
                    self.replace_worker(c.worker, step)
                    c = self._submit(c.worker, c.instances, step)
            out.append(c)
        return out

    def replace_worker(self, i: int, step: int) -> None:
        """A restarted worker starts from the base model: give it the learner's weights (and the tool service).

        The learner has trained `step` steps by now (a batch is collected before its step trains), so its weights are
        version `step`, ahead of the last broadcast's under `sync.every` > 1: the worker is told that version, and
        its batch's staleness is counted from what it holds. Over the collective transport every worker takes them."""
        from cluster import actors

        to, t0 = self.cfg.timeouts, time.perf_counter()
        actors.wait_restarted(f"rollout worker {i}", self.workers[i].ready.remote, to.startup_s,
                              "restart (rollout.max_restarts)")
        if self.tool_url:
            actors.wait([(f"rollout worker {i}", self.workers[i].set_tool_url.remote(self.tool_url))], to.sync_s,
                        "take the tool service")
        if isinstance(self.sync, weight_sync.CollectiveSync):  # a new member: the group is formed again
            actors.wait(self.sync.setup(self.learners, self.workers), to.sync_s, "join the weight broadcast group")
            targets = self.workers
        else:
            targets = [self.workers[i]]
        actors.wait(self.sync.broadcast(self.learners, targets, step), to.sync_s, "broadcast weights")
        if len(targets) == len(self.workers):  # every worker holds them now: the driver's version is theirs
            self.version = step
        self.replacement_s = time.perf_counter() - t0
        print(f"rollout worker {i} is back with policy version {step} after {self.replacement_s:.1f}s",
              file=sys.stderr, flush=True)

    def wait_broadcast(self, syncing: list) -> None:
        """Wait for a weight broadcast. A rollout worker that died meanwhile is no failure of the broadcast: it is
        replaced (and given the weights) when its batch is collected. Over the collective transport a dead receiver
        stalls the learner's broadcast until `timeouts.sync_s`, which ends the job (resume from the checkpoint)."""
        from ray.exceptions import RayActorError

        from cluster import actors

        for name, ref in syncing:
            try:
                actors.wait([(name, ref)], self.cfg.timeouts.sync_s, "broadcast weights",
                            reraise_death=name.startswith("rollout worker"))
            except RayActorError:
                pass

    def refresh_tool_service(self) -> None:
        """The service actor, restarted by Ray after a crash, answers on another port: tell the workers."""
        from cluster import actors

        if self.tool_service is None:
            return
        url = actors.wait_restarted("the tool service", self.tool_service.url.remote, self.cfg.timeouts.startup_s,
                                    "answer (tools.service.max_restarts)")
        if url != self.tool_url:
            print(f"tool service restarted: {url}", file=sys.stderr, flush=True)
            self.tool_url = url
            actors.wait(self._named(self.workers, "set_tool_url", url), self.cfg.timeouts.sync_s,
                        "take the restarted tool service")

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, name: str, questions: list, tools: bool, final: bool = False) -> dict:
        """The eval set `name` scored on sampled forecasts from every worker's copy of the policy, with the task's
        tools or without. The questions go out `run.eval_batch_questions` at a time, one batch in flight per worker
        (a worker that returns one is sent the next), each awaited for at most `timeouts.generate_s`: an evaluation
        takes as long as its work needs, and its progress shows. A worker that dies is restarted by Ray, given the
        learner's weights (as in training), and asked its batch again, counted (`batches_asked_again`). The final
        one also writes the set's predictions (`eval_predictions_<set>.parquet`) and keeps the forecasts for the
        reliability diagram."""
        import ray
        from ray.exceptions import RayActorError

        from cluster import actors

        cfg, size, n = self.cfg, self.cfg.run.eval_batch_questions, self.cfg.run.eval_samples
        todo = list(range(0, len(questions), size))[::-1]  # each batch's first question, taken from the end
        parts, running = {}, {}  # first question -> its Samples; ref -> (worker, first question, deadline)
        again = 0
        progress = evaluate.Progress(name, len(questions), n, cfg.run.progress)

        def send(w: int) -> None:
            if todo:
                i = todo.pop()
                ref = self.workers[w].forecasts.remote(questions[i:i + size], n, tools)
                running[ref] = (w, i, time.monotonic() + cfg.timeouts.generate_s)

        for w in range(len(self.workers)):
            send(w)
        while running:
            w, i, deadline = min(running.values(), key=lambda r: r[2])
            done, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise actors.RoleError(f"timed out after {cfg.timeouts.generate_s:.0f}s (timeouts.generate_s) waiting "
                                       f"for rollout worker {w} to evaluate questions {i + 1}-"
                                       f"{min(i + size, len(questions))} of the {name!r} set")
            w, i, _ = running.pop(done[0])
            try:
                parts[i] = actors.wait([(f"rollout worker {w}", done[0])], cfg.timeouts.generate_s, "evaluate",
                                       reraise_death=True)[0]
                progress.update(parts[i])
            except RayActorError as e:
                if cfg.rollout.max_restarts == 0:
                    raise actors.RoleError(f"rollout worker {w} died while the job waited to evaluate: "
                                           f"{actors._cause(e)}") from None
                again += 1
                print(f"rollout worker {w} died evaluating questions {i + 1}-{min(i + size, len(questions))} of the "
                      f"{name!r} set: asking them again", file=sys.stderr, flush=True)
                self.replace_worker(w, self.trained)
                todo.append(i)  # the next one it is sent
            send(w)
        questions, samples, skipped = evaluate.Samples.concat([parts[i] for i in sorted(parts)]).split(questions)
        progress.close(skipped, cfg.rollout.max_model_len)
        if final:
            file = "eval_predictions_" + re.sub(r"\W+", "_", name).strip("_")  # "train (no tools)": train_no_tools
            self.storage.write_bytes(f"{file}.parquet", parquet_bytes(evaluate.predictions_table(questions, samples)))
            if tools:  # the diagram shows the sets evaluated as the policy was trained: with the task's tools
                self.final_forecasts[name] = (evaluate.point_forecasts(samples.forecasts)[0],
                                              evaluate.truth(questions))
        if cfg.task.source == "parquet":  # real questions: scored as a forecaster, beside the baselines
            out = evaluate.heldout_summary(questions, samples, self.constant, cfg.task.reward, cfg.task.clip_eps,
                                           skipped, seed=cfg.run.seed)
        else:
            out = evaluate.summarize(questions, samples.forecasts, cfg.task.reward, cfg.task.clip_eps,
                                     cfg.task.format_penalty, skipped, samples.ends)
        return {**out, "batches_asked_again": again}

    def _eval_sets(self, train: int) -> dict:
        """name -> (questions, with tools): for synthetic families their training and held-out parameters, for real
        questions the held-out set (`task.eval_data`, or the later side of `task.train_before`); a fixed subset of
        `run.eval_max_questions` of each; with tools the same sets evaluated without them too."""
        cfg = self.cfg
        if cfg.task.source == "synthetic":
            found = {split: synthetic.questions(cfg.task.families, split) for split in ("train", "heldout")}
        else:
            parts = real_split(cfg.task)
            found = {"heldout": load_pool(cfg.task, "heldout")}
            print(f"real questions with what task.reward={cfg.task.reward!r} scores against: {train} to train on "
                  f"(of {len(parts.train)}), {len(found['heldout'])} held out (of {len(parts.eval)})"
                  + "".join(f"\n  {n:6d}  {r}" for r, n in parts.removed.most_common()), flush=True)
            if not found["heldout"]:
                print("no held-out evaluation: set task.eval_data, or task.train_before to hold out the later "
                      "questions of task.data", flush=True)
        sets, cap = {}, cfg.run.eval_max_questions
        for split, qs in found.items():
            qs = [qs[i] for i in evaluate.fixed_subset(len(qs), cap, cfg.run.seed)]
            if qs:
                sets[split] = (qs, True)
        if cfg.task.tools:
            sets.update({f"{name} (no tools)": (qs, False) for name, (qs, _) in list(sets.items())})
        return sets

    def _eval_records(self, evals: dict, steps: int) -> list[dict]:
        """What metrics.jsonl keeps of evaluations: each set's numbers (not its nested tables), and when."""
        return [{"set": name, "steps": steps, "policy_version": self.version,
                 **{k: v for k, v in e.items() if not isinstance(v, (dict, list))}} for name, e in evals.items()]

    # ------------------------------------------------------------------ the loop

    def run(self, resume_from: str | None = None) -> dict:
        from tqdm import tqdm

        from cluster import actors
        from cluster.metrics import TrainingMetrics

        cfg, to = self.cfg, self.cfg.timeouts
        sampler = QuestionSampler(cfg.task, cfg.run.seed)
        known = [q.p_true if q.p_true is not None else q.market_prob for q in sampler.pool]
        levels = reference_levels(known, cfg.task.reward, cfg.task.clip_eps) if None not in known else None
        self.constant = evaluate.best_constant(sampler.pool)[0]  # the held-out evaluation's baseline to beat
        eval_sets = self._eval_sets(len(sampler.pool))
        exported = TrainingMetrics(cfg.run.name)
        first, pending = 0, None
        state = {"tool_totals": {"tool_calls": 0, "tool_errors": 0, "leak_violations": 0}, "reward_first": None}
        if resume_from:
            state, pending = self.resume(resume_from)
            first = state["step"]
            print(f"resumed from {self.storage.path(resume_from)}: step {first}, policy version {self.version}",
                  flush=True)
        self.trained = first
        summary: dict = {"run_dir": self.storage.uri, "reference_levels": levels.as_dict() if levels else None}
        resumed_evals = state.get("eval_before")  # a resumed run has them in its checkpoint and metrics.jsonl
        summary["eval_before"] = resumed_evals or {name: self.evaluate(name, qs, tools)
                                                   for name, (qs, tools) in eval_sets.items()}
        state["eval_before"] = summary["eval_before"]
        log = MetricsLog(self.storage, first)
        if not resumed_evals:
            log.add_evals(self._eval_records(summary["eval_before"], first))
        done, syncing, last_reward = first, [], None
        t_train = time.perf_counter()
        bar = tqdm(total=cfg.run.steps, initial=first, disable=not cfg.run.progress, file=sys.stderr,
                   dynamic_ncols=True)
        for step in range(first, cfg.run.steps):
            t_step = time.perf_counter()
            self.refresh_tool_service()
            chunks = pending if pending is not None else self.launch(sampler, step)
            batches = [c.batch for c in self.collect(chunks, step)]
            # overlap: the next batch is generated while this one trains (stale by one step)
            pending = self.launch(sampler, step + 1) if cfg.sync.overlap and step + 1 < cfg.run.steps else None
            m = actors.wait([(f"learner rank {r}", lr.train_step.remote(*batches))
                             for r, lr in enumerate(self.learners)], to.train_s + to.generate_s, "train")[0]
            self.trained = step + 1
            # an empty batch (every trajectory dropped: the learner skipped the step) has no sequence to say which
            # weights sampled it: the driver's current ones
            version = m.pop("sampler_policy_version", self.version)
            sync_s = 0.0
            if (step + 1) % cfg.sync.every == 0:
                t = time.perf_counter()
                self.wait_broadcast(syncing)  # the previous one; long done by now
                self.version = step + 1
                syncing = self.sync.broadcast(self.learners, self.workers, self.version)
                # Each actor runs its calls in submission order, so the next generate on a worker starts after
                # this load and the next train step after this export: nothing needs to wait here. Without
                # overlap (fully on-policy) the step includes the whole broadcast.
                if not cfg.sync.overlap:
                    self.wait_broadcast(syncing)
                sync_s = time.perf_counter() - t
            m.update(step=step, policy_version=version, sync_s=sync_s,
                     wall_s=time.perf_counter() - self.t0, step_s=time.perf_counter() - t_step)
            m.update({f"dropped_{k}": v for k, v in self.dropped.items()})
            self.dropped = {}
            if levels and "expected_reward" in m:
                m["skill"] = levels.skill(m["expected_reward"])
            log.write(m)
            exported.record(m, step - m["policy_version"])
            if m["sequences"]:
                state["reward_first"] = m["reward_mean"] if state["reward_first"] is None else state["reward_first"]
                last_reward = m["reward_mean"]
            done = step + 1
            bar.total, desc = _bar_bound(cfg, first, done, time.perf_counter() - t_train)
            bar.set_description_str(desc, refresh=False)
            bar.update(1)
            bar.write(_step_line(m, bool(cfg.task.tools)))
            for k in state["tool_totals"]:
                state["tool_totals"][k] += m.get(k, 0)
            if cfg.run.save_every and done % cfg.run.save_every == 0 and done < cfg.run.steps:
                self.wait_broadcast(syncing)
                self.save(done, state, pending, log)
            if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < cfg.run.steps:
                evals = {name: self.evaluate(name, qs, tools) for name, (qs, tools) in eval_sets.items()}
                log.add_evals(self._eval_records(evals, done))
                bar.write("  eval " + "  ".join(_eval_line(k, v) for k, v in evals.items()))
            if self.stop.requested:
                bar.write(f"stopping after step {step} on request")
                break
            if cfg.run.max_minutes and time.perf_counter() - t_train > 60 * cfg.run.max_minutes:
                bar.write(f"stopping after step {step}: run.max_minutes={cfg.run.max_minutes} reached")
                break
        bar.close()
        self.wait_broadcast(syncing)
        summary["train_wall_s"] = time.perf_counter() - t_train
        # A resumed run that trained nothing ends on the checkpoint it resumed from: saving that step again would
        # delete it first, under the saved batch its learner has yet to read.
        final = resume_from if resume_from and done == first else self.save(done, state, pending, log)
        summary["checkpoint"] = self.storage.path(final)
        if self.version != done and not self.stop.requested:  # make the final weights the ones evaluated
            self.version = done
            actors.wait(self.sync.broadcast(self.learners, self.workers, done), to.sync_s, "broadcast weights")
        if not self.stop.requested:
            summary["eval_after"] = {name: self.evaluate(name, qs, tools, final=True)
                                     for name, (qs, tools) in eval_sets.items()}
            log.add_evals(self._eval_records(summary["eval_after"], done))
        summary.update(steps=done, stopped_early=self.stop.requested, wall_s=time.perf_counter() - self.t0,
                       reward_first=state["reward_first"], reward_last=last_reward, resumed_from=resume_from)
        if cfg.task.tools:
            summary["tools"] = state["tool_totals"]
        log.flush()
        self.storage.write_text("summary.json", json.dumps(evaluate.jsonable(summary), indent=1))
        summary["plots"] = self.plot(summary, log.rows())
        return summary

    # ------------------------------------------------------------------ checkpoints

    def save(self, step: int, state: dict, pending: list[Chunk] | None, log: MetricsLog) -> str:
        """A complete checkpoint of step: every learner rank's files, the driver's state, and the marker last."""
        from cluster import actors

        rel = f"checkpoints/step_{step:06d}"
        if self.storage.exists(rel):  # an incomplete one from an earlier attempt
            self.storage.delete_dir(rel)
        batches = [c.batch for c in self.collect(pending, step)] if pending else []
        refs = [(f"learner rank {r}", lr.save_checkpoint.remote(rel, *(batches if r == 0 else [])))
                for r, lr in enumerate(self.learners)]
        files = {}
        for written in actors.wait(refs, self.cfg.timeouts.save_s, "save a checkpoint"):
            files.update(written)
        trainer = {**state, "step": step, "policy_version": self.version, "pending": bool(batches),
                   "learner_world_size": self.cfg.learner.world_size}
        text = json.dumps(evaluate.jsonable(trainer), indent=1)
        self.storage.write_text(f"{rel}/trainer_state.json", text)
        files["trainer_state.json"] = len(text.encode())
        log.flush()
        self.storage.mark_complete(rel, files)
        self.last_checkpoint = rel
        return rel

    def resume(self, rel: str) -> tuple[dict, list | None]:
        """Load a checkpoint into the learners and the workers; returns the driver's state and the saved batch
        for the next step (as references), if there was one."""
        from cluster import actors

        to = self.cfg.timeouts
        state = json.loads(self.storage.read_text(f"{rel}/trainer_state.json"))
        if state["learner_world_size"] != self.cfg.learner.world_size:
            raise ConfigError(f"{self.storage.path(rel)} was saved by {state['learner_world_size']} learner ranks; "
                              f"learner.world_size is {self.cfg.learner.world_size}")
        steps = actors.wait([(f"learner rank {r}", lr.load_checkpoint.remote(rel))
                             for r, lr in enumerate(self.learners)], to.startup_s, "load the checkpoint")
        if set(steps) != {state["step"]}:
            raise ConfigError(f"{self.storage.path(rel)}: the learner ranks' states are of steps {steps}, the "
                              f"driver's of step {state['step']}: not one checkpoint")
        # the learner's weights go to every worker: those of its step, ahead of the last broadcast's (the saved
        # policy_version) when the checkpoint fell between two broadcasts of `sync.every` > 1
        self.version = state["step"]
        actors.wait(self.sync.broadcast(self.learners, self.workers, self.version), to.sync_s, "broadcast weights")
        self.last_checkpoint = rel
        pending = [Chunk(-1, [], self.learners[0].read_pending.remote(rel), None)] if state["pending"] else None
        return state, pending

    def plot(self, summary: dict, metrics: list[dict]) -> list[str]:
        """Draws the run's plots into its folder; returns the ones drawn (one with nothing to draw says so)."""
        from cluster import report

        name = Path(self.storage.root).name
        with tempfile.TemporaryDirectory() as tmp:
            report.plot_learning_curve(metrics, summary["reference_levels"], Path(tmp) / "learning_curve.png",
                                       self.cfg.task.reward, name)
            if self.final_forecasts:
                truth = "market probability" if self.cfg.task.source == "parquet" else "true probability p*"
                report.plot_reliability(self.final_forecasts, Path(tmp) / "reliability.png", ylabel=truth,
                                        title=f"{name}: mean forecast per question after training")
            return sorted(self.storage.upload(tmp, ""))


def _finite(v) -> bool:
    """A metric that is there: not NaN (nothing parseable to compute it from) nor null (NaN read back from JSON)."""
    return v is not None and math.isfinite(v)


def _num(v, spec: str) -> str:
    return format(v, spec) if _finite(v) else "n/a"


def _eval_line(name: str, e: dict) -> str:
    """One set's evaluation during training: skill and reward; on real questions also the CE to the market beside
    the best constant and the floor, and the difference from the best constant with its interval."""
    line = f"{name}: skill {_num(e['skill'], '+.3f')} reward {_num(e['reward'], '.4f')}"
    if "vs" in e:
        line += (f" CE {_num(e['ce'], '.4f')} (best constant {_num(e['ce_constant'], '.4f')}, market floor "
                 f"{_num(e['ce_floor'], '.4f')}; minus best constant "
                 f"{evaluate.interval_text(e['vs']['best constant']['ce'])})")
    return line


def heldout_lines(before: dict, after: dict) -> list[str]:
    """A held-out evaluation on real questions: CE to the market and Brier before and after, beside the baselines,
    and the model's differences from each baseline after training, with their 95% bootstrap intervals."""
    base = after["baselines"]
    lost = sum(after["dropped_samples"].values())
    lines = [f"    n: {after['questions']} questions, {after['market_questions']} with a market, "
             f"{after['resolved_questions']} resolved; {after['samples']} samples answered"
             + (f" ({lost} cut by their deadline or failed: not scored)" if lost else ""),
             f"    skill {_num(before['skill'], '+.3f')} -> {_num(after['skill'], '+.3f')}   CE to market "
             f"{_num(before['ce'], '.4f')} -> {_num(after['ce'], '.4f')}   always 0.5 "
             f"{_num(after['ce_half'], '.4f')}   best constant ({after['constant']:.3f}, the training questions' mean "
             f"market) {_num(after['ce_constant'], '.4f')}   market (the floor) {_num(after['ce_floor'], '.4f')}",
             f"    Brier {_num(before['brier'], '.4f')} -> {_num(after['brier'], '.4f')}   always 0.5 "
             f"{_num(base['always 0.5']['brier'], '.4f')}   best constant {_num(base['best constant']['brier'], '.4f')}"
             f"   market {_num(base['market']['brier'], '.4f')}   log score {_num(after['log_score'], '.4f')}   ECE "
             f"{_num(after['ece'], '.4f')}   sharpness {_num(after['sharpness'], '.3f')}"]
    lines += [f"    after, minus {name + ':':14s} CE {evaluate.interval_text(d['ce'])} (n {d['ce']['n']})   Brier "
              f"{evaluate.interval_text(d['brier'])} (n {d['brier']['n']})" for name, d in after["vs"].items()]
    lines.append("    (ours minus the baseline: below 0, ours is better; [95% bootstrap interval over questions])")
    return lines


def _bar_bound(cfg: JobConfig, first: int, done: int, elapsed_s: float) -> tuple[int, str]:
    """The progress bar's total and label: the bound that will end the run. run.steps, or, when run.max_minutes ends
    it first at the pace so far, the steps that fit in the minutes left, so that the bar's share and time left are
    those of the minutes (a bar toward 100,000 steps in an 8-minute run read "0%, 24 hours left")."""
    if cfg.run.max_minutes and done > first:
        left_s = 60 * cfg.run.max_minutes - elapsed_s
        fit = done + max(0, math.ceil(left_s / (elapsed_s / (done - first))))
        if fit < cfg.run.steps:
            return fit, f"steps (about {fit} fit in run.max_minutes={cfg.run.max_minutes:g})"
    return cfg.run.steps, "steps"


def _step_line(m: dict, tools: bool = False) -> str:
    dropped = " ".join(f"{k} {v}" for k, v in m.items() if k.startswith("dropped_") and v)
    if not m["sequences"]:
        return (f"step {m['step']:4d} v{m['policy_version']:<4d} skipped: every trajectory was dropped ({dropped}), "
                "nothing to train on")
    skill = f" skill {m['skill']:+.3f}" if "skill" in m else ""
    line = (f"step {m['step']:4d} v{m['policy_version']:<4d} reward {m['reward_mean']:+.4f} ce {m['ce_mean']:.4f}"
            f"{skill} fmt_fail {m['format_fail_rate']:.2f} zero_var {m['zero_var_groups']}/{m['groups']} "
            f"clip {m['clip_frac']:.3f} gnorm {m['grad_norm']:.3f} gen {m['gen_s']:.2f}s train {m['train_s']:.2f}s "
            f"sync {m['sync_s']:.3f}s")
    if tools:
        # shared: answered with an earlier call's answer in the batch; cache: the service's hit rate on the rest
        hits = f" cache {m['cache_hit_rate']:.2f}" if "cache_hit_rate" in m else ""
        line += (f" | turns {m['turns_mean']:.2f} calls {m['tool_calls']} ({m['tool_shared_answers']} shared) "
                 f"errors {m['tool_errors']}{hits} leaks {m['leak_violations']}")
    return line + (f" | {dropped}" if dropped else "")


def print_summary(s: dict) -> None:
    lv = s.get("reference_levels")
    print("\n=== forecast-grpo summary ===")
    print(f"steps {s['steps']}{' (stopped early)' if s['stopped_early'] else ''}, wall {s['wall_s']:.0f}s"
          + (f", resumed from {s['resumed_from']}" if s.get("resumed_from") else ""))
    if lv:
        print(f"reference rewards: random {lv['ref_random']:.4f}  best constant {lv['ref_constant']:.4f} "
              f"(always {lv['ref_constant_answer']:.2f})  entropy floor {lv['ref_floor']:.4f}")
    width = max([8, *map(len, s.get("eval_before", {}))])
    for name, before in s.get("eval_before", {}).items():
        after = s.get("eval_after", {}).get(name)
        line = f"{name:{width}s} skill {_num(before['skill'], '+.3f')}"
        if after:
            b, a = before["ce_minus_floor"], after["ce_minus_floor"]  # no CE where nothing parsed
            closed = f" ({100 * (1 - a / b):.0f}% of it closed)" if _finite(a) and _finite(b) and b > 0 else ""
            line += f" -> {_num(after['skill'], '+.3f')}   reward {_num(before['reward'], '.4f')} -> " \
                    f"{_num(after['reward'], '.4f')}   CE-floor {_num(b, '.4f')} -> {_num(a, '.4f')}{closed}   " \
                    f"format failures {_num(after['format_fail_rate'], '.1%')}"
        skipped = (after or before).get("skipped_too_long")
        if skipped:
            line += f"   ({skipped} questions skipped: prompt too long)"
        print(line)
        if after and "vs" in after:
            print("\n".join(heldout_lines(before, after)))
        by_truth = (after or {}).get("mean_forecast_by_truth", {})
        if name == "train" and 0 < len(by_truth) <= 12:
            print("         mean forecast by true probability: " + ", ".join(
                f"{float(k):.2f}: {v:.2f}" for k, v in by_truth.items() if v is not None))
    if "tools" in s:
        t = s["tools"]
        print(f"tools during training: {t['tool_calls']} calls, {t['tool_errors']} answered with an error, "
              f"{t['leak_violations']} leak violations (content after the as-of date: withheld, must be 0)")
    print("skill: share of the gap from the best constant answer to the entropy floor closed (0 = constant, 1 = p*, "
          "on real questions the market)")
    print(f"checkpoint: {s.get('checkpoint')}")
    root = s["run_dir"]
    plots = [posixpath.join(root, p) if "://" in root else str(Path(root) / p) for p in s.get("plots", [])]
    print(f"plots: {', '.join(plots) or 'none (nothing to draw)'}")
    print(f"run folder: {root}")


def build_missing(cfg: JobConfig) -> None:
    """What a recipe can build for itself, built where its config says when nothing is there, before anything starts:
    the tiny model with `model.build_tiny` (`model/tiny.py`), for a task of the tool world its wiki snapshot and
    news corpus (`rollout/tool_world.py`: deterministic, about a second), and the format warm start of a job with a
    `warmstart:` section (`model/warmstart.py`: minutes, once). This is what lets `ray job submit
    --working-dir .` run the demo: `models/` is git-ignored, so Ray never uploads it.

    A relative path is one in the job's working directory, a copy of its own on every node: the driver builds there
    on its node only. On a cluster of several nodes, give `model.path` (or a hub id), `tools.wiki.snapshot`,
    `tools.wiki.cache`, `tools.wiki.tokenizer` and `tools.news.corpus` as absolute paths on a filesystem every node
    mounts, and `run.out_dir` there or in a bucket."""
    if cfg.model.build_tiny and not Path(cfg.model.path).exists():  # what is there is kept, whatever it is
        from model import tiny

        print(f"building the tiny model at {cfg.model.path} (model.build_tiny)", flush=True)
        tiny.build(cfg.model.path)
    if cfg.task.source == "synthetic" and "tool_world" in cfg.task.families:
        from rollout import tool_world

        for path, write in ((cfg.tools.wiki.snapshot, tool_world.write_snapshot),
                            (cfg.tools.news.corpus, tool_world.write_news)):
            if path and not Path(path).exists():
                print(f"writing the tool world's {Path(path).name} to {path}", flush=True)
                write(path)
    if cfg.warmstart.base:  # the format warm start (`warmstart:`, model/warmstart.py): made once, nothing to do after
        from model import warmstart

        warmstart.ensure(cfg)


def check_model_path(path: str) -> None:
    """A local folder must exist; anything that cannot be a local path is taken as a hub id (clusters)."""
    p = Path(path).expanduser()
    if p.exists():
        return
    local = path.startswith((".", "/", "~")) or p.parent.exists() and p.parent != Path("")
    if local or len(path.split("/")) != 2:
        raise ConfigError(f"model.path {path!r} does not exist (build the tiny model with "
                          f"`forecast-grpo tiny-model {path}` or model.build_tiny=true, or give a hub id such as "
                          "Qwen/Qwen2.5-1.5B-Instruct)")


def resolve_config(config: str | None, sets: list[str], resume: str | None) -> JobConfig:
    """--resume RUN (a run folder): its own config.yaml, then the --set overrides; else --config and --set."""
    if resume is None or resume == "auto":
        if resume == "auto" and not config:
            raise ConfigError("--resume auto needs --config: it continues run.out_dir/run.name if it can")
        return load_config(config, sets)
    if config:
        raise ConfigError("--resume RUN continues RUN with its own config.yaml: give --set overrides, not --config")
    storage = RunStorage(resume)
    if not storage.exists("config.yaml"):
        raise ConfigError(f"--resume {resume}: not a run folder (no config.yaml)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(storage.read_text("config.yaml"))
        cfg = load_config(path, sets)
    return cfg


def train(cfg: JobConfig, resume: str | None = None) -> dict:
    from cluster.actors import RoleError

    build_missing(cfg)
    check_model_path(cfg.model.path)
    # the model's chat format against the task (tools, constrained turns): refused here in seconds, naming the reason,
    # not in every rollout worker after an engine has loaded
    constrained_patterns(ChatFormat.for_model(cfg.model, list(cfg.task.tools)), cfg.task)
    storage, resume_from = open_run(cfg, resume)
    ray = init_ray(cfg)
    stop = StopRequest()
    stop.install()  # after ray.init, which replaces the driver's SIGTERM handler with one that exits at once
    storage.write_text("config.yaml", dump_config(cfg))
    print(f"run folder: {storage.uri}", flush=True)
    driver = Driver(cfg, storage, stop)
    try:
        driver.start()
        return driver.run(resume_from)
    except RoleError as e:
        last = driver.last_checkpoint or resume_from
        where = (f"; the last complete checkpoint is {storage.path(last)}: continue with "
                 f"`forecast-grpo train --resume {storage.uri}`") if last else "; no checkpoint was saved yet"
        raise RoleError(f"{e}{where}") from None
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forecast-grpo train", description="Train a forecaster with GRPO on Ray.")
    ap.add_argument("--config", required=False, help="YAML config (cluster/configs/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--resume", metavar="RUN|auto", help="continue the run folder RUN from its last complete "
                    "checkpoint (its own config, then --set: e.g. --set run.steps=N); auto: continue "
                    "run.out_dir/run.name of --config if it has one, else start it")
    args = ap.parse_args(argv)
    from cluster.actors import RoleError

    try:
        cfg = resolve_config(args.config, args.set, args.resume)
        summary = train(cfg, args.resume)
    except (ConfigError, WarmstartError, ChatFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RoleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
