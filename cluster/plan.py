"""`forecast-grpo plan`: where each role runs and how much memory each GPU needs, before anything starts.

    forecast-grpo plan --config cluster/configs/qwen2.5-7b.yaml [--set ray.cluster.nodes=2 ...]

Prints the placement (node, GPU, role: `cluster/placement.py`, which also gives the driver its placement-group
bundles) and the memory estimate per GPU with its breakdown (`cluster/memory.py`), checked against the hardware in
`ray.cluster`. A job that cannot be placed or does not fit is refused (exit 1) with the role and the shortfall.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cluster import memory
from cluster.config import ConfigError, JobConfig, load_config
from cluster.memory import GIB, Part
from cluster.placement import PlacementError, Slot, place


@dataclass
class Plan:
    cfg: JobConfig
    shape: memory.ModelShape
    slots: list[Slot]
    learner: list[Part]
    rollout: memory.RolloutMemory
    gpu_bytes: dict[tuple[int, int], float] = field(default_factory=dict)
    """(node, GPU) -> bytes of every role on it."""
    cpu_bytes: dict[int, float] = field(default_factory=dict)
    """node -> host memory of the roles on it (offloaded states, CPU roles)."""
    problems: list[str] = field(default_factory=list)


def _role_bytes(slot: Slot, plan: Plan, on_cpu: bool) -> float:
    """A role's bytes on each of its GPUs (on_cpu False) or in its node's memory (True)."""
    if slot.bundle.role.startswith("learner"):
        return sum(p.bytes for p in plan.learner if p.on_cpu == on_cpu)
    if not on_cpu:
        return plan.rollout.budget  # vLLM claims its share of each of its GPUs, whatever it holds
    return sum(p.bytes for p in plan.rollout.parts if p.on_cpu)


def make_plan(cfg: JobConfig) -> Plan:
    shape = memory.model_shape(cfg.model.path)
    plan = Plan(cfg, shape, [], memory.learner_parts(cfg, shape), memory.rollout_memory(cfg, shape))
    try:
        plan.slots = place(cfg)
    except PlacementError as e:
        plan.problems.append(str(e))
    roles = defaultdict(list)
    for slot in plan.slots:
        for g in slot.gpus:
            plan.gpu_bytes[slot.node, g] = plan.gpu_bytes.get((slot.node, g), 0.0) + _role_bytes(slot, plan, False)
            roles[slot.node, g].append(slot.bundle.role)
        plan.cpu_bytes[slot.node] = plan.cpu_bytes.get(slot.node, 0.0) + _role_bytes(slot, plan, True)
    plan.problems += _kv_cache_short(plan) + _gpus_short(plan, roles) + _nodes_short(plan)
    return plan


def _kv_cache_short(plan: Plan) -> list[str]:
    rc, hw, r = plan.cfg.rollout, plan.cfg.ray.cluster, plan.rollout
    if r.kv_need <= r.kv_have:
        return []
    where = (f"rollout.cpu_kvcache_gib is {rc.cpu_kvcache_gib}" if rc.num_gpus == 0 else
             f"vLLM leaves {max(0.0, r.kv_have) / GIB:.1f} of its rollout.gpu_memory_utilization="
             f"{rc.gpu_memory_utilization:g} x {hw.gpu_memory_gib:g} GiB after weights and runtime")
    return [f"rollout worker: its KV cache needs {r.kv_need / GIB:.1f} GiB ({r.sequences} sequences x "
            f"rollout.max_model_len={rc.max_model_len} tokens), {where}: {(r.kv_need - r.kv_have) / GIB:.1f} GiB short"]


def _gpus_short(plan: Plan, roles: dict) -> list[str]:
    """One line for GPUs alike (every learner rank's), not one per GPU."""
    hw = plan.cfg.ray.cluster
    alike = defaultdict(list)
    for (node, g), used in plan.gpu_bytes.items():
        if used > hw.gpu_memory_gib * GIB:
            kinds = " + ".join(role.rsplit(" ", 1)[0] for role in roles[node, g])  # 'learner rank'
            alike[kinds, round(used / GIB, 1)].append(f"{' + '.join(roles[node, g])} on node {node} GPU {g}")
    return [f"{kinds}: needs {need:.1f} GiB per GPU, a GPU has {hw.gpu_memory_gib:g} (ray.cluster.gpu_memory_gib): "
            f"{need - hw.gpu_memory_gib:.1f} GiB short ({'; '.join(where[:2])}{'; ...' if len(where) > 2 else ''})"
            for (kinds, need), where in alike.items()]


def _nodes_short(plan: Plan) -> list[str]:
    hw = plan.cfg.ray.cluster
    return [f"node {node}: its roles need {used / GIB:.1f} GiB of CPU memory, a node has {hw.cpu_memory_gib:g} "
            f"(ray.cluster.cpu_memory_gib): {used / GIB - hw.cpu_memory_gib:.1f} GiB short"
            for node, used in plan.cpu_bytes.items() if used > hw.cpu_memory_gib * GIB]


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.2f} MiB"


