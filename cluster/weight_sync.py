"""Moving the learner's weights into every rollout engine, behind one small interface with two transports.

- `ObjectStoreSync` (default): learner rank 0 returns the full weights as numpy arrays; Ray keeps them in the object
  store and the driver hands the *reference* to every worker, which reads them zero-copy.
- `CollectiveSync`: a dedicated process group between learner rank 0 and the workers (gloo on CPU, NCCL on GPUs),
  separate from DeepSpeed's and vLLM's groups. Weights go in a few flat buckets per dtype, one broadcast per
  bucket, never one call per parameter (open-instruct #1535).

Every ZeRO-3 rank takes part in the gather (only rank 0 sends), and every wait has a timeout that names the role.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist

BUCKET_BYTES = 256 << 20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _make_group(host: str, port: int, rank: int, world: int, timeout_s: float):
    timeout = dt.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world, is_master=(rank == 0), timeout=timeout)
    prefix = dist.PrefixStore("forecast_grpo_weights", store)
    if torch.cuda.is_available():
        group = dist.ProcessGroupNCCL(prefix, rank, world, dist.ProcessGroupNCCL.Options())
    else:
        group = dist.ProcessGroupGloo(prefix, rank, world, timeout)
    return store, group


def buckets(manifest: list[tuple[str, list[int], str]]):
    """Consecutive same-dtype parameters, up to BUCKET_BYTES each: [(dtype, [(name, shape, numel)])]."""
    out, cur, cur_dtype, size = [], [], None, 0
    for name, shape, dtype in manifest:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * _DTYPES[dtype].itemsize
        if cur and (dtype != cur_dtype or size + nbytes > BUCKET_BYTES):
            out.append((cur_dtype, cur))
            cur, size = [], 0
        cur.append((name, shape, numel))
        cur_dtype, size = dtype, size + nbytes
    if cur:
        out.append((cur_dtype, cur))
    return out


def manifest_of(named_params) -> list[tuple[str, list[int], str]]:
    """(name, full shape, dtype) of every parameter, in order; ZeRO-3 partitioned ones report ds_shape."""
    return [(n, list(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
            for n, p in named_params]


class CollectiveSender:
    """Learner rank 0's end: rank 0 of the weights group. The learner gathers one bucket at a time and sends it."""

    def __init__(self, host: str, port: int, world: int, timeout_s: float):
        self.store, self.group = _make_group(host, port, 0, world, timeout_s)

    def send_bucket(self, dtype: str, tensors: list[torch.Tensor]) -> int:
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(_DTYPES[dtype])
        self.group.broadcast([flat], dist.BroadcastOptions()).wait()
        return flat.numel() * flat.element_size()


class CollectiveReceiver:
    """A rollout worker's end: unflattens each bucket into Hugging Face-named tensors for the engine."""

    def __init__(self, host: str, port: int, rank: int, world: int, manifest, timeout_s: float):
        self.store, self.group = _make_group(host, port, rank, world, timeout_s)
        self.buckets = buckets(manifest)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def receive(self):
        for dtype, items in self.buckets:
            flat = torch.empty(sum(n for _, _, n in items), dtype=_DTYPES[dtype], device=self.device)
            self.group.broadcast([flat], dist.BroadcastOptions()).wait()
            off = 0
            for name, shape, numel in items:
                yield name, flat[off:off + numel].view(shape)
                off += numel


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
