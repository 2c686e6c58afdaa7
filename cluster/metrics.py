"""Training metrics as Ray application metrics, so the Ray dashboard (and Prometheus / Grafana) show a run live.

The names and descriptions are `cluster/metric_names.py`'s (as Prometheus scrapes them: Ray adds the `ray_`
prefix, and `_total` to counters); every series carries the run's name as the `run` tag. Ray exports them from
every node's metrics agent (`MetricsExportPort` in `ray.nodes()`) on an interval.
"""

from __future__ import annotations

from cluster.metric_names import COUNTERS, GAUGES

# each metric's source in a step's metrics (metrics.jsonl): a key, or for a labelled counter the prefix of the keys
# that feed it (tool_errors_<kind>, dropped_<reason>), or None where `record` computes it
SOURCES = {"step": "step", "policy_version": "policy_version", "staleness": None, "reward_mean": "reward_mean",
           "ce_mean": "ce_mean", "skill": "skill", "format_fail_rate": "format_fail_rate", "gen_seconds": "gen_s",
           "train_seconds": "train_s", "sync_seconds": "sync_s", "tokens_per_second": None,
           "cache_hit_rate": "cache_hit_rate", "turns_mean": "turns_mean", "tool_calls": "tool_calls",
           "tool_shared_answers": "tool_shared_answers", "tool_errors": ("tool_errors_", "kind"),
           "leak_violations": "leak_violations", "dropped_trajectories": ("dropped_", "reason")}


def _short(name: str) -> str:
    """ray_forecast_grpo_X[_total] -> X."""
    return name.removeprefix("ray_forecast_grpo_").removesuffix("_total")


class TrainingMetrics:
    def __init__(self, run: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": run}
        self.gauges = {_short(n): Gauge(n.removeprefix("ray_"), description=d, tag_keys=("run",)) for n, d in GAUGES}
        self.counters = {}
        for n, d in COUNTERS:
            src = SOURCES[_short(n)]
            keys = ("run", src[1]) if isinstance(src, tuple) else ("run",)
            self.counters[_short(n)] = Counter(n.removeprefix("ray_").removesuffix("_total"), description=d,
                                               tag_keys=keys)

    def record(self, m: dict, staleness: int) -> None:
        values = {name: m.get(SOURCES[name]) for name in self.gauges if SOURCES[name]}
        values["staleness"] = staleness
        values["tokens_per_second"] = m["tokens_generated"] / max(m["gen_s"], 1e-9)
        for name, v in values.items():
            if v is not None and v == v:  # None and NaN are left unset (skill without a known p, no tool call)
                self.gauges[name].set(float(v), tags=self.tags)
        for name, counter in self.counters.items():
            src = SOURCES[name]
            if not isinstance(src, tuple):
                if m.get(src):
                    counter.inc(float(m[src]), tags=self.tags)
                continue
            prefix, label = src
            for k, v in m.items():
                if k.startswith(prefix) and v:
                    counter.inc(float(v), tags={**self.tags, label: k.removeprefix(prefix)})
