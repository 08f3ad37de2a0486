"""Low-rank adapters (LoRA; Hu et al. 2021, arXiv 2106.09685) in plain PyTorch, for grpo.py --lora-rank.

Full fine-tuning changes every weight W (out x in). LoRA freezes W and learns a low-rank change:

    y = W x + b + s * B A x,    A: (r, in) random,  B: (out, r) zero at the start,  s = alpha / r

so at step 0 the model is exactly the one loaded (B A = 0); only A and B, r * (in + out) numbers
per layer instead of in * out, get gradients and AdamW state; and with the adapters switched off
(adapters_off) the model is the one loaded again: GRPO's frozen reference, with no second copy.
After training W + s B A is one ordinary weight again (merged_weights).

    lora.add_adapters(model, rank=16)             # freeze the model, wrap the targeted nn.Linear layers
    with lora.adapters_off(model): ...            # the model as it was loaded (AdaptersOff: as a Policy)
    model.save_pretrained(folder, state_dict=lora.merged_weights(model))    # a plain model again
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file

import preresq

ADAPTER_FILE = "adapters.safetensors"
# --lora-targets: where adapters can go. Each key names a prefix and the layers under it that get
# one, by their own name (None: every nn.Linear under the prefix).
TARGETS = {
    "language": ("model.language_model.", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj")),
    "vision": ("model.visual.blocks.", ("qkv", "proj", "gate_proj", "up_proj", "down_proj")),
    "merger": ("model.visual.merger.", None),
}


class LoRALinear(torch.nn.Module):
    """An nn.Linear with an adapter: y = x W^T + b + s * dropout(x) A^T B^T, s = alpha / r.

    weight (out, in) and bias are the wrapped layer's own tensors, frozen, under their own names
    (the state dict still reads like the model's). lora_A (r, in) is drawn like nn.Linear's default
    init, U(-1/sqrt(in), 1/sqrt(in)); lora_B (out, r) starts at zero. The adapters and their AdamW
    state are float32 whatever the weights' dtype (their updates are small next to the weights); on
    a GPU they are used in bf16, the activations' dtype.
    """

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        bound = 1 / math.sqrt(base.in_features)
        a = torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator)
        self.lora_A = torch.nn.Parameter(a.to(base.weight.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # as autocast would: no float32 copy of x is kept
        h = (self.dropout(x) @ a.T) * self.scale  # s on the (..., r) tensor: a pass over (..., out) costs a matmul
        return y + h @ b.T

    def merged_weight(self) -> torch.Tensor:
        """W + s B A (out, in), summed in float32, in W's dtype."""
        return (self.weight.float() + self.scale * (self.lora_B @ self.lora_A)).to(self.weight.dtype)


def targeted(name: str, targets: str) -> bool:
    """Whether the nn.Linear called `name` gets an adapter under --lora-targets `targets` (TARGETS keys)."""
    for key in targets.split(","):
        prefix, names = TARGETS[key]
        if name.startswith(prefix) and (names is None or name.rsplit(".", 1)[-1] in names):
            return True
    return False


def config_errors(cfg) -> list[str]:
    """What grpo.Config.check refuses about the --lora-* flags (none without --lora-rank)."""
    if cfg.lora_rank is None:
        return []
    unknown = set(cfg.lora_targets.split(",")) - set(TARGETS)
    return [message for bad, message in [
        (cfg.lora_rank < 1, "--lora-rank must be at least 1"),
        (unknown, f"--lora-targets: unknown {', '.join(sorted(unknown))} (known: {', '.join(TARGETS)})"),
        (cfg.fsdp, "--fsdp with --lora-rank is not supported (the frozen weights are not sharded); a 7B with "
                   "adapters fits one GPU (README, LoRA)"),
        (cfg.reference_device, "--reference-device with --lora-rank: there is no reference copy to place (the "
                               "reference is the policy with its adapters off); drop it")] if bad]


def add_adapters(model: torch.nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 targets: str = "language", seed: int = 0) -> list[str]:
    """Freeze every weight of `model` and put a LoRALinear in place of each targeted nn.Linear.

    alpha: default 2 * rank (s = 2). seed: the draw of the A matrices, from a generator of its own
    (the global random streams are left as they were). Returns the wrapped layers' names.
    """
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and targeted(name, targets):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear(module, rank, alpha or 2 * rank, dropout, generator))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"--lora-targets {targets}: no nn.Linear of this model matches")
    return wrapped


def layers(model: torch.nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_off(model: torch.nn.Module):
    """Inside the block `model` computes as it was loaded (s B A x left out); a no-op without adapters."""
    wrapped = layers(model)
    for m in wrapped:
        m.enabled = False
    try:
        yield model
    finally:
        for m in wrapped:
            m.enabled = True


class AdaptersOff(preresq.Policy):
    """GRPO's frozen reference under LoRA: the policy itself with its adapters off, no second copy
    (every pass runs inside adapters_off)."""

    def run(self, fn, *args, **kwargs):
        with adapters_off(self.model):
            return fn(self.model, *args, **kwargs)


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors: {"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)}."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter merged into its weight (W + s B A, moved to the CPU:
    no second copy on the GPU) and the adapters dropped: the keys of the model as loaded, for
    save_pretrained(state_dict=...)."""
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                weights[f"{name}.weight"] = m.merged_weight().cpu()
    return weights


def save_adapters(model: torch.nn.Module, path) -> None:
    """The adapters alone, as safetensors (rank and scale in its metadata)."""
    first = layers(model)[0]
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter_weights(model).items()}, str(path),
              metadata={"rank": str(first.lora_A.shape[0]), "scale": str(first.scale)})


def load_adapters(model: torch.nn.Module, path) -> None:
    """Copy saved adapters into the model's own (add_adapters first, with the same rank and targets)."""
    saved, own = load_file(str(path)), adapter_weights(model)
    if saved.keys() != own.keys() or any(saved[k].shape != own[k].shape for k in own):
        raise ValueError(f"{path}: its adapters do not fit this model's (another --lora-rank or --lora-targets?)")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(saved[k])
