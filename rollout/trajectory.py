"""A batch of trajectories as flat numpy columns: what travels from rollout workers to the learner.

Sequences are ragged, so token-level columns are concatenated and `offsets` says where each sequence starts
(like an Arrow list array): no padding on the wire, zero-copy through Ray's object store, and a zero-copy Arrow
table for Parquet. Each sequence is prompt + completion tokens exactly as sampled (never re-tokenised). With tools,
the completion holds every turn: the model's tokens (loss mask 1) and the tool results between them (loss mask 0,
sampler logprob 0).

A conversation that ends for a reason that says nothing of the model (`DROPPED_ENDS`) is never trained on: it is
left out of its group, counted (`tool_stats["dropped_<reason>"]`) and named in `dropped`, which travels in the
Parquet file's metadata (`trajectory_batch`) beside the rows.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rollout.config import TaskConfig
from rollout.scoring import expected_reward, log_score

DROPPED_ENDS = ("deadline", "failed")
"""Conversation ends that are no answer of the model's: cut by its wall-clock deadline (`rollout.trajectory_timeout_s`:
slow tools must never read as a bad answer) or failed on our side. Never trained on, never scored."""


@dataclass
class TrajectoryBatch:
    # token level, concatenated over sequences
    tokens: np.ndarray  # int32
    loss_mask: np.ndarray  # int8: 1 on tokens the model sampled and is trained on
    sampler_logprobs: np.ndarray  # float32: the sampler's logprob of each masked token, 0 elsewhere
    # sequence level
    offsets: np.ndarray  # int64, n + 1
    prompt_lens: np.ndarray  # int32
    rewards: np.ndarray  # float32
    group_ids: np.ndarray  # int64: completions of the same question instance share a group id
    policy_version: np.ndarray  # int32: the weights version that generated each sequence
    forecasts: np.ndarray  # float32: parsed probability, NaN when unparseable
    targets: np.ndarray  # float32: what the reward scored against (market probability or outcome)
    p_true: np.ndarray  # float32: known aleatoric probability (synthetic), NaN for real questions
    truncated: np.ndarray  # bool: hit max_new_tokens
    question_ids: np.ndarray  # str
    turns: np.ndarray  # int16: assistant turns
    tool_calls: np.ndarray  # int16
    tool_errors: np.ndarray  # int16: calls answered with an error (bad calls and tool failures)
    leak_violations: np.ndarray  # int16: tool answers withheld because they showed content after the as-of date
    end_reason: np.ndarray  # str: answer, length, budget, turns, deadline, eos
    # batch level
    gen_seconds: float = 0.0
    load_seconds: float = 0.0  # the weight load that preceded this batch on its worker (0: none yet)
    tool_stats: dict = field(default_factory=dict)
    """Counts over the batch: tool_errors_<kind>, tool_shared_answers, cache_hits, cache_lookups, dropped_<reason>."""
    dropped: list = field(default_factory=list)
    """Each conversation left out of the batch: {question_id, group_id, reason (one of `DROPPED_ENDS`), detail}."""

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def completion_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def sequence(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    @staticmethod
    def concat(batches: list["TrajectoryBatch"]) -> "TrajectoryBatch":
        if len(batches) == 1:
            return batches[0]
        seq_shift = np.cumsum([0] + [b.offsets[-1] for b in batches[:-1]])
        out = {}
        for f in fields(TrajectoryBatch):
            if f.name == "offsets":
                out[f.name] = np.concatenate([batches[0].offsets[:1]] + [b.offsets[1:] + s
                                                                         for b, s in zip(batches, seq_shift)])
            elif f.name in ("gen_seconds", "load_seconds"):
                out[f.name] = max(getattr(b, f.name) for b in batches)
            elif f.name == "tool_stats":
                out[f.name] = dict(sum((Counter(b.tool_stats) for b in batches), Counter()))
            elif f.name == "dropped":
                out[f.name] = [d for b in batches for d in b.dropped]
            else:
                out[f.name] = np.concatenate([getattr(b, f.name) for b in batches])
        return TrajectoryBatch(**out)

    def to_arrow(self, extra: dict[str, np.ndarray] | None = None, texts: list[str] | None = None) -> pa.Table:
        """One row per sequence; token-level columns become list columns without copying. The batch-level fields
        ride in the schema's metadata, so `from_arrow` gives the same batch back."""
        off = pa.array(self.offsets.astype(np.int32))
        cols = {column: getattr(self, name) for name, column in _SEQUENCE_COLUMNS.items()}
        cols["question_id"] = pa.array(self.question_ids.astype(str))
        cols["end_reason"] = pa.array(self.end_reason.astype(str))
        cols.update({name: pa.ListArray.from_arrays(off, pa.array(getattr(self, name))) for name in _TOKEN_COLUMNS})
        if texts is not None:
            cols["completion"] = pa.array(texts)
        cols.update(extra or {})
        meta = {"gen_seconds": self.gen_seconds, "load_seconds": self.load_seconds, "tool_stats": self.tool_stats,
                "dropped": self.dropped}
        return pa.table(cols).replace_schema_metadata({"trajectory_batch": json.dumps(meta)})

    @staticmethod
    def from_arrow(table: pa.Table) -> "TrajectoryBatch":
        meta = json.loads((table.schema.metadata or {}).get(b"trajectory_batch", b"{}"))
        lengths = pc.list_value_length(table["tokens"]).to_numpy()
        out = {name: np.asarray(pc.list_flatten(table[name]).to_numpy(zero_copy_only=False), dtype=dtype)
               for name, dtype in _TOKEN_COLUMNS.items()}
        out.update({name: np.asarray(table[column].to_numpy(zero_copy_only=False), dtype=dtype)
                    for (name, column), dtype in zip(_SEQUENCE_COLUMNS.items(), _SEQUENCE_DTYPES)})
        return TrajectoryBatch(offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), **out, **meta)

    def write_parquet(self, path, **kwargs) -> None:
        pq.write_table(self.to_arrow(**kwargs), path)


