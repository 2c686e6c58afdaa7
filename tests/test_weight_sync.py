"""After a weight sync, vLLM's sampled-token logprobs equal the learner's (fp32, 1e-4); before it they differ.

Real Ray, real vLLM, real DeepSpeed, both transports, and a tensor-parallel engine (two ranks, each a process of
vLLM's multiprocess executor, each loading its shard). The learner is moved away from the engine's weights by one
training step with a large learning rate, so a stale engine (or a stale tied lm_head, or a stale prefix cache, or a
rank left behind) shows. With LoRA the learner's model is the base with its adapters, and the engine must sample
their merge, not the base: the adapters' most common silent failure elsewhere (verl #3821, ms-swift #9855, unsloth
#8701) is an engine that keeps sampling the base after a "sync", the reward flat and nothing erroring.
"""

import numpy as np
import pytest

from cluster import actors, weight_sync
from learner.learner import Learner
from rollout.task import QuestionSampler
from rollout.worker import RolloutWorker
from tests.conftest import make_cfg

pytestmark = pytest.mark.e2e


def _masked_gap(batch, learner_lp) -> float:
    m = batch.loss_mask.astype(bool)
    return float(np.abs(learner_lp[m] - batch.sampler_logprobs[m]).max())


@pytest.fixture(scope="module")
def workers(ray_local, tiny_model):
    """tensor-parallel size -> a rollout worker, started on first use."""
    started = {}

    def get(tp: int):
        if tp not in started:
            cfg = make_cfg(tiny_model, f"rollout.tensor_parallel_size={tp}")
            started[tp] = ray_local.remote(RolloutWorker).options(num_cpus=0.5).remote(
                cfg.rollout_job(), 0, "1" if tp == 1 else "0|1")
            ray_local.get(started[tp].ready.remote(), timeout=300)
        return started[tp]

    yield get
    for w in started.values():
        ray_local.kill(w)


@pytest.mark.parametrize("transport,zero,tp,lora", [
    ("object_store", 2, 1, False), ("collective", 3, 1, False), ("object_store", 2, 2, False),
    ("object_store", 2, 1, True), ("collective", 3, 1, True)])
def test_logprobs_match_after_sync(ray_local, tiny_model, workers, transport, zero, tp, lora):
    worker = workers(tp)
    cfg = make_cfg(tiny_model, f"sync.transport={transport}", f"learner.zero_stage={zero}", "learner.lr=0.01",
                   "grpo.normalize_std=false", "rollout.prompts_per_step=8", f"rollout.tensor_parallel_size={tp}",
                   *(["learner.lora.r=8"] if lora else []))
    learner = ray_local.remote(Learner).options(num_cpus=0.5).remote(cfg.learner_job(), 0, 1, "127.0.0.1", None, None)
    sync = weight_sync.make(transport, 120)
    actors.wait(sync.setup([learner], [worker]), 120, "join")
    # the worker may hold weights from an earlier test: start both sides equal
    actors.wait(sync.broadcast([learner], [worker], 0), 120, "sync")

    sampler = QuestionSampler(cfg.task, seed=0)
    batch = ray_local.get(worker.generate.remote(sampler.step(0, 8)), timeout=300)
    assert _masked_gap(batch, ray_local.get(learner.sequence_logprobs.remote(batch), timeout=120)) < 1e-4

    ray_local.get(learner.train_step.remote(batch), timeout=120)  # move the learner away from the engine
    stale = ray_local.get(worker.generate.remote(sampler.step(1, 8)), timeout=120)
    assert _masked_gap(stale, ray_local.get(learner.sequence_logprobs.remote(stale), timeout=120)) > 1e-3

    actors.wait(sync.broadcast([learner], [worker], 1), 120, "sync")
    fresh = ray_local.get(worker.generate.remote(sampler.step(1, 8)), timeout=120)
    assert int(fresh.policy_version[0]) == 1
    assert _masked_gap(fresh, ray_local.get(learner.sequence_logprobs.remote(fresh), timeout=120)) < 1e-4
    if lora:  # ...the learner's merged model, which is not the base (its adapters off: the KL's reference)
        assert _masked_gap(fresh, ray_local.get(learner.sequence_logprobs.remote(fresh, True), timeout=120)) > 1e-3
    ray_local.kill(learner)
