"""A batch of trajectories as flat numpy columns: what travels from rollout workers to the learner.

Sequences are ragged, so token-level columns are concatenated and `offsets` says where each sequence starts
(like an Arrow list array): no padding on the wire, zero-copy through Ray's object store, and a zero-copy Arrow
table for Parquet. Each sequence is prompt + completion tokens exactly as sampled (never re-tokenised). Tool turns
(later) sit inside the completion with loss mask 0 and sampler logprob 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


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
    # batch level
    gen_seconds: float = 0.0
    load_seconds: float = 0.0  # the weight load that preceded this batch on its worker (0: none yet)

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
            else:
                out[f.name] = np.concatenate([getattr(b, f.name) for b in batches])
        return TrajectoryBatch(**out)

    def to_arrow(self, extra: dict[str, np.ndarray] | None = None, texts: list[str] | None = None) -> pa.Table:
        """One row per sequence; token-level columns become list columns without copying."""
        off = pa.array(self.offsets.astype(np.int32))
        cols = {
            "question_id": pa.array(self.question_ids.astype(str)),
            "group_id": self.group_ids, "policy_version": self.policy_version, "reward": self.rewards,
            "forecast": self.forecasts, "target": self.targets, "p_true": self.p_true, "truncated": self.truncated,
            "prompt_len": self.prompt_lens,
            "tokens": pa.ListArray.from_arrays(off, pa.array(self.tokens)),
            "loss_mask": pa.ListArray.from_arrays(off, pa.array(self.loss_mask)),
            "sampler_logprobs": pa.ListArray.from_arrays(off, pa.array(self.sampler_logprobs)),
        }
        if texts is not None:
            cols["completion"] = pa.array(texts)
        cols.update(extra or {})
        return pa.table(cols)

    def write_parquet(self, path, **kwargs) -> None:
        pq.write_table(self.to_arrow(**kwargs), path)


class TrajectoryBuilder:
    """Accumulates sequences as Python lists and freezes them into a TrajectoryBatch once."""

    def __init__(self):
        self._tok, self._mask, self._lp = [], [], []
        self._rows: dict[str, list] = {k: [] for k in ("prompt_lens", "rewards", "group_ids", "policy_version",
                                                       "forecasts", "targets", "p_true", "truncated",
                                                       "question_ids")}
        self._offsets = [0]

    def add(self, prompt: list[int], completion: list[int], completion_mask: list[int],
            completion_logprobs: list[float], **row) -> None:
        self._tok.append(np.asarray(prompt, dtype=np.int32))
        self._tok.append(np.asarray(completion, dtype=np.int32))
        self._mask.append(np.zeros(len(prompt), dtype=np.int8))
        self._mask.append(np.asarray(completion_mask, dtype=np.int8))
        self._lp.append(np.zeros(len(prompt), dtype=np.float32))
        lp = np.asarray(completion_logprobs, dtype=np.float32)
        self._lp.append(np.where(self._mask[-1] > 0, lp, 0.0).astype(np.float32))
        self._offsets.append(self._offsets[-1] + len(prompt) + len(completion))
        row["prompt_lens"] = len(prompt)
        for k, v in self._rows.items():
            v.append(row[k])

    def build(self, gen_seconds: float = 0.0, load_seconds: float = 0.0) -> TrajectoryBatch:
        cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
        r = self._rows
        return TrajectoryBatch(
            tokens=cat(self._tok, np.int32), loss_mask=cat(self._mask, np.int8),
            sampler_logprobs=cat(self._lp, np.float32), offsets=np.asarray(self._offsets, dtype=np.int64),
            prompt_lens=np.asarray(r["prompt_lens"], np.int32), rewards=np.asarray(r["rewards"], np.float32),
            group_ids=np.asarray(r["group_ids"], np.int64), policy_version=np.asarray(r["policy_version"], np.int32),
            forecasts=np.asarray(r["forecasts"], np.float32), targets=np.asarray(r["targets"], np.float32),
            p_true=np.asarray(r["p_true"], np.float32), truncated=np.asarray(r["truncated"], bool),
            question_ids=np.asarray(r["question_ids"], dtype=str), gen_seconds=gen_seconds,
            load_seconds=load_seconds)
