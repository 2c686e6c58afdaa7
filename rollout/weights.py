"""The weights' wire format between the learner and the rollout engines, and both ends of the collective transport.

The collective transport runs in a dedicated process group between learner rank 0 and the workers (gloo on CPU,
NCCL on GPUs), separate from DeepSpeed's and vLLM's groups. Weights go in a few flat buckets per dtype, one
broadcast per bucket, never one call per parameter (open-instruct #1535); both ends derive the buckets from the
same manifest. It imports no role: the learner holds the sending end, a rollout worker the receiving one, and the
driver starts both (`cluster/weight_sync.py`).
"""

from __future__ import annotations

import datetime as dt

import torch
import torch.distributed as dist

BUCKET_BYTES = 256 << 20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_group(host: str, port: int, rank: int, world: int, timeout_s: float):
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
        self.store, self.group = make_group(host, port, 0, world, timeout_s)

    def send_bucket(self, dtype: str, tensors: list[torch.Tensor]) -> int:
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(_DTYPES[dtype])
        self.group.broadcast([flat], dist.BroadcastOptions()).wait()
        return flat.numel() * flat.element_size()


class CollectiveReceiver:
    """A rollout worker's end: unflattens each bucket into Hugging Face-named tensors for the engine."""

    def __init__(self, host: str, port: int, rank: int, world: int, manifest, timeout_s: float):
        self.store, self.group = make_group(host, port, rank, world, timeout_s)
        self.buckets = buckets(manifest)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def receive(self):
        for dtype, items in self.buckets:
            # A fresh buffer per bucket: vLLM's layerwise reload keeps the views it is given until each layer has all
            # its weights, and a layer can straddle two buckets, so one reused buffer would overwrite unloaded weights.
            flat = torch.empty(sum(n for _, _, n in items), dtype=_DTYPES[dtype], device=self.device)
            self.group.broadcast([flat], dist.BroadcastOptions()).wait()
            off = 0
            for name, shape, numel in items:
                yield name, flat[off:off + numel].view(shape)
                off += numel
