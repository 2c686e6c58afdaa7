"""The training metrics a job exports as Ray application metrics (`ray.util.metrics`), by their Prometheus names.

Ray prefixes application metrics with `ray_`, and counters also get `_total`. Every series carries a `run` label
(run.name); the labels named below come on top. `cluster/metrics.py` exports them; the Grafana dashboard
(`cluster/grafana/forecast-grpo.json`) uses these names and no others (`tests/test_grafana.py`).
"""

GAUGES = (
    ("ray_forecast_grpo_step", "learner steps done"),
    ("ray_forecast_grpo_policy_version", "weight broadcasts done: the version the rollout workers sample with"),
    ("ray_forecast_grpo_staleness", "learner steps from the policy a step's batch was sampled with to the learner's"),
    ("ray_forecast_grpo_reward_mean", "mean reward of the step's trajectories"),
    ("ray_forecast_grpo_ce_mean", "mean cross entropy of the forecasts to the market (or known) probability"),
    ("ray_forecast_grpo_skill", "share of the gap from the best constant answer to the entropy floor closed"),
    ("ray_forecast_grpo_format_fail_rate", "share of trajectories without a parseable answer"),
    ("ray_forecast_grpo_gen_seconds", "the step's generation time"),
    ("ray_forecast_grpo_train_seconds", "the step's learner time"),
    ("ray_forecast_grpo_sync_seconds", "the driver's wait for the step's weight broadcast"),
    ("ray_forecast_grpo_tokens_per_second", "tokens generated per second of generation"),
    ("ray_forecast_grpo_cache_hit_rate", "share of the tool calls the tool service answered that it answered from "
     "its revision cache (answers shared within a batch asked it nothing: tool_shared_answers)"),
    ("ray_forecast_grpo_turns_mean", "mean assistant turns per trajectory"),
)

COUNTERS = (
    ("ray_forecast_grpo_tool_calls_total", "tool calls made"),
    ("ray_forecast_grpo_tool_shared_answers_total", "tool calls answered with the answer of the same call asked "
     "earlier in the batch: no request to the tool service"),
    ("ray_forecast_grpo_tool_errors_total", "tool calls that failed, by label `kind`"),
    ("ray_forecast_grpo_leak_violations_total", "tool answers withheld for content after the question's as-of date"),
    ("ray_forecast_grpo_dropped_trajectories_total", "trajectories not trained on, by label `reason`"),
)
