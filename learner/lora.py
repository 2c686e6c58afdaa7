"""LoRA through `peft` (`learner.lora`): the learner trains low-rank adapters on a frozen model.

Each targeted projection W computes x W^T + (alpha / r) x A^T B^T, with A (r x in) and B (out x r) the only trained
weights. What that changes in the learner (`learner/learner.py`), and why:

- DeepSpeed's optimizer gets the adapters only: gradients and Adam moments are theirs alone (`forecast-grpo plan`
  counts them so), and the frozen weights are kept once, in the model's dtype;
- the KL's reference policy, the starting model, is the same model with its adapters off
  (`PeftModel.disable_adapter`): no second copy is loaded;
- the rollout engines get the merged weights W + (alpha / r) B A under the base model's Hugging Face names
  (`merged_weights`), never peft's (`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`), so vLLM
  loads them as it loads a full fine-tune's. vLLM's own LoRA support would keep the base in the engine and load
  adapters beside it; merging keeps one weight path for both kinds of training, and a sync that left an engine
  sampling the base (peers' silent failure: the reward stays flat and nothing errors; verl #3821, ms-swift #9855,
  unsloth #8701) is what `tests/test_weight_sync.py` would catch;
- a checkpoint holds the adapter in peft's own format (`adapter/`: `PeftModel.from_pretrained(base, that folder)`)
  beside the merged Hugging Face folder that `eval` and vLLM load; the DeepSpeed state holds the adapters and their
  optimizer only (the frozen weights are model.path's, read again on resume).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from learner.config import LoraConfig

ADAPTER = "default"
"""peft's name for a model's one adapter."""


def wrap(model, cfg: LoraConfig, seed: int):
    """`model` with adapters on cfg.target_modules, everything else frozen. A is drawn from `seed` (run.seed): two
    runs of one config start alike, and so do all learner ranks."""
    import peft

    if model.config.get_text_config().tie_word_embeddings:
        embeddings = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                      if m is model.get_input_embeddings() or m is model.get_output_embeddings()}
        if embeddings & set(cfg.target_modules):
            raise ValueError(f"learner.lora.target_modules {list(cfg.target_modules)}: this model ties its input and "
                             f"output embeddings ({', '.join(sorted(embeddings))}); an adapter on one would untie "
                             "them, and the engines tie them again, losing it")
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # adapters in the model's dtype, as every other weight: DeepSpeed's bf16 mode keeps their fp32 master copy and
        # moments (peft's default, fp32 adapters on a bf16 model, would be cast by ZeRO 0-2 but not by ZeRO-3)
        try:
            return peft.get_peft_model(model, config, autocast_adapter_dtype=False)
        except ValueError as e:  # peft's "Target modules {...} not found in the base model"
            raise ValueError(f"learner.lora.target_modules {list(cfg.target_modules)}: {e}") from None


class Weight(NamedTuple):
    """One tensor a rollout engine loads."""

    name: str
    """Its Hugging Face name."""
    params: list[torch.nn.Parameter]
    """The parameters it is computed from (under ZeRO-3 they are gathered together before `value` is called)."""
    value: Callable[[], torch.Tensor]


def merged_weights(model) -> list[Weight]:
    """A peft model's weights as the base model's Hugging Face names and shapes, in its parameter order: an adapted
    layer's weight is W + (alpha / r) B A (summed in fp32, stored in W's dtype), its bias and every other parameter
    as they are."""
    from peft.tuners.lora import LoraLayer

    out, seen, adapted = [], set(), None
    for name, module in model.get_base_model().named_modules():
        if adapted and name.startswith(adapted):  # the base layer and adapters inside an adapted layer
            continue
        if isinstance(module, LoraLayer):
            adapted, base = f"{name}.", module.get_base_layer()
            out.append(Weight(f"{name}.weight", [base.weight, module.lora_A[ADAPTER].weight,
                                                 module.lora_B[ADAPTER].weight], lambda m=module: _merge(m)))
            if base.bias is not None:
                out.append(Weight(f"{name}.bias", [base.bias], lambda b=base.bias: b))
            continue
        for leaf, p in module.named_parameters(recurse=False):
            if id(p) not in seen:  # a tied lm_head is the embedding's parameter: listed once, as named_parameters()
                seen.add(id(p))
                out.append(Weight(f"{name}.{leaf}" if name else leaf, [p], lambda p=p: p))
    return out


def _merge(layer) -> torch.Tensor:
    w = layer.get_base_layer().weight
    return (w.float() + layer.get_delta_weight(ADAPTER).float()).to(w.dtype)


def load_adapters(src: dict, dst) -> None:
    """DeepSpeed's `custom_load_fn` for a checkpoint saved without the frozen weights (they are model.path's, loaded
    at the start): it must hold every trained parameter, and nothing the model lacks."""
    got = dst.load_state_dict(src, strict=False)
    trained = {name for name, p in dst.named_parameters() if p.requires_grad}
    missing = sorted(trained.intersection(got.missing_keys))
    if missing or got.unexpected_keys:
        raise RuntimeError(f"the checkpoint's adapters do not match learner.lora: {len(missing)} missing (first: "
                           f"{(missing or [None])[0]}), {len(got.unexpected_keys)} not in the model (first: "
                           f"{(got.unexpected_keys or [None])[0]})")
