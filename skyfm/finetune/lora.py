"""LoRA fine-tuning of the backbone (``backbone: lora``), with Hugging Face ``peft``.

Low-rank adaptation (Hu et al. 2021): each adapted Linear layer ``y = W x + b`` of the ViT's transformer blocks
becomes ``y = W x + b + (alpha / r) * B (A x)``, with ``A`` (r x in) and ``B`` (out x r) the only backbone
parameters that train; ``W`` and everything else in the backbone (embeddings, pixel stem, decoder, tokenizer) stay
frozen, while the detector's trunk and heads train as in the other modes. ``B`` starts at zero, so training
starts from exactly the pretrained backbone.

    lora:
      rank: 8            # r, the rank of B A (>= 1)
      alpha: 16          # scale alpha / r on B A
      dropout: 0.0       # dropout on the adapters' input
      targets: [qkv, proj]   # of the blocks' attn.qkv, attn.proj, mlp.fc1, mlp.fc2

The adapters are peft's (``peft.inject_adapter_in_model`` on the ViT's ``blocks``: it works on any
``nn.Module``); accelerate checkpoints during a run hold them (``...qkv.base_layer.weight``,
``...qkv.lora_A.default.weight``, ...), so a run resumes like any other. The model saved at the end is merged
(:func:`merge_lora`: ``W <- W + (alpha / r) B A``, the base Linear put back), so it has the ordinary detector
state-dict keys and loads with :func:`skyfm.heads.load_detector` without peft.
"""

from __future__ import annotations

from torch import nn

from skyfm.errors import SkyfmError

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")  # timm Block: attn.qkv, attn.proj, mlp.fc1, mlp.fc2
ADAPTER = "default"


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (peft names them ``...lora_A.default.weight`` etc.)."""
    return ".lora_" in name or name.startswith("lora_")


def apply_lora(det, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: tuple[str, ...] | list[str] = ("qkv", "proj")) -> int:
    """Add LoRA adapters to the Linear layers ``targets`` of every transformer block of ``det``'s backbone, in
    place, and leave only the adapters trainable in the backbone (the trunk and heads keep their flags).

    Returns the number of adapted Linear layers. Call it before the optimizer is built and before
    ``accelerator.prepare`` / ``load_state`` (a checkpoint of a LoRA run holds the adapter weights).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SkyfmError(f"lora.rank must be an integer >= 1, got {rank!r}")
    targets = list(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets or unknown:
        raise SkyfmError(f"lora.targets must be a non-empty list of {', '.join(LORA_TARGETS)}, got {targets!r}")
    blocks = getattr(det.foundation.backbone, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise SkyfmError(f"backbone: lora adapts a ViT's transformer blocks; this model's backbone is "
                         f"{type(det.foundation.backbone).__name__} (use backbone: frozen, partial or full)")
    if any(is_lora_parameter(n) for n, _ in blocks.named_parameters()):
        raise SkyfmError("this detector already has LoRA adapters")
    from peft import LoraConfig, inject_adapter_in_model

    # gradients must flow through the (frozen) backbone to reach the adapters, so the detector runs it as in
    # "full" mode (with grad, train-mode drop-path) and the flags below freeze every base weight
    det.set_backbone_mode("full")
    config = LoraConfig(r=rank, lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
                        bias="none")
    try:
        inject_adapter_in_model(config, blocks, adapter_name=ADAPTER)
    except ValueError as e:  # peft: a target matched no module
        raise SkyfmError(f"lora.targets {targets}: {str(e).splitlines()[0]}") from None
    for name, p in det.foundation.named_parameters():
        p.requires_grad_(is_lora_parameter(name))
    det.backbone_mode = "lora"
    return sum(1 for _ in lora_layers(det))


def lora_layers(module: nn.Module):
    """(qualified name, peft LoRA layer) for every adapted layer in ``module`` (none without peft imported)."""
    import sys

    if "peft" not in sys.modules:  # nothing can be adapted if peft was never imported
        return
    from peft.tuners.lora import LoraLayer

    for name, m in module.named_modules():
        if isinstance(m, LoraLayer):
            yield name, m


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter in ``module`` into its base Linear (``W <- W + (alpha / r) B A``) and put the base
    Linear back in its place, in place; afterwards ``module`` has its original structure and state-dict keys.
    Returns the number of merged layers. A detector's ``backbone_mode`` becomes ``full`` (its base weights are
    what they are; call ``set_backbone_mode`` to train it again)."""
    layers = list(lora_layers(module))
    for name, layer in layers:
        layer.merge(safe_merge=True, adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        base = layer.get_base_layer()
        for p in base.parameters():
            p.requires_grad_(False)
        setattr(parent, child, base)
    if getattr(module, "backbone_mode", None) == "lora":
        module.backbone_mode = "full"
    return len(layers)


def count_parameters(det) -> dict[str, int]:
    """Trainable parameters of a detector: ``heads`` (trunk + heads), ``backbone`` (of which ``lora``: the
    adapters), ``trainable`` (the sum) and ``total`` (all parameters, adapters included)."""
    out = {"heads": 0, "backbone": 0, "lora": 0, "trainable": 0, "total": 0}
    for name, p in det.named_parameters():
        out["total"] += p.numel()
        if not p.requires_grad:
            continue
        out["trainable"] += p.numel()
        if name.startswith("foundation."):
            out["backbone"] += p.numel()
            out["lora"] += p.numel() if is_lora_parameter(name) else 0
        else:
            out["heads"] += p.numel()
    return out


__all__ = ["LORA_TARGETS", "apply_lora", "count_parameters", "is_lora_parameter", "lora_layers", "merge_lora"]