# field -> column, for the sequence-level fields (the Parquet names are singular)
_SEQUENCE_COLUMNS = {"question_ids": "question_id", "group_ids": "group_id", "policy_version": "policy_version",
                     "rewards": "reward", "forecasts": "forecast", "targets": "target", "p_true": "p_true",
                     "truncated": "truncated", "prompt_lens": "prompt_len", "turns": "turns",
                     "tool_calls": "tool_calls", "tool_errors": "tool_errors", "leak_violations": "leak_violations",
                     "end_reason": "end_reason"}
_SEQUENCE_DTYPES = (str, np.int64, np.int32, np.float32, np.float32, np.float32, np.float32, bool, np.int32,
                    np.int16, np.int16, np.int16, np.int16, str)
_TOKEN_COLUMNS = {"tokens": np.int32, "loss_mask": np.int8, "sampler_logprobs": np.float32}


class TrajectoryBuilder:
    """Accumulates sequences as Python lists and freezes them into a TrajectoryBatch once."""

    def __init__(self):
        self._tok, self._mask, self._lp = [], [], []
        self._rows: dict[str, list] = {k: [] for k in ("prompt_lens", "rewards", "group_ids", "policy_version",
                                                       "forecasts", "targets", "p_true", "truncated",
                                                       "question_ids", "turns", "tool_calls", "tool_errors",
                                                       "leak_violations", "end_reason")}
        self._offsets = [0]

    def add(self, prompt: list[int], completion: list[int], completion_mask: list[int],
            completion_logprobs: list[float], *, turns: int = 1, tool_calls: int = 0, tool_errors: int = 0,
            leak_violations: int = 0, **row) -> None:
        self._tok.append(np.asarray(prompt, dtype=np.int32))
        self._tok.append(np.asarray(completion, dtype=np.int32))
        self._mask.append(np.zeros(len(prompt), dtype=np.int8))
        self._mask.append(np.asarray(completion_mask, dtype=np.int8))
        self._lp.append(np.zeros(len(prompt), dtype=np.float32))
        lp = np.asarray(completion_logprobs, dtype=np.float32)
        self._lp.append(np.where(self._mask[-1] > 0, lp, 0.0).astype(np.float32))
        self._offsets.append(self._offsets[-1] + len(prompt) + len(completion))
        row.update(prompt_lens=len(prompt), turns=turns, tool_calls=tool_calls, tool_errors=tool_errors,
                   leak_violations=leak_violations)
        row.setdefault("end_reason", "length" if row["truncated"] else "answer")
        for k, v in self._rows.items():
            v.append(row[k])

    def build(self, gen_seconds: float = 0.0, load_seconds: float = 0.0, tool_stats: dict | None = None,
              dropped: list | None = None) -> TrajectoryBatch:
        cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
        r = self._rows
        return TrajectoryBatch(
            tokens=cat(self._tok, np.int32), loss_mask=cat(self._mask, np.int8),
            sampler_logprobs=cat(self._lp, np.float32), offsets=np.asarray(self._offsets, dtype=np.int64),
            prompt_lens=np.asarray(r["prompt_lens"], np.int32), rewards=np.asarray(r["rewards"], np.float32),
            group_ids=np.asarray(r["group_ids"], np.int64), policy_version=np.asarray(r["policy_version"], np.int32),
            forecasts=np.asarray(r["forecasts"], np.float32), targets=np.asarray(r["targets"], np.float32),
            p_true=np.asarray(r["p_true"], np.float32), truncated=np.asarray(r["truncated"], bool),
            question_ids=np.asarray(r["question_ids"], dtype=str), turns=np.asarray(r["turns"], np.int16),
            tool_calls=np.asarray(r["tool_calls"], np.int16), tool_errors=np.asarray(r["tool_errors"], np.int16),
            leak_violations=np.asarray(r["leak_violations"], np.int16),
            end_reason=np.asarray(r["end_reason"], dtype=str), gen_seconds=gen_seconds, load_seconds=load_seconds,
            tool_stats=dict(tool_stats or {}), dropped=list(dropped or []))


