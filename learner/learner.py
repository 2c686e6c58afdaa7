"""The GRPO learner on DeepSpeed: a plain class (tests and benchmarks use it without Ray; the Ray actor in
`cluster/actors.py` is a thin wrapper).

One `train_step` takes the trajectory batches of one step, computes group advantages, drops what carries no signal
(zero-variance groups) or is too old (beyond the staleness bound), and makes `grpo.updates_per_batch` optimizer
steps over micro-batches of the rest. Ranks stay in lock-step: every rank sees the whole batch, makes the same
keep/drop decisions, and runs the same number of forward/backward passes (a rank with fewer sequences runs a
zero-weight pass), because ZeRO-2/3 reduce and gather inside those passes.

With `learner.lora` the model is wrapped by peft and only its adapters train (`learner/lora.py` says what changes:
the reference policy, the weights the engines get, the checkpoint).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from learner import forward, grpo, lora
from learner.config import LearnerJob
from learner.storage import RunStorage, parquet_bytes
from rollout import weights
from rollout.trajectory import TrajectoryBatch, rollout_stats


def free_port() -> int:
    """A port free now (the OS's pick, released at once): for a rendezvous that must be told its port before anyone
    binds it (torch.distributed's MASTER_PORT, the weights' TCPStore). The one definition: the driver and the tests
    take theirs from here too."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def deepspeed_config(cfg: LearnerJob, on_gpu: bool) -> dict:
    lc = cfg.learner
    zero: dict = {"stage": lc.zero_stage}
    if lc.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False, "overlap_comm": on_gpu})
    elif lc.zero_stage in (1, 2):
        zero["overlap_comm"] = False
    if lc.offload_optimizer:  # on GPUs DeepSpeed then steps with its CPU Adam (fp32 moments)
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if lc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": 1,
        # Variable micro-batches per step: every step() is the accumulation boundary (DeepSpeed >= 0.19).
        "managed_gradient_accumulation": False,
        "gradient_clipping": lc.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lc.lr, "betas": list(lc.adam_betas), "eps": 1e-8, "weight_decay": lc.weight_decay,
            **({} if on_gpu else {"torch_adam": True})}},
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: LearnerJob):
    lc, total = cfg.learner, cfg.total_steps

    def f(step: int) -> float:
        if lc.warmup_steps and step < lc.warmup_steps:
            return (step + 1) / lc.warmup_steps
        if lc.lr_schedule == "constant":
            return 1.0
        t = min(1.0, (step - lc.warmup_steps) / max(1, total - lc.warmup_steps))
        return lc.min_lr_ratio + (1 - lc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


class Learner:
    def __init__(self, cfg: LearnerJob, rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1",
                 master_port: int | None = None, run_dir: str | None = None):
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.storage = RunStorage(run_dir) if run_dir else None
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            threads = cfg.learner.torch_threads or max(1, int(cfg.learner.num_cpus))
            torch.set_num_threads(threads)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0" if not self.on_gpu else
                          os.environ.get("LOCAL_RANK", "0"), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port or free_port()))
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo", verbose=False)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")

        ds_config = deepspeed_config(cfg, self.on_gpu)
        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        with self._zero3_init(ds_config):
            model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype)
        model.config.use_cache = False
        if cfg.learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.learner.lora:
            model = lora.wrap(model, cfg.learner.lora, cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        schedule = lr_lambda(cfg)
        # The schedule is in training steps: it reads the step, not the scheduler's count of optimizer steps (several
        # per batch with grpo.updates_per_batch, none in a step with nothing to learn); train_step re-reads it.
        self.steps_done = 0
        self.engine, *_ = deepspeed.initialize(  # the optimizer gets the trained parameters only (LoRA: the adapters)
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: schedule(self.steps_done)))
        # a KL weight rising from 0 needs the reference later on
        self.kl_on = cfg.grpo.kl_beta > 0 or (cfg.grpo.kl_beta_end or 0.0) > 0
        self.reference = None
        if self.kl_on and not cfg.learner.lora:  # with LoRA the reference is this model, its adapters off
            with self._zero3_init(ds_config):
                ref = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype)
            ref.requires_grad_(False).eval()
            ref_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "gradient_clipping")}
            self.reference = deepspeed.initialize(model=ref, config=ref_config)[0] \
                if cfg.learner.zero_stage == 3 else ref.to(self.device)

    @contextlib.contextmanager
    def _zero3_init(self, ds_config: dict):
        """ZeRO-3: partition parameters while loading, so a 14B model never sits whole on one rank."""
        if self.cfg.learner.zero_stage != 3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive during from_pretrained)
        yield

    # ------------------------------------------------------------------ batches

    def _plan(self, mini: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """This rank's micro-batches of a mini-batch, as (sequence indices, weight).

        Ranks take contiguous shares (groups stay together, so prompts are shared), and all ranks run the same
        number of passes; a rank that runs out repeats one sequence with weight 0.
        """
        share = np.array_split(mini, self.world_size)[self.rank]
        mb = self.cfg.learner.micro_batch_size
        n_micro = math.ceil(math.ceil(len(mini) / self.world_size) / mb)
        plan = []
        for k in range(n_micro):
            idx = share[k * mb:(k + 1) * mb]
            plan.append((idx, 1.0) if len(idx) else (mini[:1], 0.0))
        return plan

    def _logprobs(self, model, mb: forward.MicroBatch, entropy: str = "none"):
        return forward.completion_logprobs(model, mb, self.cfg.temperature, entropy)

    def _micro(self, batch: TrajectoryBatch, idx: np.ndarray) -> forward.MicroBatch:
        return forward.build(batch, idx, self.tokenizer.pad_token_id or 0, self.device)

    @contextlib.contextmanager
    def _reference(self):
        """The KL's reference policy, the starting model: with LoRA this model with its adapters off (no second
        copy), else the frozen copy loaded beside it when a KL weight is on."""
        if self.cfg.learner.lora:
            with self.engine.module.disable_adapter():
                yield self.engine
        elif self.reference is None:
            raise RuntimeError("no reference policy: grpo.kl_beta is 0 and learner.lora is off, so none is loaded")
        else:
            yield self.reference

    @torch.no_grad()
    def sequence_logprobs(self, batch: TrajectoryBatch, reference: bool = False) -> np.ndarray:
        """The learner's logprob of every completion token (flat, aligned with batch.tokens; 0 on prompts); with
        `reference`, the KL's reference policy's (`_reference`)."""
        self.engine.eval()
        out = np.zeros(len(batch.tokens), dtype=np.float32)
        mb = self.cfg.learner.micro_batch_size
        with self._reference() if reference else contextlib.nullcontext(self.engine) as model:
            for start in range(0, batch.num_sequences, mb):
                micro = self._micro(batch, np.arange(start, min(start + mb, batch.num_sequences)))
                logp = self._logprobs(model, micro)[0].float().cpu().numpy()
                for row, i in enumerate(micro.rows):
                    s = batch.offsets[i] + batch.prompt_lens[i]
                    out[s:batch.offsets[i + 1]] = logp[row, : batch.offsets[i + 1] - s]
        self.engine.train()
        return out

    # ------------------------------------------------------------------ training

    def train_step(self, *batches: TrajectoryBatch) -> dict:
        """One learner step on the trajectories of one rollout step (one batch per rollout worker, passed as
        separate arguments so Ray resolves them in this process). Returns step metrics, same on every rank. An empty
        batch (every trajectory dropped before training: a prompt too long, a failed conversation) makes no update,
        and the step still counts, so the steps stay the driver's."""
        t0 = time.perf_counter()
        cfg, g = self.cfg, self.cfg.grpo
        batch = TrajectoryBatch.concat(list(batches))
        step = self.steps_done
        with warnings.catch_warnings():  # torch warns of a scheduler stepped before the optimizer: here on purpose
            warnings.simplefilter("ignore")
            self.engine.lr_scheduler.step()  # this step's lr, from the step (see __init__)
        lr, kl_beta = self.engine.get_lr()[0], self.kl_beta()  # what this step trains with, and reports
        parsed = torch.from_numpy(~np.isnan(batch.forecasts))
        adv, zero_var = grpo.group_advantages(torch.from_numpy(batch.rewards), torch.from_numpy(batch.group_ids),
                                              g.normalize_std, parsed if g.format_aware else None)
        kl_weight = parsed.float() if g.kl_skip_unparsed else None  # per sequence, like the advantages
        staleness = step - batch.policy_version.astype(np.int64)
        stale = staleness > cfg.max_staleness
        # zero-variance groups carry no policy-gradient signal; they are kept only for a KL or entropy term to act on
        regularised = kl_beta > 0 or g.entropy_coef > 0
        keep = np.nonzero((~zero_var.numpy() | regularised) & ~stale)[0]
        # mini-batches: one optimizer step each; with several, the ratio needs the pre-update logprobs
        plans = [(mini, self._plan(mini)) for mini in np.array_split(keep, g.updates_per_batch) if len(mini)]
        prox = self._proximal_logprobs(batch, plans) if len(plans) > 1 else None

        sums = torch.zeros(6, dtype=torch.float64)  # loss, clipped, tokens, kl, entropy, is_weight
        grad_norms = []
        self.engine.train()
        seq_tokens = np.add.reduceat(batch.loss_mask.astype(np.int64), batch.offsets[:-1])
        for mini, plan in plans:
            denom = float(seq_tokens[mini].sum()) if g.loss_agg == "token-mean" else float(len(mini))
            for idx, weight in plan:
                sums += self._micro_step(batch, idx, adv, kl_weight, denom, weight, prox)
            # ZeRO stage 0 computes the norm for clipping but does not keep it: take it before the step
            # (exact on one rank; on several it is this rank's norm before the all-reduce)
            local = None if self.cfg.learner.zero_stage else torch.nn.utils.get_total_norm(
                [p.grad for p in self.engine.module.parameters() if p.grad is not None])
            self.engine.step()  # also steps the lr schedule
            gn = self.engine.get_global_grad_norm()
            grad_norms.append(float(gn if gn is not None else local))
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(sums)
        self.steps_done += 1
        tok = max(sums[2].item(), 1.0)
        metrics = {
            "loss": sums[0].item() / max(1, len(plans)),
            "clip_frac": sums[1].item() / tok,
            "kl": sums[3].item() / tok,
            "kl_beta": kl_beta,
            "entropy": sums[4].item() / tok,
            "is_weight_mean": sums[5].item() / tok,
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
            "lr": lr,
            "optimizer_steps": len(plans),
            "trained_sequences": int(len(keep)),
            "dropped_stale": int(stale.sum()),
            "max_staleness_seen": int(staleness.max()) if len(staleness) else 0,
            "train_s": time.perf_counter() - t0,
        }
        metrics.update(rollout_stats(batch, cfg.task))
        if batch.num_sequences:
            metrics["zero_var_groups"] = int(len(np.unique(batch.group_ids[zero_var.numpy()])))
        every = cfg.trajectories_every
        if self.rank == 0 and self.storage and every and step % every == 0 and batch.num_sequences:
            self._write_trajectories(batch, adv.numpy(), step)
        return metrics

    def _write_trajectories(self, batch: TrajectoryBatch, adv: np.ndarray, step: int) -> None:
        texts = [self.tokenizer.decode(batch.tokens[batch.sequence(i)][batch.prompt_lens[i]:])
                 for i in range(batch.num_sequences)]
        self.storage.write_bytes(f"trajectories/step_{step:06d}.parquet",
                                 parquet_bytes(batch.to_arrow(extra={"advantage": adv}, texts=texts)))

    def kl_beta(self) -> float:
        g = self.cfg.grpo
        if g.kl_beta_end is None:
            return g.kl_beta
        t = min(1.0, self.steps_done / max(1, self.cfg.total_steps - 1))
        return g.kl_beta + t * (g.kl_beta_end - g.kl_beta)

    def _micro_step(self, batch, idx, adv, kl_weight, denom, weight, prox) -> torch.Tensor:
        g = self.cfg.grpo
        mb = self._micro(batch, idx)
        rows = torch.from_numpy(mb.rows)
        a = adv[rows].to(self.device).unsqueeze(1)
        kl_w = None if kl_weight is None else kl_weight[rows].to(self.device).unsqueeze(1)
        logp, ent = self._logprobs(self.engine, mb, "grad" if g.entropy_coef > 0 else "nograd")
        logp_prox = logp.detach() if prox is None else self._stack(prox, mb)
        logp_ref = None
        if self.kl_on:
            with torch.no_grad(), self._reference() as reference:
                logp_ref, _ = self._logprobs(reference, mb)
        tl = grpo.token_loss(logp, logp_prox, mb.sampler_logprobs, a, eps_low=g.clip_eps_low,
                             eps_high=g.clip_eps_high, tis_cap=g.tis_cap, logp_ref=logp_ref, kl_beta=self.kl_beta(),
                             kl_weight=kl_w, entropy=ent, entropy_coef=g.entropy_coef)
        # DeepSpeed averages gradients over ranks; the loss is this rank's share of the global sum
        loss = grpo.aggregate(tl.loss, mb.loss_mask, g.loss_agg, denom) * self.world_size * weight
        self.engine.backward(loss)
        m = mb.loss_mask * weight
        with torch.no_grad():
            return torch.tensor([loss.item() / self.world_size, (tl.clipped.float() * m).sum().item(), m.sum().item(),
                                 (tl.kl * m).sum().item(), (ent * m).sum().item(), (tl.is_weight * m).sum().item()],
                                dtype=torch.float64)

    @torch.no_grad()
    def _proximal_logprobs(self, batch: TrajectoryBatch, plans) -> dict[int, torch.Tensor]:
        """Logprobs before any update of this batch, per sequence, for the ratio of every later mini-batch."""
        out = {}
        self.engine.eval()
        for _, plan in plans:
            for idx, weight in plan:  # the same passes as training: ZeRO-3 ranks stay in lock-step
                mb = self._micro(batch, idx)
                logp = self._logprobs(self.engine, mb)[0]
                for row, i in enumerate(mb.rows):
                    out[int(i)] = logp[row]
        self.engine.train()
        return out

    def _stack(self, prox: dict[int, torch.Tensor], mb: forward.MicroBatch) -> torch.Tensor:
        t = torch.zeros_like(mb.sampler_logprobs)
        for row, i in enumerate(mb.rows):
            p = prox[int(i)]
            n = min(len(p), t.shape[1])
            t[row, :n] = p[:n]
        return t

    # ------------------------------------------------------------------ weights out

    def _gathered(self, params):
        if self.cfg.learner.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def _weights(self) -> list[lora.Weight]:
        """What the engines load, under the model's Hugging Face names: the parameters, or with LoRA the merged
        weights (`learner/lora.py`)."""
        if self.cfg.learner.lora:
            return lora.merged_weights(self.engine.module)
        return [lora.Weight(name, [p], lambda p=p: p) for name, p in self.engine.module.named_parameters()]

    @staticmethod
    def _manifest(ws: list[lora.Weight]) -> list:
        return weights.manifest_of((w.name, w.params[0]) for w in ws)  # a merged weight has its base weight's shape

    def named_weight_chunks(self, chunk_bytes: int = 256 << 20):
        """Full weights in chunks (every rank must iterate: ZeRO-3 gathers are collective); rank 0 gets tensors."""
        ws = self._weights()
        chunk, size = [], 0
        for i, w in enumerate(ws):
            chunk.append(w)
            size += sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size() for p in w.params)
            if size >= chunk_bytes or i == len(ws) - 1:
                with self._gathered([p for c in chunk for p in c.params]):
                    yield [(c.name, c.value().detach().to("cpu", copy=True)) for c in chunk] if self.rank == 0 else []
                chunk, size = [], 0

    def export_weights(self) -> dict | None:
        """Object-store transport: {name: numpy array} (bf16 as int16 views, dtype map under '__dtypes__')."""
        arrays, dtypes = {}, {}
        for chunk in self.named_weight_chunks():
            for name, t in chunk:
                if t.dtype == torch.bfloat16:
                    dtypes[name] = "bfloat16"
                    t = t.view(torch.int16)
                arrays[name] = t.numpy()
        if self.rank != 0:
            return None
        return {"arrays": arrays, "dtypes": dtypes, "version": self.steps_done}

    def weight_group_address(self) -> tuple[str, int, list]:
        import ray

        return ray.util.get_node_ip_address(), free_port(), self._manifest(self._weights())

    def join_weight_group(self, host: str, port: int, world: int, timeout_s: float) -> int:
        if self.rank == 0:
            self._sender = weights.CollectiveSender(host, port, world, timeout_s)
        return self.rank

    def broadcast_weights(self) -> int:
        """Collective transport: every rank gathers bucket by bucket (ZeRO-3), rank 0 broadcasts each bucket."""
        ws = self._weights()
        by_name = {w.name: w for w in ws}
        sent = 0
        for dtype, items in weights.buckets(self._manifest(ws)):
            bucket = [by_name[name] for name, _, _ in items]
            with self._gathered([p for w in bucket for p in w.params]):
                if self.rank == 0:
                    sent += self._sender.send_bucket(dtype, [w.value().detach() for w in bucket])
        return sent

    def save_checkpoint(self, rel: str, *pending: TrajectoryBatch) -> dict[str, int]:
        """Everything this rank needs to continue, under `rel` in the run folder: its DeepSpeed state (parameters,
        optimizer, lr schedule; with LoRA the adapters' only), step and RNG; rank 0 also writes the Hugging Face
        folder (for `eval` and vLLM; with LoRA the merged weights, and the adapter in peft's format in `adapter/`)
        and the `pending` batches, generated for the next step (with overlap), so that a resumed run trains on
        exactly them. Every rank must call it (ZeRO-3 gathers are collective). Returns the files written and their
        sizes; the driver's marker, written once every rank is done, makes the checkpoint complete."""
        state = {}
        for chunk in self.named_weight_chunks():
            state.update(chunk)
        lc = self.cfg.learner
        with tempfile.TemporaryDirectory() as tmp:
            ds = Path(tmp) / "deepspeed"
            # with LoRA the frozen weights are model.path's, read again on resume: no copy of them per checkpoint
            self.engine.save_checkpoint(str(ds), tag=DS_TAG, save_latest=False,
                                        exclude_frozen_parameters=lc.lora is not None)
            torch.save({"steps_done": self.steps_done, "torch_rng": torch.get_rng_state(),
                        "numpy_rng": np.random.get_state()}, ds / f"rank_{self.rank}.pt")
            files = {f"deepspeed/{k}": v for k, v in self.storage.upload(ds, f"{rel}/deepspeed").items()}
            if lc.lora:
                with self._gathered([p for p in self.engine.module.parameters() if p.requires_grad]):
                    if self.rank == 0:
                        self.engine.module.save_pretrained(Path(tmp) / "adapter")
                        files.update({f"adapter/{k}": v for k, v in
                                      self.storage.upload(Path(tmp) / "adapter", f"{rel}/adapter").items()})
            if self.rank == 0:
                hf = Path(tmp) / "hf"
                model = self.engine.module.get_base_model() if lc.lora else self.engine.module
                model.save_pretrained(hf, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(hf)
                files.update(self.storage.upload(hf, rel))
                if pending:
                    data = parquet_bytes(TrajectoryBatch.concat(list(pending)).to_arrow())
                    self.storage.write_bytes(f"{rel}/{PENDING}", data)
                    files[PENDING] = len(data)
        return files

    def load_checkpoint(self, rel: str) -> int:
        """Continue from a complete checkpoint that `save_checkpoint` wrote (with the same world size). Each rank
        reads the model states and its own shard only. Returns the step to continue from."""
        def mine(name: str) -> bool:
            base = os.path.basename(name)
            return base in ("mp_rank_00_model_states.pt", f"rank_{self.rank}.pt") or \
                base.startswith(f"zero_pp_rank_{self.rank}_")

        with tempfile.TemporaryDirectory() as tmp:
            self.storage.download(f"{rel}/deepspeed", tmp, keep=mine)
            mine_state = Path(tmp) / f"rank_{self.rank}.pt"
            if not mine_state.is_file():
                raise RuntimeError(f"{self.storage.path(rel)} has no state for learner rank {self.rank}: it was "
                                   "saved with another learner.world_size")
            path, _ = self.engine.load_checkpoint(tmp, tag=DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True,
                                                  custom_load_fn=lora.load_adapters if self.cfg.learner.lora else None)
            if path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint in {self.storage.path(rel)}/deepspeed")
            st = torch.load(mine_state, weights_only=False)
        self.steps_done = st["steps_done"]
        torch.set_rng_state(st["torch_rng"])
        np.random.set_state(st["numpy_rng"])
        return self.steps_done

    def read_pending(self, rel: str) -> TrajectoryBatch:
        """The batch a checkpoint kept for its next step (see save_checkpoint)."""
        return TrajectoryBatch.from_arrow(pq.read_table(pa.BufferReader(self.storage.read_bytes(f"{rel}/{PENDING}"))))


DS_TAG = "state"
PENDING = "pending_batch.parquet"
