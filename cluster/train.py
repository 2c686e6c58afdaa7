"""The driver: places the roles, runs the GRPO loop, writes the run folder. It passes references, never bulk data.

    python -m cluster.train --config cluster/configs/demo-cpu.yaml [--set learner.lr=2e-5 ...]

This is also the entry point for `ray job submit`: it joins the cluster at RAY_ADDRESS (or `ray.address`) if set,
else starts a local Ray. Ctrl-C or `ray job stop` (SIGINT/SIGTERM) finishes the current step, saves, and exits.

One step: rollout workers sample G completions for each of the step's questions (trajectory batches stay in the
object store), the learner ranks train on the batch references, and every `sync.every` steps the learner's weights
are broadcast to every worker, which bumps the policy version. With `sync.overlap` the next step's generation is
launched before the learner trains, so generation and training run at the same time (one step of staleness).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np

from cluster import weight_sync
from cluster.config import ConfigError, JobConfig, dump_config, load_config
from rollout import evaluate, synthetic
from rollout.scoring import reference_levels
from rollout.task import QuestionSampler

METRIC_KEYS = ["step", "policy_version", "reward_mean", "reward_std", "ce_mean", "format_fail_rate",
               "zero_var_groups", "clip_frac", "kl", "grad_norm", "tokens_generated", "gen_s", "train_s", "sync_s",
               "wall_s"]


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
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        except (ConnectionError, RuntimeError) as e:  # a port that answers but is no Ray head
            raise ConfigError(f"cannot reach the Ray cluster at {address!r} (RAY_ADDRESS / ray.address): {e}") from None
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)
    return ray


def make_run_dir(cfg: JobConfig) -> Path:
    base = Path(cfg.run.out_dir) / cfg.run.name
    path, k = base, 1
    while path.exists() and any(path.iterdir()):
        path, k = base.with_name(f"{base.name}-{k}"), k + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


class Driver:
    def __init__(self, cfg: JobConfig, run_dir: Path, stop: StopRequest):
        self.cfg, self.run_dir, self.stop = cfg, run_dir, stop
        self.t0 = time.perf_counter()
        self.final_forecasts: dict = {}

    def start(self):
        from cluster import actors

        cfg, to = self.cfg, self.cfg.timeouts
        self.pg = actors.placement(cfg, to.startup_s)
        self.learners = actors.start_learners(cfg, self.pg, str(self.run_dir))
        self.workers = actors.start_workers(cfg, self.pg)
        actors.wait(self._named(self.workers, "ready") + [(f"learner rank {r}", lr.__ray_ready__.remote())
                                                          for r, lr in enumerate(self.learners)],
                    to.startup_s, "start")
        self.sync = weight_sync.make(cfg.sync.transport, to.sync_s)
        setup = self.sync.setup(self.learners, self.workers)
        actors.wait(setup, to.sync_s, "join the weight broadcast group")

    def _named(self, workers, method, *args):
        return [(f"rollout worker {i}", getattr(w, method).remote(*args)) for i, w in enumerate(workers)]

    def launch(self, sampler: QuestionSampler, step: int) -> list:
        """Start generating step's batch on every worker; returns the batch refs (nothing is fetched)."""
        cfg = self.cfg
        instances = sampler.step(step, cfg.rollout.prompts_per_step)
        chunks = np.array_split(np.arange(len(instances)), len(self.workers))
        return [w.generate.remote([instances[i] for i in chunk])
                for w, chunk in zip(self.workers, chunks) if len(chunk)]

    def evaluate(self, questions, keep: str | None = None) -> dict:
        """Sampled forecasts from every worker's copy of the policy (questions split among them); `keep` names
        the set for the final reliability diagram."""
        from cluster import actors

        cfg = self.cfg
        chunks = [c for c in np.array_split(np.arange(len(questions)), len(self.workers)) if len(c)]
        refs = [(f"rollout worker {i}", self.workers[i].forecasts.remote([questions[j] for j in c],
                                                                         cfg.run.eval_samples))
                for i, c in enumerate(chunks)]
        out = np.concatenate(actors.wait(refs, cfg.timeouts.generate_s, "evaluate"))
        if keep:
            self.final_forecasts[keep] = (evaluate.point_forecasts(out)[0], evaluate.truth(questions))
        return evaluate.summarize(questions, out, cfg.task.reward, cfg.task.clip_eps, cfg.task.format_penalty)

    def run(self) -> dict:
        from tqdm import tqdm

        from cluster import actors

        cfg, to = self.cfg, self.cfg.timeouts
        sampler = QuestionSampler(cfg.task, cfg.run.seed)
        known = [q.p_true if q.p_true is not None else q.market_prob for q in sampler.pool]
        levels = reference_levels(known, cfg.task.reward, cfg.task.clip_eps) if None not in known else None
        eval_sets = self._eval_sets()
        summary: dict = {"run_dir": str(self.run_dir), "reference_levels": levels.as_dict() if levels else None}
        summary["eval_before"] = {name: self.evaluate(qs) for name, qs in eval_sets.items()}

        version, pending, done, syncing = 0, None, 0, []
        t_train = time.perf_counter()
        metrics_path = self.run_dir / "metrics.jsonl"
        bar = tqdm(total=cfg.run.steps, disable=not cfg.run.progress, file=sys.stderr, dynamic_ncols=True)
        first_reward = last_reward = None
        with metrics_path.open("a") as mf:
            for step in range(cfg.run.steps):
                t_step = time.perf_counter()
                batches = pending if pending is not None else self.launch(sampler, step)
                # overlap: the next batch is generated while this one trains (stale by one step)
                pending = self.launch(sampler, step + 1) if cfg.sync.overlap and step + 1 < cfg.run.steps else None
                results = actors.wait([(f"learner rank {r}", lr.train_step.remote(*batches))
                                       for r, lr in enumerate(self.learners)], to.train_s + to.generate_s, "train")
                m = results[0]
                sync_s = 0.0
                if (step + 1) % cfg.sync.every == 0:
                    t = time.perf_counter()
                    actors.wait(syncing, to.sync_s, "broadcast weights")  # the previous one; long done by now
                    version = step + 1
                    syncing = self.sync.broadcast(self.learners, self.workers, version)
                    # Each actor runs its calls in submission order, so the next generate on a worker starts
                    # after this load and the next train step after this export: nothing needs to wait here.
                    # Without overlap (fully on-policy) the step includes the whole broadcast.
                    if not cfg.sync.overlap:
                        actors.wait(syncing, to.sync_s, "broadcast weights")
                    sync_s = time.perf_counter() - t
                m.update(step=step, policy_version=m.pop("sampler_policy_version"), sync_s=sync_s,
                         wall_s=time.perf_counter() - self.t0, step_s=time.perf_counter() - t_step)
                if levels and "expected_reward" in m:
                    m["skill"] = levels.skill(m["expected_reward"])
                mf.write(json.dumps({k: _jsonable(v) for k, v in m.items()}) + "\n")
                mf.flush()
                first_reward = m["reward_mean"] if first_reward is None else first_reward
                last_reward = m["reward_mean"]
                done = step + 1
                bar.update(1)
                bar.write(_step_line(m))
                if cfg.run.save_every and done % cfg.run.save_every == 0 and done < cfg.run.steps:
                    self.save(done)
                if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < cfg.run.steps:
                    evals = {name: self.evaluate(qs) for name, qs in eval_sets.items()}
                    bar.write("  eval " + "  ".join(f"{k}: skill {v['skill']:+.3f} reward {v['reward']:.4f}"
                                                    for k, v in evals.items()))
                if self.stop.requested:
                    bar.write(f"stopping after step {step} on request")
                    break
                if cfg.run.max_minutes and time.perf_counter() - t_train > 60 * cfg.run.max_minutes:
                    bar.write(f"stopping after step {step}: run.max_minutes={cfg.run.max_minutes} reached")
                    break
        bar.close()
        actors.wait(syncing, to.sync_s, "broadcast weights")
        summary["train_wall_s"] = time.perf_counter() - t_train
        if version != done and not self.stop.requested:  # make the final weights the ones evaluated
            actors.wait(self.sync.broadcast(self.learners, self.workers, done), to.sync_s,
                        "broadcast weights")
        summary["checkpoint"] = self.save(done)
        if not self.stop.requested:
            summary["eval_after"] = {name: self.evaluate(qs, keep=name) for name, qs in eval_sets.items()}
        summary.update(steps=done, stopped_early=self.stop.requested, wall_s=time.perf_counter() - self.t0,
                       reward_first=first_reward, reward_last=last_reward)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
        self.plot(summary)
        return summary

    def plot(self, summary: dict) -> None:
        from cluster import report

        metrics = report.read_metrics(self.run_dir / "metrics.jsonl")
        if metrics:
            report.plot_learning_curve(metrics, summary["reference_levels"], self.run_dir / "learning_curve.png",
                                       self.cfg.task.reward, self.run_dir.name)
        if self.final_forecasts:
            report.plot_reliability(self.final_forecasts, self.run_dir / "reliability.png",
                                    ylabel="true probability p*", title=f"{self.run_dir.name}: mean forecast per "
                                    "question after training")

    def _eval_sets(self) -> dict:
        cfg = self.cfg
        if cfg.task.source != "synthetic":
            return {}
        sets = {"train": synthetic.questions(cfg.task.families, "train")}
        heldout = synthetic.questions(cfg.task.families, "heldout")
        if heldout:
            sets["heldout"] = heldout
        return sets

    def save(self, step: int) -> str:
        from cluster import actors

        path = self.run_dir / "checkpoints" / f"step_{step:06d}"
        refs = [(f"learner rank {r}", lr.save_checkpoint.remote(str(path))) for r, lr in enumerate(self.learners)]
        return actors.wait(refs, self.cfg.timeouts.save_s, "save a checkpoint")[0]


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _step_line(m: dict) -> str:
    skill = f" skill {m['skill']:+.3f}" if "skill" in m else ""
    return (f"step {m['step']:4d} v{m['policy_version']:<4d} reward {m['reward_mean']:+.4f} ce {m['ce_mean']:.4f}"
            f"{skill} fmt_fail {m['format_fail_rate']:.2f} zero_var {m['zero_var_groups']}/{m['groups']} "
            f"clip {m['clip_frac']:.3f} gnorm {m['grad_norm']:.3f} gen {m['gen_s']:.2f}s train {m['train_s']:.2f}s "
            f"sync {m['sync_s']:.3f}s")