def rollout_stats(batch: TrajectoryBatch, task: TaskConfig | None) -> dict:
    """What the rollout produced in a step (reward, CE to the best-known probability, format failures, turns and tool
    use) and what it dropped (`dropped_<reason>`). Of an empty batch (every trajectory dropped: the step trains on
    nothing) only the counts, and `task` may be None. The learner calls it: a step's batch is whole only there (the
    driver holds references to it), and it adds what it made of the batch (zero-variance groups, staleness)."""
    stats = batch.tool_stats
    out = {
        "sequences": batch.num_sequences,
        "tokens_generated": int(batch.completion_tokens),
        "gen_s": float(batch.gen_seconds),
        "weight_load_s": float(batch.load_seconds),
        "tool_calls": int(batch.tool_calls.sum()),
        "tool_errors": int(batch.tool_errors.sum()),
        "tool_shared_answers": int(stats.get("tool_shared_answers", 0)),
        "leak_violations": int(batch.leak_violations.sum()),
    }
    out.update({k: v for k, v in stats.items() if k.startswith(("tool_errors_", "dropped_"))})
    if not batch.num_sequences:
        return out
    parsed = ~np.isnan(batch.forecasts)
    eps = task.clip_eps
    known = ~np.isnan(batch.p_true)
    # CE to the best-known probability: p* for synthetic questions, the market (or the outcome) otherwise
    p = np.where(known, batch.p_true, batch.targets).astype(np.float64)
    ce = -log_score(p[parsed], batch.forecasts[parsed].astype(np.float64), eps)
    out.update({
        "reward_mean": float(batch.rewards.mean()),
        "reward_std": float(batch.rewards.std()),
        "ce_mean": float(ce.mean()) if len(ce) else float("nan"),
        "format_fail_rate": float(1.0 - parsed.mean()),
        "groups": int(len(np.unique(batch.group_ids))),
        "truncated_rate": float(batch.truncated.mean()),
        "sampler_policy_version": int(batch.policy_version.min()),
        "turns_mean": float(batch.turns.mean()),
    })
    if stats.get("cache_lookups"):  # of the calls the service answered; shared answers asked it nothing
        out["cache_hit_rate"] = stats["cache_hits"] / stats["cache_lookups"]
    out.update({f"end_{r}": int(n) for r, n in zip(*np.unique(batch.end_reason, return_counts=True)) if r != "answer"})
    if known.all():
        out["expected_reward"] = float(expected_reward(batch.p_true, batch.forecasts, task.reward, eps,
                                                       task.format_penalty).mean())
    return out
