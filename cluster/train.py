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
from learner.storage import RunStorage
from rollout import evaluate, synthetic
from rollout.scoring import reference_levels
from rollout.task import Instance, QuestionSampler


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
    is rewritten whole at every flush (each checkpoint, every 50 steps, the end)."""

    FLUSH_EVERY = 50

    def __init__(self, storage: RunStorage, keep_steps: int):
        self.storage = storage
        old = storage.read_text("metrics.jsonl").splitlines() if storage.exists("metrics.jsonl") else []
        # a resumed run redoes every step after its checkpoint: their lines go (nothing is counted twice)
        self.lines = [ln for ln in old if ln.strip() and json.loads(ln).get("step", -1) < keep_steps]
        self.storage.write_text("metrics.jsonl", "".join(ln + "\n" for ln in self.lines))
        self._file = open(storage.local_path() / "metrics.jsonl", "a") if storage.local else None
        self._unflushed = 0

    def write(self, m: dict) -> None:
        line = json.dumps({k: _jsonable(v) for k, v in m.items()})
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
                    self.replace_worker(c.worker)
                    c = self._submit(c.worker, c.instances, step)
            out.append(c)
        return out

    def replace_worker(self, i: int) -> None:
        """A restarted worker starts from the base model: give it the current weights (and the tool service)."""
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
        actors.wait(self.sync.broadcast(self.learners, targets, self.version), to.sync_s, "broadcast weights")
        self.replacement_s = time.perf_counter() - t0
        print(f"rollout worker {i} is back with policy version {self.version} after {self.replacement_s:.1f}s",
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

    def evaluate(self, questions, tools: bool = True, keep: str | None = None) -> dict:
        """Sampled forecasts from every worker's copy of the policy (questions split among them), with the task's
        tools or without; `keep` names the set for the final reliability diagram."""
        from cluster import actors

        cfg = self.cfg
        chunks = [c for c in np.array_split(np.arange(len(questions)), len(self.workers)) if len(c)]
        refs = [(f"rollout worker {i}", self.workers[i].forecasts.remote([questions[j] for j in c],
                                                                         cfg.run.eval_samples, tools))
                for i, c in enumerate(chunks)]
        out = np.concatenate(actors.wait(refs, cfg.timeouts.generate_s, "evaluate"))
        if keep:
            self.final_forecasts[keep] = (evaluate.point_forecasts(out)[0], evaluate.truth(questions))
        return evaluate.summarize(questions, out, cfg.task.reward, cfg.task.clip_eps, cfg.task.format_penalty)

    def _eval_sets(self) -> dict:
        """name -> (questions, with tools): the training and held-out parameters of the synthetic families (a fixed
        subset of `run.eval_max_questions` each), and with tools the same sets evaluated without them too."""
        cfg = self.cfg
        if cfg.task.source != "synthetic":
            return {}
        sets = {}
        for split in ("train", "heldout"):
            qs = synthetic.questions(cfg.task.families, split)
            cap = cfg.run.eval_max_questions
            if cap and len(qs) > cap:
                qs = [qs[i] for i in sorted(np.random.default_rng([cfg.run.seed, 7]).choice(len(qs), cap, False))]
            if qs:
                sets[split] = (qs, True)
        if cfg.task.tools:
            sets.update({f"{name} (no tools)": (qs, False) for name, (qs, _) in list(sets.items())})
        return sets

    # ------------------------------------------------------------------ the loop

    def run(self, resume_from: str | None = None) -> dict:
        from tqdm import tqdm

        from cluster import actors
        from cluster.metrics import TrainingMetrics

        cfg, to = self.cfg, self.cfg.timeouts
        sampler = QuestionSampler(cfg.task, cfg.run.seed)
        known = [q.p_true if q.p_true is not None else q.market_prob for q in sampler.pool]
        levels = reference_levels(known, cfg.task.reward, cfg.task.clip_eps) if None not in known else None
        eval_sets = self._eval_sets()
        exported = TrainingMetrics(cfg.run.name)
        first, pending = 0, None
        state = {"tool_totals": {"tool_calls": 0, "tool_errors": 0, "leak_violations": 0}, "reward_first": None}
        if resume_from:
            state, pending = self.resume(resume_from)
            first = state["step"]
            print(f"resumed from {self.storage.path(resume_from)}: step {first}, policy version {self.version}",
                  flush=True)
        summary: dict = {"run_dir": self.storage.uri, "reference_levels": levels.as_dict() if levels else None}
        summary["eval_before"] = state.get("eval_before") or {name: self.evaluate(qs, tools)
                                                               for name, (qs, tools) in eval_sets.items()}
        state["eval_before"] = summary["eval_before"]
        log = MetricsLog(self.storage, first)
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
            m.update(step=step, policy_version=m.pop("sampler_policy_version"), sync_s=sync_s,
                     wall_s=time.perf_counter() - self.t0, step_s=time.perf_counter() - t_step)
            m.update({f"dropped_{k}": v for k, v in self.dropped.items()})
            self.dropped = {}
            if levels and "expected_reward" in m:
                m["skill"] = levels.skill(m["expected_reward"])
            log.write(m)
            exported.record(m, step - m["policy_version"])
            state["reward_first"] = m["reward_mean"] if state["reward_first"] is None else state["reward_first"]
            last_reward = m["reward_mean"]
            done = step + 1
            bar.update(1)
            bar.write(_step_line(m, bool(cfg.task.tools)))
            for k in state["tool_totals"]:
                state["tool_totals"][k] += m.get(k, 0)
            if cfg.run.save_every and done % cfg.run.save_every == 0 and done < cfg.run.steps:
                self.wait_broadcast(syncing)
                self.save(done, state, pending, log)
            if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < cfg.run.steps:
                evals = {name: self.evaluate(qs, tools) for name, (qs, tools) in eval_sets.items()}
                bar.write("  eval " + "  ".join(f"{k}: skill {v['skill']:+.3f} reward {v['reward']:.4f}"
                                                for k, v in evals.items()))
            if self.stop.requested:
                bar.write(f"stopping after step {step} on request")
                break
            if cfg.run.max_minutes and time.perf_counter() - t_train > 60 * cfg.run.max_minutes:
                bar.write(f"stopping after step {step}: run.max_minutes={cfg.run.max_minutes} reached")
                break
        bar.close()
        self.wait_broadcast(syncing)
        summary["train_wall_s"] = time.perf_counter() - t_train
        summary["checkpoint"] = self.storage.path(self.save(done, state, pending, log))
        if self.version != done and not self.stop.requested:  # make the final weights the ones evaluated
            self.version = done
            actors.wait(self.sync.broadcast(self.learners, self.workers, done), to.sync_s, "broadcast weights")
        if not self.stop.requested:
            summary["eval_after"] = {name: self.evaluate(qs, tools, keep=name if tools else None)
                                     for name, (qs, tools) in eval_sets.items()}
        summary.update(steps=done, stopped_early=self.stop.requested, wall_s=time.perf_counter() - self.t0,
                       reward_first=state["reward_first"], reward_last=last_reward, resumed_from=resume_from)
        if cfg.task.tools:
            summary["tools"] = state["tool_totals"]
        log.flush()
        self.storage.write_text("summary.json", json.dumps(summary, indent=1, default=_jsonable))
        self.plot(summary, log.rows())
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
        text = json.dumps(trainer, indent=1, default=_jsonable)
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
        self.version = state["policy_version"]
        actors.wait(self.sync.broadcast(self.learners, self.workers, self.version), to.sync_s, "broadcast weights")
        self.last_checkpoint = rel
        pending = [Chunk(-1, [], self.learners[0].read_pending.remote(rel), None)] if state["pending"] else None
        return state, pending

    def plot(self, summary: dict, metrics: list[dict]) -> None:
        from cluster import report

        name = Path(self.storage.root).name
        with tempfile.TemporaryDirectory() as tmp:
            if metrics:
                report.plot_learning_curve(metrics, summary["reference_levels"], Path(tmp) / "learning_curve.png",
                                           self.cfg.task.reward, name)
            if self.final_forecasts:
                report.plot_reliability(self.final_forecasts, Path(tmp) / "reliability.png",
                                        ylabel="true probability p*", title=f"{name}: mean forecast per question "
                                        "after training")
            self.storage.upload(tmp, "")


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _step_line(m: dict, tools: bool = False) -> str:
    skill = f" skill {m['skill']:+.3f}" if "skill" in m else ""
    line = (f"step {m['step']:4d} v{m['policy_version']:<4d} reward {m['reward_mean']:+.4f} ce {m['ce_mean']:.4f}"
            f"{skill} fmt_fail {m['format_fail_rate']:.2f} zero_var {m['zero_var_groups']}/{m['groups']} "
            f"clip {m['clip_frac']:.3f} gnorm {m['grad_norm']:.3f} gen {m['gen_s']:.2f}s train {m['train_s']:.2f}s "
            f"sync {m['sync_s']:.3f}s")
    if tools:
        hits = f" cache {m['cache_hit_rate']:.2f}" if "cache_hit_rate" in m else ""
        line += (f" | turns {m['turns_mean']:.2f} calls {m['tool_calls']} errors {m['tool_errors']}{hits} "
                 f"leaks {m['leak_violations']}")
    return line


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
        line = f"{name:{width}s} skill {before['skill']:+.3f}"
        if after:
            shrink = 1 - after["ce_minus_floor"] / before["ce_minus_floor"]
            line += f" -> {after['skill']:+.3f}   reward {before['reward']:.4f} -> {after['reward']:.4f}   " \
                    f"CE-floor {before['ce_minus_floor']:.4f} -> {after['ce_minus_floor']:.4f} " \
                    f"({100 * shrink:.0f}% of it closed)   format failures {100 * after['format_fail_rate']:.1f}%"
        print(line)
        by_truth = (after or {}).get("mean_forecast_by_truth", {})
        if name == "train" and 0 < len(by_truth) <= 12:
            print("         mean forecast by true probability: " + ", ".join(
                f"{float(k):.2f}: {v:.2f}" for k, v in by_truth.items() if v is not None))
    if "tools" in s:
        t = s["tools"]
        print(f"tools during training: {t['tool_calls']} calls, {t['tool_errors']} answered with an error, "
              f"{t['leak_violations']} leak violations (content after the as-of date: withheld, must be 0)")
    print("skill: share of the gap from the best constant answer to the entropy floor closed (0 = constant, 1 = p*)")
    print(f"checkpoint: {s.get('checkpoint')}")
    root = s["run_dir"]
    plots = [posixpath.join(root, p) if "://" in root else str(Path(root) / p)
             for p in ("learning_curve.png", "reliability.png")]
    print(f"plots: {', '.join(plots)}")
    print(f"run folder: {root}")


def check_model_path(path: str) -> None:
    """A local folder must exist; anything that cannot be a local path is taken as a hub id (clusters)."""
    p = Path(path).expanduser()
    if p.exists():
        return
    local = path.startswith((".", "/", "~")) or p.parent.exists() and p.parent != Path("")
    if local or len(path.split("/")) != 2:
        raise ConfigError(f"model.path {path!r} does not exist (build the tiny model with "
                          f"`forecast-grpo tiny-model {path}`, or give a hub id such as Qwen/Qwen2.5-1.5B-Instruct)")


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

    check_model_path(cfg.model.path)
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
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RoleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
