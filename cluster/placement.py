"""Where each role runs: learner ranks and rollout workers on the nodes and GPUs described by `ray.cluster`.

The job is one Ray placement group with one bundle per learner rank, then one per rollout worker, in the order the
driver starts them (`cluster/actors.py` builds its bundles with `bundles()`). A worker with tensor-parallel size T
is one bundle of T GPUs, so Ray keeps it on one node. `place()` packs the bundles first-fit, in that order, onto the
nodes, as Ray's PACK strategy does, and names the GPUs each one gets; a bundle that fits nowhere is an error that
names the role and by how much it is short.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import JobConfig


class PlacementError(ValueError):
    """The job cannot be placed on `ray.cluster`; the message names the role and the shortfall."""


@dataclass(frozen=True)
class Bundle:
    role: str
    """'learner rank 0', 'rollout worker 3'."""
    cpus: float
    gpus: float
    """Whole GPUs, or a fraction of one."""

    def resources(self) -> dict:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}


@dataclass(frozen=True)
class Slot:
    bundle: Bundle
    node: int
    gpus: tuple[int, ...]
    """Indices of the node's GPUs this bundle uses (empty for a CPU-only bundle)."""


def bundles(cfg: JobConfig) -> list[Bundle]:
    lc, rc = cfg.learner, cfg.rollout
    worker_gpus = rc.num_gpus * rc.tensor_parallel_size
    if worker_gpus > 1 and worker_gpus != int(worker_gpus):
        raise PlacementError(f"rollout worker: rollout.num_gpus * rollout.tensor_parallel_size = {worker_gpus:g} "
                             "GPUs; more than one GPU must be a whole number")
    if lc.num_gpus > 1:
        raise PlacementError(f"learner rank: learner.num_gpus = {lc.num_gpus:g}, but a rank uses one GPU")
    return ([Bundle(f"learner rank {r}", lc.num_cpus, lc.num_gpus) for r in range(lc.world_size)]
            + [Bundle(f"rollout worker {i}", rc.num_cpus, worker_gpus) for i in range(rc.num_workers)])


def place(cfg: JobConfig) -> list[Slot]:
    """One slot per bundle, in bundle order."""
    hw = cfg.ray.cluster
    todo = bundles(cfg)
    free_cpus = [hw.cpus_per_node] * hw.nodes
    free_gpus = [[1.0] * hw.gpus_per_node for _ in range(hw.nodes)]  # the unused share of each GPU
    slots = []
    for b in todo:
        if b.gpus > hw.gpus_per_node:
            keys = "rollout.num_gpus x rollout.tensor_parallel_size" if b.role.startswith("rollout") \
                else "learner.num_gpus"
            raise PlacementError(f"{b.role} needs {b.gpus:g} GPUs on one node ({keys}), a node has "
                                 f"{hw.gpus_per_node} (ray.cluster.gpus_per_node): {b.gpus - hw.gpus_per_node:g} "
                                 "GPUs short")
        if b.cpus > hw.cpus_per_node:
            raise PlacementError(f"{b.role} needs {b.cpus:g} CPUs on one node, a node has {hw.cpus_per_node:g} "
                                 f"(ray.cluster.cpus_per_node): {b.cpus - hw.cpus_per_node:g} CPUs short")
        for node in range(hw.nodes):
            gpus = _take(free_gpus[node], b.gpus)
            if gpus is not None and free_cpus[node] >= b.cpus:
                for g in gpus:
                    free_gpus[node][g] -= min(b.gpus, 1.0)
                free_cpus[node] -= b.cpus
                slots.append(Slot(b, node, gpus))
                break
        else:
            raise PlacementError(_no_room(b, todo, cfg))
    return slots


def _take(shares: list[float], gpus: float) -> tuple[int, ...] | None:
    """The GPUs a bundle gets on a node: `gpus` wholly free ones, or the first with room for a fraction of one."""
    if gpus == 0:
        return ()
    if gpus < 1:
        return next(((g,) for g, free in enumerate(shares) if free >= gpus - 1e-9), None)
    whole = [g for g, free in enumerate(shares) if free >= 1.0 - 1e-9]
    return tuple(whole[: int(gpus)]) if len(whole) >= gpus else None


def _no_room(b: Bundle, todo: list[Bundle], cfg: JobConfig) -> str:
    hw, lc, rc = cfg.ray.cluster, cfg.learner, cfg.rollout
    want_gpus, want_cpus = sum(x.gpus for x in todo), sum(x.cpus for x in todo)
    have_gpus, have_cpus = hw.nodes * hw.gpus_per_node, hw.nodes * hw.cpus_per_node
    ask = (f"the job asks for {want_gpus:g} GPUs ({lc.world_size} learner ranks x {lc.num_gpus:g}, "
           f"{rc.num_workers} rollout workers x {rc.num_gpus * rc.tensor_parallel_size:g}) and {want_cpus:g} CPUs; "
           f"ray.cluster has {have_gpus} GPUs and {have_cpus:g} CPUs ({hw.nodes} nodes x {hw.gpus_per_node} GPUs, "
           f"{hw.cpus_per_node:g} CPUs)")
    if want_gpus > have_gpus:
        return f"no room for {b.role}: {ask}: {want_gpus - have_gpus:g} GPUs short"
    if want_cpus > have_cpus:
        return f"no room for {b.role}: {ask}: {want_cpus - have_cpus:g} CPUs short"
    return (f"no room for {b.role} ({b.gpus:g} GPUs and {b.cpus:g} CPUs on one node): {ask}, enough in all, but "
            "what is left is split across nodes")
