"""Moving the learner's weights into every rollout engine, behind one small interface with two transports.

- `ObjectStoreSync` (default): learner rank 0 returns the full weights as numpy arrays; Ray keeps them in the object
  store and the driver hands the *reference* to every worker, which reads them zero-copy.
- `CollectiveSync`: a dedicated process group between learner rank 0 and the workers (gloo on CPU, NCCL on GPUs),
  separate from DeepSpeed's and vLLM's groups. Weights go in a few flat buckets per dtype, one broadcast per
  bucket, never one call per parameter (open-instruct #1535). The wire format and the worker's receiving end are in
`rollout/weights.py`, the sending end in the learner: this module only starts both ends from the driver.

Every ZeRO-3 rank takes part in the gather (only rank 0 sends), and every wait has a timeout that names the role.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class WeightSync(ABC):
    """Driver side: start a broadcast of the learner's weights; returns (role name, ref) pairs to wait on."""

    @abstractmethod
    def setup(self, learners, workers) -> list: ...

    @abstractmethod
    def broadcast(self, learners, workers, version: int) -> list: ...


def _names(prefix: str, handles, start: int = 0):
    return [f"{prefix} {i}" for i in range(start, start + len(handles))]


class ObjectStoreSync(WeightSync):
    def setup(self, learners, workers) -> list:
        return []

    def broadcast(self, learners, workers, version: int) -> list:
        exports = [lr.export_weights.remote() for lr in learners]  # every rank gathers; rank 0's holds the arrays
        loads = [w.load_weights.remote(exports[0], version) for w in workers]  # a ref, resolved in each worker
        # Rank 0's export is never waited on here: getting it would pull the whole model into the driver. A failed
        # export fails every load that depends on it, so waiting on the loads surfaces it.
        return list(zip(_names("learner rank", learners[1:], 1) + _names("rollout worker", workers),
                        exports[1:] + loads))


class CollectiveSync(WeightSync):
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def setup(self, learners, workers) -> list:
        import ray

        host, port, manifest = ray.get(learners[0].weight_group_address.remote(), timeout=self.timeout_s)
        world = 1 + len(workers)
        # both ends must be created concurrently: the TCPStore rendezvous waits for all of them
        refs = [learners[0].join_weight_group.remote(host, port, world, self.timeout_s)] + [
            w.join_weight_group.remote(host, port, i + 1, world, manifest, self.timeout_s)
            for i, w in enumerate(workers)]
        return list(zip(["learner rank 0"] + _names("rollout worker", workers), refs))

    def broadcast(self, learners, workers, version: int) -> list:
        refs = [lr.broadcast_weights.remote() for lr in learners] + [
            w.receive_weights.remote(version) for w in workers]
        return list(zip(_names("learner rank", learners) + _names("rollout worker", workers), refs))


def make(transport: str, timeout_s: float) -> WeightSync:
    return ObjectStoreSync() if transport == "object_store" else CollectiveSync(timeout_s)
