"""The driver's bookkeeping at unit level (no Ray, no engine): the version a replaced worker is told, the bound the
progress bar shows, and what a recipe builds for itself when `ray job submit` did not bring it."""

from cluster.config import load_config
from cluster.train import Driver, StopRequest, _bar_bound, build_missing
from tests.conftest import ROOT

DICE = ROOT / "cluster/configs/dice-cpu.yaml"
DEMO = ROOT / "cluster/configs/demo-cpu.yaml"


def test_a_replaced_worker_is_told_the_version_of_the_weights_it_gets(monkeypatch, tmp_path):
    """Under sync.every > 1 the learner is ahead of the last broadcast: a worker restarted between two broadcasts gets
    the learner's weights, labelled with the learner's step (what its batch's staleness is counted from), not the
    last broadcast's version. The driver's calls, recorded (no Ray)."""
    from ray.exceptions import RayActorError

    from cluster import actors
    from learner.storage import RunStorage

    sent, died = [], [None]

    class Sync:
        def broadcast(self, learners, workers, version):
            sent.append((workers, version))
            return []

    class Method:
        """An actor method's shape: .options(...).remote(...)."""

        def __init__(self, reply):
            self.remote = reply

        def options(self, **_):
            return self

    class Worker:
        ready = Method(lambda: None)
        rollout = Method(lambda instances, step: (f"batch {step}", f"receipt {step}"))

    def wait(named, timeout_s, what, reraise_death=False):
        if what == "generate" and died:  # the first wait sees the worker dead
            raise RayActorError(died.pop())
        return []

    monkeypatch.setattr(actors, "wait", wait)
    monkeypatch.setattr(actors, "wait_restarted", lambda *a: None)
    cfg = load_config(DICE, ["sync.every=4", "sync.max_staleness=4"])
    driver = Driver(cfg, RunStorage(str(tmp_path)), StopRequest())
    driver.workers, driver.learners, driver.sync, driver.tool_url = [Worker()], [], Sync(), None
    driver.version = 4  # broadcast after step 3; the learner has trained steps 4 and 5 since
    chunks = driver.collect([driver._submit(0, ["q"] * 8, 6)], 6)
    assert sent == [([driver.workers[0]], 6)] and driver.version == 6  # its one worker holds version 6 now
    assert chunks[0].batch == "batch 6" and driver.dropped == {"worker_died": 8 * cfg.rollout.group_size}


def test_the_progress_bar_counts_toward_the_bound_that_ends_the_run():
    def bound(steps, minutes, done, elapsed_s):  # a run resumed at step 5
        return _bar_bound(load_config(DICE, [f"run.steps={steps}", f"run.max_minutes={minutes}"]), 5, done, elapsed_s)

    # 10 steps in 96 s: 9.6 s a step, 384 s left of 8 minutes, 40 more steps
    assert bound(100_000, 8, 15, 96.0) == (55, "steps (about 55 fit in run.max_minutes=8)")  # the demo's case
    assert bound(100_000, 8, 55, 490.0)[0] == 55  # past the minutes: this step was the last
    assert bound(30, 8, 15, 96.0) == (30, "steps")  # the steps end it first
    assert bound(100_000, "null", 15, 96.0) == bound(100_000, 8, 5, 0.0) == (100_000, "steps")  # no minutes; no pace


def test_the_demo_builds_what_the_job_did_not_bring(tmp_path):
    world, model = tmp_path / "world", tmp_path / "someones-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = load_config(DEMO, [f"model.path={model}", f"tools.wiki.snapshot={world}/wiki.parquet",
                             f"tools.news.corpus={world}/news.parquet"])
    build_missing(cfg)  # a model is there: kept as it is (model.build_tiny builds where nothing is); the world written
    assert [p.name for p in model.iterdir()] == ["config.json"]
    assert sorted(p.name for p in world.iterdir()) == ["news.parquet", "wiki.parquet"]
    snapshot = (world / "wiki.parquet").stat().st_mtime_ns
    build_missing(cfg)
    assert (world / "wiki.parquet").stat().st_mtime_ns == snapshot  # there: left alone
    dice = load_config(DICE, [f"model.path={tmp_path / 'nothing'}"])
    build_missing(dice)  # builds nothing it was not asked to
    assert not (tmp_path / "nothing").exists()


def test_a_worker_that_dies_during_an_evaluation_is_replaced_and_asked_its_batch_again(monkeypatch, tmp_path):
    """Batched evaluation, one call in flight per worker (no Ray: its waits recorded): the first batch's worker dies,
    is given the learner's weights as a replaced worker is in training (their version the learner's step), and asked
    that batch again; every question is scored once, and the batch asked again is counted. Without restarts
    (rollout.max_restarts 0) it ends the job, naming the worker."""
    import numpy as np
    import pytest
    import ray
    from ray.exceptions import RayActorError

    from cluster import actors
    from learner.storage import RunStorage
    from rollout import synthetic
    from rollout.evaluate import Samples

    questions = synthetic.questions(["dice"])[:6]
    sent, broadcast = [], []

    class Sync:
        def broadcast(self, learners, workers, version):
            broadcast.append((workers, version))
            return []

    class Method:
        def __init__(self, reply):
            self.remote = reply

    class Worker:
        def __init__(self, index):
            self.ready = Method(lambda: None)
            self.forecasts = Method(lambda qs, n, tools: self.ask(index, qs, n))

        @staticmethod
        def ask(index, qs, n):
            sent.append((index, [q.id for q in qs]))
            return Ref(len(sent) - 1, qs, n)

    class Ref:
        """An object reference's stand-in: which call, and what it asked."""

        def __init__(self, call, qs, n):
            self.call, self.qs, self.n = call, qs, n

    def answer(ref):
        call, qs, n = ref.call, ref.qs, ref.n
        if call == 0:  # the first call's worker dies under it
            raise RayActorError()
        return Samples(np.array([[q.p_true] * n for q in qs]), [["t"] * n for _ in qs], [["answer"] * n for _ in qs],
                       np.ones(len(qs), dtype=bool))

    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: (refs[:1], refs[1:]))
    monkeypatch.setattr(actors, "wait", lambda named, timeout_s, what, reraise_death=False:
                        [answer(named[0][1])] if what == "evaluate" else [])
    monkeypatch.setattr(actors, "wait_restarted", lambda *a: None)

    def driver(*sets):
        d = Driver(load_config(DICE, ["run.eval_batch_questions=2", "run.eval_samples=3", "run.progress=false",
                                      "rollout.num_workers=2", *sets]), RunStorage(str(tmp_path)), StopRequest())
        d.workers, d.learners, d.sync, d.tool_url = [Worker(0), Worker(1)], [], Sync(), None
        d.version = d.trained = 4
        return d

    d = driver()
    d.trained = 5  # the learner is a step ahead of the weights the workers hold (sync.every > 1)
    out = d.evaluate("train", questions, tools=False)
    ids = [q.id for q in questions]
    assert sent == [(0, ids[0:2]), (1, ids[2:4]), (0, ids[0:2]), (1, ids[4:6])]  # the lost batch first, again
    assert broadcast == [([d.workers[0]], 5)]  # the replaced worker gets the learner's weights, as their version
    assert out["batches_asked_again"] == 1
    assert out["skill"] == pytest.approx(1.0)  # every question scored once, on p* itself
    sent.clear()
    with pytest.raises(actors.RoleError, match="rollout worker 0 died while the job waited to evaluate"):
        driver("rollout.max_restarts=0").evaluate("train", questions, tools=False)
