"""Several processes for grpo.py: torchrun and FSDP2.

torchrun starts one process ("rank") per GPU. Each rank samples and scores its own B images; what
the reward needs from the whole global batch is small and is gathered (parsed scores, MOS), and what
the loss needs is summed (token and sequence counts, then the gradients): all of that is
grpo.Processes, the one object through which a step reaches the other processes. gloo on the CPU,
nccl on CUDA; with one process no process group is made. Why not DistributedDataParallel: its hooks
assume one `model(...)` call per backward, while a step runs each prompt once, then its answers
micro-batch by micro-batch; Processes.sum_gradients does what DDP does after the backward (bucketed
sums), without overlapping it. --fsdp shards with FSDP2 (shard_model); its policy is a
ShardedPolicy, whose every pass enters through the FSDP root so that FSDP2 gathers the parameters
the pass needs, and every rank runs the same passes (prefetch.keep_in_step).
"""
from __future__ import annotations

import os
import warnings
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as tdist

import preresq
from support.cli import InputError

COLLECTIVE_TIMEOUT = timedelta(hours=2)


def init_distributed(device: str | None) -> tuple[tuple[int, int, str], str | None]:
    """Join the torchrun job described by WORLD_SIZE, RANK and LOCAL_RANK -> ((rank, world, the device of
    the collectives' tensors), this rank's device): grpo.Processes(rank, world, comm) is made of the first.

    gloo on the CPU, nccl on CUDA with one GPU per process (cuda:LOCAL_RANK). Without torchrun, or
    with one process, nothing is initialised and the device is --device as given.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return (0, 1, "cpu"), device
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
    return (rank, world, device if backend == "nccl" else "cpu"), device


def leave(comm) -> None:
    """The end of this process's part in the torchrun job (nothing to do in one process)."""
    if comm.world > 1:
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


def broadcast(value, comm):
    """Rank 0's value on every rank (a picklable object); in one process, the value itself."""
    if comm.world == 1:
        return value
    shared = [value]
    tdist.broadcast_object_list(shared, src=0)
    return shared[0]


class FSDPRoot(torch.nn.Module):
    """The root module of --fsdp sharding; it holds the model.

    FSDP2 gathers parameters in module forward hooks and takes the first module to run forward as
    its root. The GRPO passes call parts of the model directly (the vision tower once, then the
    decoder and lm_head per micro-batch; generate), so each pass enters through this module's
    forward, which gathers the root's own parameters (embeddings, lm_head, norms, patch embedding,
    merger) and runs fn(model): see ShardedPolicy.run. The pass comes as one closure, so that FSDP's
    pre-forward (which moves tensor arguments to the device) never walks the tokenizer or prompts.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


class ShardedPolicy(preresq.Policy):
    """The policy (or the reference) of an --fsdp run: every pass enters the model through its FSDP
    root, and the processes sample in step (they run the same sharded forwards)."""

    def __init__(self, root: FSDPRoot, tokenizer, image_processor, comm):
        super().__init__(root.model, tokenizer, image_processor)
        self.root, self.comm = root, comm

    def run(self, fn, *args, **kwargs):
        return self.root(lambda model: fn(model, *args, **kwargs))

    def all_finished(self, finished: bool) -> bool:
        return self.comm.all_finished(finished)


def shard_model(model, device: str) -> FSDPRoot:
    """FSDP2 (fully_shard): each decoder layer and vision block is a unit, the root holds the rest.

    FSDP2 would average the gradients it reduce-scatters over ranks; divided by 1 they are sums,
    as grpo.Processes.sum_gradients makes them without --fsdp.
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