def _parts(title: str, parts: list[Part]) -> list[str]:
    lines = [title]
    for where, name in ((False, "on its GPU"), (True, "in CPU memory")):
        mine = [p for p in parts if p.on_cpu == where]
        if mine:
            lines += [f"    {p.what:<66s}{_size(p.bytes):>12s}" for p in mine]
            lines.append(f"    {'= ' + name:<66s}{_size(sum(p.bytes for p in mine)):>12s}")
    return lines


def _n(count: float, noun: str) -> str:
    return f"{count:g} {noun}{'' if count == 1 else 's'}"


def render(plan: Plan, source: str) -> str:
    cfg, s, hw = plan.cfg, plan.shape, plan.cfg.ray.cluster
    lc, rc = cfg.learner, cfg.rollout
    local = (Path(cfg.model.path) / "config.json").is_file()
    out = [f"plan for {source}",
           f"model    {cfg.model.path} ({'its config.json' if local else 'built-in shape'}): "
           f"{s.params:,} parameters, {s.layers} layers, hidden {s.hidden}, {s.heads} heads / "
           f"{s.kv_heads} KV heads, vocab {s.vocab}; {cfg.model.dtype}",
           f"hardware {_n(hw.nodes, 'node')} x {_n(hw.gpus_per_node, 'GPU')} x {hw.gpu_memory_gib:g} GiB, "
           f"{hw.cpus_per_node:g} CPUs and {hw.cpu_memory_gib:g} GiB memory per node (ray.cluster)", ""]
    cpu_only = lc.num_gpus == 0 and rc.num_gpus == 0
    if cpu_only:
        out.append("CPU-only: no role asks for a GPU (learner.num_gpus = rollout.num_gpus = 0); Ray places the "
                   "bundles by CPU")
    out.append("placement (the driver's placement-group bundles, packed first-fit in this order)")
    out.append(f"  {'node':<6}{'GPU':<8}{'role':<20}{'CPUs':>6}{'GPU GiB':>10}")
    for slot in plan.slots:
        gpus = ",".join(map(str, slot.gpus)) or "-"
        used = f"{plan.gpu_bytes[slot.node, slot.gpus[0]] / GIB:10.1f}" if slot.gpus else f"{'-':>10}"
        out.append(f"  {slot.node:<6}{gpus:<8}{slot.bundle.role:<20}{slot.bundle.cpus:>6g}{used}")
    out.append("")
    zero = f"ZeRO-{lc.zero_stage} over {_n(lc.world_size, 'rank')}" + \
        "".join(f", {k}" for k in ("offload_optimizer", "offload_params") if getattr(lc, k))
    if lc.lora:
        zero += f"; LoRA r={lc.lora.r}, {s.adapter_params(lc.lora):,} trained parameters"
    out += _parts(f"learner rank ({zero}; micro-batch {lc.micro_batch_size})", plan.learner)
    states = memory.model_states(s, lc, memory.dtype_bytes(cfg))
    out.append(f"    model states (weights, gradients, optimizer): {_size(sum(p.bytes for p in states))}")
    r = plan.rollout
    claim = (f"vLLM claims {rc.gpu_memory_utilization:g} x {hw.gpu_memory_gib:g} = {r.budget / GIB:.1f} GiB per GPU"
             if rc.num_gpus else "vLLM on CPU")
    out += _parts(f"rollout worker ({claim}, tensor-parallel {rc.tensor_parallel_size})", r.parts)
    out.append(f"    KV cache needed: {_size(r.kv_need)} for {r.sequences} sequences at once x {rc.max_model_len} "
               "tokens")
    if any(plan.cpu_bytes.values()):
        out.append("CPU memory per node: " + ", ".join(f"node {n} {_size(b)}" for n, b in
                                                        sorted(plan.cpu_bytes.items())) +
                   f" of {hw.cpu_memory_gib:g} GiB")
    out.append("")
    if plan.problems:
        out += ["REFUSED: this config cannot run on ray.cluster"] + [f"  - {p}" for p in plan.problems]
    elif cpu_only:
        out.append(f"OK: CPU-only; fits the {hw.cpu_memory_gib:g} GiB of CPU memory per node")
    else:
        top = max(plan.gpu_bytes.values())
        out.append(f"OK: fits; the fullest GPU holds {top / GIB:.1f} of {hw.gpu_memory_gib:g} GiB")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forecast-grpo plan", description="Placement and per-GPU memory estimate of a "
                                 "job on the hardware in its ray.cluster section; exit 1 if it cannot fit.")
    ap.add_argument("--config", required=True, help="job config YAML")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = ap.parse_args(argv)
    try:
        plan = make_plan(load_config(args.config, args.set))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(plan, args.config))
    return 1 if plan.problems else 0


if __name__ == "__main__":
    sys.exit(main())
