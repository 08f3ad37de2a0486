"""Several processes for grpo.py: torchrun, gradient summing, FSDP2.

torchrun starts one process ("rank") per GPU. Each rank samples and scores its own B images;
what the reward needs from the whole global batch is small and is gathered (parsed scores,
MOS), and what the loss needs is summed (token and sequence counts, then the gradients).
gloo on the CPU, nccl on CUDA; with one process no process group is made (SINGLE).

The step (grpo.grpo_step) reaches the other processes through one object, Ranks: the parsed
scores gathered, a few numbers summed, the gradients summed. Why not DistributedDataParallel:
its hooks assume one `model(...)` call per backward, while grpo.policy_update runs each prompt
once, then the answers against its keys and values micro-batch by micro-batch;
all_reduce_gradients does what DDP does after the backward (bucketed sums), without overlapping
it. --fsdp shards with FSDP2 (shard_model), every model pass entering through FSDPRoot.enter so
FSDP2 can gather the parameters each pass needs, and every rank running the same passes
(Ranks.in_step gives each the same number of images).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as tdist

from support.cli import InputError

COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job: rank `rank` of `world`. comm: the device that
    collective tensors live on (cpu for gloo, this rank's GPU for nccl)."""
    rank: int = 0
    world: int = 1
    comm: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()  # one process, no process group


def init_distributed(device: str | None) -> tuple[Dist, str | None]:
    """Join the torchrun job described by WORLD_SIZE, RANK and LOCAL_RANK -> (Dist, this rank's device).

    gloo on the CPU, nccl on CUDA with one GPU per process (cuda:LOCAL_RANK). Without torchrun, or
    with one process, nothing is initialised and the device is --device as given.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE, device
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if device != "cuda":
            raise InputError(f"--device {device} under torchrun: give --device cuda; each process "
                             "takes the GPU of its LOCAL_RANK.")
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s): "
                             "--nproc_per_node must not exceed the GPUs per node.")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                 device_id=torch.device(device) if backend == "nccl" else None)
    return Dist(rank, world, device if backend == "nccl" else "cpu"), device


def leave(dist: Dist) -> None:
    """The end of this process's part in the torchrun job (nothing to do in one process)."""
    if dist.world > 1:
        tdist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank `rank`'s sampling generator: --seed itself on rank 0 (so one process runs as it
    always did), a fixed different one on every other rank (else all ranks draw the same numbers)."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def check_global_batch(sets: dict, images_per_step: int, world: int) -> None:
    """Every rank needs its own images: each training set must hold the global batch, B x world (a
    step takes each image at most once, and an epoch is counted in global batches)."""
    need = images_per_step * world
    for name, items in sets.items():
        if len(items) < need and world == 1:
            raise InputError(f"--images-per-step {images_per_step}, but training set {name!r} has only {len(items)} "
                             f"images: a step takes each image at most once. Use --images-per-step {len(items)} or "
                             "less, or more training data.")
        if len(items) < need:
            fewer, smaller = len(items) // images_per_step, len(items) // world
            advice = ([f"at most {fewer} process{'es' if fewer > 1 else ''}"] if fewer else []) + \
                     ([f"--images-per-step {smaller} or less"] if smaller else []) + ["more training data"]
            raise InputError(
                f"{world} processes x --images-per-step {images_per_step} = {need} images per step, "
                f"but training set {name!r} has only {len(items)} images: every process needs its own. "
                f"Use {', or '.join(advice)}.")


def all_reduce(values: list[float], dist: Dist, op: str = "sum") -> list[float]:
    """Sum (or "max", "min") a few numbers over ranks; in one process, the numbers themselves."""
    if dist.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dist.comm)
    tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}[op])
    return t.tolist()


def broadcast(value, dist: Dist):
    """Rank 0's value on every rank (a picklable object); in one process, the value itself."""
    if dist.world == 1:
        return value
    shared = [value]
    tdist.broadcast_object_list(shared, src=0)
    return shared[0]


def gather_scores(dist: Dist, batch_size: int, mos, scores, valid, fmt):
    """This rank's parsed answers -> the global batch's, the same on every rank.

    mos (n,), scores (n, G, A), valid and fmt (n, G): this rank's n <= batch_size readable images.
    Each rank pads to batch_size rows (all_gather needs one shape) and the padding is dropped again,
    so the result is what one process would hold for the global batch's readable images, in rank
    order. Returns (mos (N,), scores (N, G, A), valid (N, G), fmt (N, G), sizes): sizes[r] is the
    number of rank r's rows among the N.
    """
    n = len(mos)
    if dist.world == 1:
        return mos, scores, valid, fmt, [n]
    g, a = scores.shape[1:]
    packed = torch.zeros(batch_size, 2 + g * (2 + a), dtype=torch.float64)
    packed[:n] = torch.cat([torch.ones(n, 1), mos[:, None], valid.reshape(n, g).float(), fmt.reshape(n, g),
                            scores.reshape(n, g * a)], 1).double()
    parts = [torch.empty_like(packed, device=dist.comm) for _ in range(dist.world)]
    tdist.all_gather(parts, packed.to(dist.comm))
    rows = torch.cat(parts).cpu()
    counts = [int(part[:, 0].sum()) for part in parts]
    rows = rows[rows[:, 0] > 0]
    return (rows[:, 1].float(), rows[:, 2 + 2 * g:].reshape(-1, g, a).float(), rows[:, 2:2 + g] > 0.5,
            rows[:, 2 + g:2 + 2 * g].float(), counts)