def print_summary(s: dict) -> None:
    lv = s.get("reference_levels")
    print("\n=== forecast-grpo summary ===")
    print(f"steps {s['steps']}{' (stopped early)' if s['stopped_early'] else ''}, wall {s['wall_s']:.0f}s")
    if lv:
        print(f"reference rewards: random {lv['ref_random']:.4f}  best constant {lv['ref_constant']:.4f} "
              f"(always {lv['ref_constant_answer']:.2f})  entropy floor {lv['ref_floor']:.4f}")
    for name, before in s.get("eval_before", {}).items():
        after = s.get("eval_after", {}).get(name)
        line = f"{name:8s} skill {before['skill']:+.3f}"
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
    print("skill: share of the gap from the best constant answer to the entropy floor closed (0 = constant, 1 = p*)")
    print(f"checkpoint: {s.get('checkpoint')}")
    plots = [p for p in ("learning_curve.png", "reliability.png") if (Path(s["run_dir"]) / p).exists()]
    if plots:
        print(f"plots: {', '.join(str(Path(s['run_dir']) / p) for p in plots)}")
    print(f"run folder: {s['run_dir']}")


def check_model_path(path: str) -> None:
    """A local folder must exist; anything that cannot be a local path is taken as a hub id (clusters)."""
    p = Path(path).expanduser()
    if p.exists():
        return
    local = path.startswith((".", "/", "~")) or p.parent.exists() and p.parent != Path("")
    if local or len(path.split("/")) != 2:
        raise ConfigError(f"model.path {path!r} does not exist (build the tiny model with "
                          f"`forecast-grpo tiny-model {path}`, or give a hub id such as Qwen/Qwen2.5-1.5B-Instruct)")


def train(cfg: JobConfig) -> dict:
    check_model_path(cfg.model.path)
    stop = StopRequest()
    stop.install()
    ray = init_ray(cfg)
    run_dir = make_run_dir(cfg)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    print(f"run folder: {run_dir}", flush=True)
    try:
        driver = Driver(cfg, run_dir, stop)
        driver.start()
        summary = driver.run()
    finally:
        ray.shutdown()
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forecast-grpo train", description="Train a forecaster with GRPO on Ray.")
    ap.add_argument("--config", required=False, help="YAML config (cluster/configs/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = ap.parse_args(argv)
    from cluster.actors import RoleError

    try:
        cfg = load_config(args.config, args.set)
        summary = train(cfg)
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
