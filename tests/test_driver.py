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