@dataclass(frozen=True)
class Ranks:
    """What a GRPO step exchanges with the other processes (grpo.OneProcess is the one-process
    version, with the same methods). sharded: the model is under FSDP2, whose backward already
    reduces the gradients and whose passes every rank must run alike."""
    dist: Dist = SINGLE
    sharded: bool = False

    @property
    def rank(self) -> int:
        return self.dist.rank

    def gather_scores(self, batch_size: int, mos, scores, valid, fmt):
        return gather_scores(self.dist, batch_size, mos, scores, valid, fmt)

    def sum(self, values: list[float]) -> list[float]:
        return all_reduce(values, self.dist)

    def sum_gradients(self, model) -> None:
        if not self.sharded:
            all_reduce_gradients(model.parameters(), self.dist)

    def in_step(self, items: list, visuals: list, problems: list[str]) -> tuple[list, list, list[str]]:
        """This rank's readable images of a step. Under --fsdp every rank must run the same sharded
        passes, so each keeps as many as the rank with fewest (the others are counted as skipped)."""
        if not self.sharded:
            return items, visuals, problems
        n = int(all_reduce([len(items)], self.dist, "min")[0])
        dropped = [f"{it.path} (kept out to keep the ranks in step under --fsdp)" for it in items[n:]]
        return items[:n], visuals[:n], problems + dropped


def all_reduce_gradients(params, dist: Dist, bucket_bytes: int = 25 * 2**20) -> None:
    """Sum the gradients over ranks in flat buckets of about 25 MB, as DistributedDataParallel does
    after backward. A gradient missing on some rank counts as zero there; a parameter without one on
    every rank keeps none (AdamW skips it, as in one process)."""
    if dist.world == 1:
        return
    params = [p for p in params if p.requires_grad]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dist.comm)
    tdist.all_reduce(present, op=tdist.ReduceOp.MAX)
    live = [p for p, has in zip(params, present.tolist()) if has]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets, size = [[]], 0
    for p in live:
        nbytes = p.grad.numel() * p.grad.element_size()
        if buckets[-1] and (size + nbytes > bucket_bytes or p.grad.dtype != buckets[-1][0].grad.dtype):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    for bucket in filter(None, buckets):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        tdist.all_reduce(flat)
        for p, chunk in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(chunk.view_as(p.grad))


class FSDPRoot(torch.nn.Module):
    """The root module of --fsdp sharding; it holds the model.

    FSDP2 gathers parameters in module forward hooks and takes the first module to run forward as
    its root. The GRPO passes call parts of the model directly (the vision tower once, then the
    decoder and lm_head per micro-batch; generate), so each pass enters through this module's
    forward, which gathers the root's own parameters (embeddings, lm_head, norms, patch embedding,
    merger) and runs fn(model): see `call`. The pass comes as one closure, so that FSDP's
    pre-forward (which moves tensor arguments to the device) never walks the tokenizer or prompts.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)

    def enter(self, fn, *args, **kwargs):
        """fn(model, *args, **kwargs) through the root (preresq.model_pass calls it for every pass)."""
        return self(lambda m: fn(m, *args, **kwargs))


def shard_model(model, device: str) -> FSDPRoot:
    """FSDP2 (fully_shard): each decoder layer and vision block is a unit, the root holds the rest.

    FSDP2 would average the gradients it reduce-scatters over ranks; divided by 1 they are sums,
    as all_reduce_gradients makes them without --fsdp.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (tdist.get_world_size(),))
    # A pass may return views of one tensor (the prompt cache's per-layer keys and values), which
    # FSDP2 warns about in case something writes into them in place; nothing does.
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(FSDPFSDPRoot\) returned a view tensor")
    for block in model.model.visual.blocks:
        fully_shard(block, mesh=mesh)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    root = FSDPRoot(model)
    fully_shard(root, mesh=mesh)
    for module in [*model.model.visual.blocks, *model.model.language_model.layers, root]:
        module.set_gradient_divide_factor(1.0)  # sums, not averages
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied one)
    # transformers' generate then keeps every rank stepping until all have finished (synced_gpus),
    # so that the ranks run the same sharded forwards.
    model._is_fsdp_managed_module = True
    return root


def is_sharded(model) -> bool:
    return isinstance(model, FSDPRoot)


def call(model, fn, *args, **kwargs):
    """fn(model, *args, **kwargs), entering through the root when the model is sharded (--fsdp)."""
    return model.enter(fn, *args, **kwargs) if is_sharded(model) else fn(model, *args, **kwargs)


def unwrap(model):
    """The Hugging Face model (inside the FSDP root under --fsdp)."""
    return model.model if is_sharded(model) else model


def full_weights(model) -> dict | None:
    """The weights of a sharded model as one process would hold them, for save_pretrained (None when
    the model is not sharded: save_pretrained reads it itself). A collective under --fsdp: every
    rank calls it, rank 0 receives the weights (on the CPU), the others an empty dict."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k.removeprefix("model."): v for k, v in get_model_state_dict(model, options=options).items()}
    # A tied weight (lm_head = embed_tokens in the smaller Qwen2.5-VL) is written once, as
    # save_pretrained writes it from the model itself.
    tied = ({n for n, _ in unwrap(model).named_parameters(remove_duplicate=False)}
            - {n for n, _ in unwrap(model).named_parameters()})
    return {k: v for k, v in weights.items() if k not in tied}


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer state keyed by parameter position, as torch.optim keys it, whether or not the
    model is sharded: a checkpoint then resumes with or without --fsdp, on any number of ranks.
    A collective under --fsdp (rank 0 receives the state, the others an empty dict)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    if not by_name:
        return {}
    position = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return {"state": {position[k]: v for k, v in by_name["state"].items()},
            "param_groups": [{**group, "params": [position[k] for k in group["params"]]}
                             for group in by_name["param_groups"]]}


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """The inverse of `full_optimizer_state` (every rank reads the checkpoint)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in model.named_parameters()]
    by_name = {"state": {names[i]: v for i, v in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
