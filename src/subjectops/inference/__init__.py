"""Inference strategies, chosen by `infer.strategy` the way `finetune.method` chooses a method. Add a strategy by
registering its class here: `subjectops.config` reads this registry for the names `infer.strategy` takes and the
section (`infer.<section>`, the strategy's `config_model`) of each, so importing it must not import torch."""

from __future__ import annotations

from typing import Callable

from subjectops.errors import SubjectopsError
from subjectops.inference.alchemy import AlchemyStrategy
from subjectops.inference.base import REQUIREMENTS, InferenceSpec, StageInputs, Strategy, finetuned_pipeline
from subjectops.inference.dreamblend import DreamBlendStrategy
from subjectops.inference.plain import PlainStrategy
from subjectops.inference.reference_guided import ReferenceGuidedStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (PlainStrategy, ReferenceGuidedStrategy, DreamBlendStrategy, AlchemyStrategy)
}

__all__ = ["REQUIREMENTS", "STRATEGIES", "InferenceSpec", "StageInputs", "Strategy", "finetuned_pipeline",
           "get_strategy", "load_strategy", "memory_savers"]


def get_strategy(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise SubjectopsError(f"unknown inference strategy {name!r}",
                              fix=f"set infer.strategy to one of: {', '.join(sorted(STRATEGIES))}") from None


def load_strategy(spec: InferenceSpec, inputs: StageInputs) -> Strategy:
    """The base model plus the finetune, wrapped in the spec's strategy: the one way infer and the registered
    model generate. On the GPU when there is one (each image's noise is still drawn on the CPU from its seed)."""
    strategy = get_strategy(spec.strategy)
    return strategy.load(finetuned_pipeline(inputs.model, strategy.weights(spec, inputs)), spec, inputs)


def memory_savers(memory) -> Callable[[object], None]:
    """What applies `infer.memory` (a MemoryCfg) to a loaded pipeline, checked before anything loads: CPU offload
    moves each model to a GPU while it runs, so it is refused where there is none."""
    import torch

    if memory.cpu_offload and not torch.cuda.is_available():
        raise SubjectopsError("CPU offload (infer.memory.cpu_offload, --cpu-offload) moves each model to the GPU "
                              "while it runs, and there is no GPU here",
                              fix="drop --cpu-offload (or set infer.memory.cpu_offload=false) on a CPU machine")

    def apply(pipe) -> None:
        if memory.attention_slicing:
            pipe.enable_attention_slicing()
        if memory.vae_tiling:
            pipe.vae.enable_tiling()
        if memory.cpu_offload:
            pipe.enable_model_cpu_offload()

    return apply
