"""grpo.py under torch.distributed: two gloo processes on 127.0.0.1 against one process.

The reference for every distributed result is one process given the whole global batch: the
gradient after a step must equal its gradient (to 1e-5), and the rewards, advantages and metrics
must be its own. Answers and completion ids are fixed, so sampling randomness does not enter.
"""
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from harness import distributed
import rewards
import grpo
from harness import lora
from support.cli import InputError
import preresq
from harness import presets
import harness.checkpoints
import harness.config
import harness.logs
import harness.prefetch

G = 3
MOS = [1.5, 4.2, 3.1, 2.4]  # the global batch: 4 images, 2 per rank
SIZES = [(56, 84), (84, 56), (56, 56), (84, 84)]  # different prompt lengths: left padding differs per rank

# name -> (settings, the global images each rank could read, --fsdp). "short": rank 1 lost an
# image; "empty": rank 1 lost both and only takes part in the collectives.
# These compare across the global batch (--compare-across-processes), which one process holds whole;
# "per_process" is the default, each rank's images compared among themselves (test below).
GLOBAL = dict(compare_across_processes=True)
CASES = {
    "ddp": (dict(GLOBAL, loss_type="grpo", scale_rewards="group"), [[0, 1], [2, 3]], False),
    "ddp_short": (dict(GLOBAL, loss_type="dapo", scale_rewards="batch", micro_batch_size=4), [[0, 1], [2]], False),
    "ddp_empty": (dict(GLOBAL, loss_type="grpo", scale_rewards="batch"), [[0, 1], []], False),
    "ddp_lora": (dict(GLOBAL, loss_type="grpo", scale_rewards="group", lora_rank=4, lora_targets="language,vision"),
                 [[0, 1], [2, 3]], False),
    "fsdp": (dict(GLOBAL, loss_type="grpo", scale_rewards="group"), [[0, 1], [2, 3]], True),
    "fsdp_short": (dict(GLOBAL, loss_type="dr_grpo", scale_rewards="batch", micro_batch_size=4), [[0, 1], [2]],
                   True),
}
PER_PROCESS = (dict(images_per_step=3, loss_type="grpo", scale_rewards="group"), [[0, 1, 2], [3, 1, 0]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(image: int) -> list[str]:
    """G fixed answers for a global image: aspect scores drawn per image, one answer per image
    malformed (no <think>, format reward 0 but parsed) and image 1's last unparsable."""
    rng = np.random.default_rng(image)
    texts = []
    for j in range(G):
        values = "\n".join(f"{v:.2f}" for v in rng.uniform(1, 5, 5))
        texts.append(f"<think>looks fine</think>\n<answer>{values}</answer>" if j else f"<answer>{values}</answer>")
    if image == 1:
        texts[-1] = "I cannot tell."
    return texts


def inputs(tok, ip, images: list[int]):
    """Prompts, completion ids (n*G, 7), mask, texts and MOS for the given global images."""
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    every = torch.randint(0, 300, (len(MOS) * G, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(every)
    for row in range(len(MOS) * G):
        mask[row, 3 + row % 5:] = 0  # answers end at different lengths
    rows = [i * G + j for i in images for j in range(G)]
    prompts = preresq.encode_prompts(tok, ip, [[pictures[i]] for i in images], [preresq.IMAGE_PROMPT] * len(images))
    return (prompts, every[rows], mask[rows], [t for i in images for t in answers(i)],
            torch.tensor([MOS[i] for i in images]))


def one_step(model, tok, ip, settings: dict, groups: list[list[int]], comm) -> dict:
    """grpo.score_rollout and grpo.update on fixed answers -> {"grad": flat full gradient, "record": metrics}.
    groups: this process's groups of global images (one, or --groups-per-step). lr 0 and no clipping:
    the gradient is left as computed, the weights unchanged."""
    cfg = harness.config.run_config(grpo.Settings)(model="tiny", images_per_step=2, max_grad_norm=1e9, lr=0.0).resolve()
    for k, v in settings.items():
        setattr(cfg, k, v)
    if cfg.lora_rank:  # only the adapters' gradients are summed; B random, so that A has one too
        lora.add_adapters(model, cfg.lora_rank, targets=cfg.lora_targets, seed=0)
        for m in lora.layers(model):
            torch.nn.init.normal_(m.lora_B, std=0.02, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    if distributed.is_sharded(model):
        comm = replace(comm, sharded=True)
        policy = distributed.ShardedPolicy(model, tok, ip, comm)
    else:
        policy = preresq.Policy(model, tok, ip)
    rollouts, scored = [], []
    for images in groups:
        if comm.sharded:  # as the loop does: every rank keeps as many images as the rank with fewest
            kept, _, _ = harness.prefetch.keep_in_step(comm, [SimpleNamespace(path=str(i)) for i in images],
                                                       list(images), [])
            images = [int(k.path) for k in kept]
        prompts, comp, attn, texts, mos = inputs(tok, ip, images) if images else (None, None, None, [], torch.zeros(0))
        answers = preresq.Answers(comp, attn, texts, G) if images else None
        rollouts.append(grpo.Rollout(prompts, answers, mos, [], G, False))
        scored.append(grpo.score_rollout(cfg, rollouts[-1], grpo.explore_stable(cfg, 0), comm))
    record = harness.logs.step_metrics(harness.logs.joined(scored))
    terms = dict(record)
    record.update(grpo.update(policy, None, list(zip(rollouts, scored)), cfg, optimizer, 0, comm))
    grads = []
    for p in model.parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        grads.append((g.full_tensor() if hasattr(g, "full_tensor") else g).flatten())
    return {"grad": torch.cat(grads), "record": record, "advantages": torch.cat([s.advantages for s in scored]),
            "terms": terms}


def worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    place, _ = distributed.init_distributed("cpu")
    dist = grpo.Processes(*place)
    model, tok, ip = preresq.load_model(model_dir, "cpu")
    results = {}
    for name, (settings, split, fsdp) in CASES.items():
        m = copy.deepcopy(model)
        if fsdp:
            m = distributed.shard_model(m, "cpu")
        results[name] = one_step(m, tok, ip, settings, [split[rank]], dist)
    settings, split = PER_PROCESS
    results["per_process"] = one_step(copy.deepcopy(model), tok, ip, settings, [split[rank]], dist)
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(blank_dir, tmp_path_factory):
    """Every case run by two gloo processes; rank 0's results."""
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    mp.spawn(worker, args=(2, free_port(), str(blank_dir), str(out)), nprocs=2)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_gradient_and_metrics_of_one_process(two_ranks, blank, case):
    settings, split, sharded = CASES[case]
    model, tok, ip = blank
    if sharded:  # FSDP ranks run in step: each kept as many images as the rank with fewest (keep_in_step)
        split = [part[:min(map(len, split))] for part in split]
    single = one_step(copy.deepcopy(model), tok, ip, settings, [[i for part in split for i in part]], grpo.Processes())
    got = two_ranks[case]
    difference = (got["grad"] - single["grad"]).abs().max().item()
    print(f"{case}: max |grad| {single['grad'].abs().max().item():.3g}, max |difference| {difference:.2g}")
    assert single["grad"].abs().max() > 1e-3  # a real gradient, not an empty one
    assert difference <= 1e-5
    want = single["record"]
    assert set(got["record"]) == set(want)
    for key, value in want.items():
        if key.endswith("seconds"):
            continue
        assert got["record"][key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key


@pytest.mark.slow
def test_by_default_each_process_compares_its_own_images(two_ranks, blank):
    """The authors' trainer computes the reward per device: rank 0's advantages are those of one process on
    rank 0's images alone, and the logged reward terms average the two ranks' own computations."""
    settings, split = PER_PROCESS
    model, tok, ip = blank
    alone = [one_step(copy.deepcopy(model), tok, ip, settings, [images], grpo.Processes()) for images in split]
    got = two_ranks["per_process"]
    assert torch.allclose(got["advantages"], alone[0]["advantages"], atol=1e-6)
    for key in ("reward", "reward/pair_fidelity", "reward/triplet_accuracy", "reward/group_rank"):
        assert got["terms"][key] == pytest.approx((alone[0]["terms"][key] + alone[1]["terms"][key]) / 2, rel=1e-6)
    # the same images compared across the global batch give other preference terms
    together = one_step(copy.deepcopy(model), tok, ip, settings, [split[0] + split[1]], grpo.Processes())
    assert together["terms"]["reward/pair_fidelity"] != pytest.approx(got["terms"]["reward/pair_fidelity"])


@pytest.mark.slow
def test_groups_on_one_process_give_the_step_of_as_many_processes(two_ranks, blank):
    """--groups-per-step 2 on one process (the authors' 4 processes x 8 images on one GPU: 4 groups of 8)
    gives two processes' step: the same advantages, metrics and summed gradient."""
    settings, split = PER_PROCESS
    model, tok, ip = blank
    one = one_step(copy.deepcopy(model), tok, ip, dict(settings, groups_per_step=2), split, grpo.Processes())
    got = two_ranks["per_process"]
    difference = (got["grad"] - one["grad"]).abs().max().item()
    print(f"max |grad| {one['grad'].abs().max().item():.3g}, max |difference| {difference:.2g}")
    assert one["grad"].abs().max() > 1e-3 and difference <= 1e-5
    assert torch.allclose(one["advantages"][:len(got["advantages"])], got["advantages"], atol=1e-6)  # rank 0's group
    assert set(one["record"]) == set(got["record"])
    for key, value in got["record"].items():
        if not key.endswith("seconds"):
            assert one["record"][key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key


def test_gathered_scores_keep_their_dtype_so_equal_means_still_tie(monkeypatch):
    """Two ranks' parsed answers (all_gather stood in for: both ranks hold the same) come back
    bit for bit, float64 included: a float32 round trip would split the tie of 4.026 and 4.026."""
    texts = [f"<think>ok</think><answer>{v}</answer>" for v in
             ("2.99\n3.21\n4.11\n4.90\n4.92", "3.08\n3.21\n4.11\n4.81\n4.92", "4\n4\n4\n4\n4", "x")]
    scores, valid, fmt = rewards.parse_completions(texts, 5, 4)
    mos = torch.tensor([3.5], dtype=torch.float64)

    def all_gather(parts, packed):
        for part in parts:
            part.copy_(packed)
    monkeypatch.setattr(grpo.dist, "all_gather", all_gather)
    got = grpo.Processes(rank=0, world=2).gather_scores(1, mos, scores, valid, fmt)
    for have, want in zip(got[:4], (mos, scores, valid, fmt)):
        assert have.dtype == want.dtype and torch.equal(have, torch.cat([want, want]))
    rank = rewards.group_rank(got[1].mean(-1), got[0], got[2])
    assert rank[0, 0] == rank[0, 1] and rank[1, 0] == rank[1, 1]


def test_ranks_split_the_global_batch_of_one_process():
    sets = {"a": list(range(10)), "b": list(range(100, 125))}
    one = harness.prefetch.BatchSampler(sets, 6, seed=3)
    ranks = [harness.prefetch.BatchSampler(sets, 2, seed=3, rank=r, world=3) for r in range(3)]
    for step in range(12):  # several epochs of set "a"
        name, items = one.batch(step)
        assert [ranks[r].batch(step)[0] for r in range(3)] == [name] * 3
        assert [i for r in range(3) for i in ranks[r].batch(step)[1]] == items
        assert ranks[1].dataset(step) == name and ranks[2].epoch(step) == one.epoch(step)


def test_rank_seeds_differ_and_rank_0_keeps_the_seed():
    seeds = [distributed.rank_seed(42, r) for r in range(8)]
    assert seeds[0] == 42 and len(set(seeds)) == 8
    assert seeds == [distributed.rank_seed(42, r) for r in range(8)]


def test_too_few_images_for_the_processes_is_refused_with_the_numbers():
    sets = {"koniq": list(range(30)), "spaq": list(range(100))}
    distributed.check_global_batch(sets, 8, 3)  # 24 <= 30
    with pytest.raises(InputError) as e:  # one process: a step takes each image at most once
        distributed.check_global_batch(sets, 64, 1)
    assert str(e.value) == ("--images-per-step 64, but training set 'koniq' has only 30 images: a step takes each "
                            "image at most once. Use --images-per-step 30 or less, or more training data.")
    with pytest.raises(InputError) as e:
        distributed.check_global_batch(sets, 8, 4)
    message = str(e.value)
    assert "4 processes x --images-per-step 8 = 32" in message and "'koniq' has only 30" in message
    assert message.endswith("Use at most 3 processes, or --images-per-step 7 or less, or more training data.")
    with pytest.raises(InputError) as e:  # a set smaller than B: only a smaller B (or more data) helps
        distributed.check_global_batch({"tid": list(range(5))}, 8, 2)
    assert str(e.value).endswith("Use --images-per-step 2 or less, or more training data.")


# --------------------------------------------------------------------------- torchrun end to end

BASE = ["--model", "tiny", "--device", "cpu", "--images-per-step", "2", "--num-generations", "2",
        "--max-new-tokens", "64", "--workers", "1"]
FLAGS = BASE + ["--steps", "2", "--save-every", "1", "--eval-size", "4", "--eval-every", "100"]


def torchrun_command(args: list[str], nproc: int = 2) -> list[str]:
    """`torchrun --nproc_per_node N grpo.py ARGS` on 127.0.0.1."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), grpo.__file__, *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # conftest's cache and settings passed on


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(args, nproc), cwd=Path(grpo.__file__).parent, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path | str) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def ddp_run(tiny, tmp_path_factory):
    """Two steps on two ranks, a checkpoint after the first, held-out evaluation before and after."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    done = torchrun(FLAGS + ["--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.mark.slow
def test_torchrun_two_processes_rank_0_alone_writes(ddp_run):
    out, done = ddp_run
    assert done.stdout.count("final model:") == 1  # rank 0 alone reports
    assert "2 processes (gloo): global batch 2 x 2 = 4 images per step; gradients summed" in done.stdout
    steps = metrics(out)
    assert [m["step"] for m in steps] == [1, 2]  # one line per step
    assert all(m["completion_tokens"] > 0 and m["parse_failure_rate"] < 1 for m in steps)
    assert steps[1]["epoch"] == pytest.approx(2 * 4 / 297, abs=1e-4)  # the global batch: 2 ranks x 2 images
    assert [e["step"] for e in map(json.loads, (out / "eval.jsonl").read_text().splitlines())] == [0, 2]
    assert [p.name for p in harness.checkpoints.checkpoints(out)] == ["checkpoint-1"] and (out / "final" / "config.json").exists()
    assert not list(out.glob(".*.tmp"))
    state = torch.load(out / "checkpoint-1" / harness.checkpoints.CHECKPOINT_STATE, weights_only=False)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # ranks sample apart
    initial = weights(presets.model_path("tiny"))
    assert any(not torch.equal(v, initial[k]) for k, v in weights(out / "checkpoint-1").items())


@pytest.mark.slow
def test_checkpoints_move_between_two_ranks_and_one_with_the_same_global_batch(ddp_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(ddp_run[0], out)
    # The data order hangs on the global batch (4 images): one process must take all 4 ...
    assert grpo.main(["--out", str(out), "--resume", "--steps", "3"]) == 2
    refused = capsys.readouterr().err
    assert "global batch" in refused and "--images-per-step 4 keeps it" in refused
    # ... and then it continues from step 1, where the two ranks' checkpoint left off.
    assert grpo.main(["--out", str(out), "--resume", "--steps", "3", "--images-per-step", "4"]) == 0
    steps = metrics(out)
    assert [m["step"] for m in steps] == [1, 2, 3] and steps[2]["epoch"] == pytest.approx(3 * 4 / 297, abs=1e-4)
    state = torch.load(out / "checkpoint-2" / harness.checkpoints.CHECKPOINT_STATE, weights_only=False)
    assert state["world_size"] == 1 and state["config"]["images_per_step"] == 4
    # The one-process checkpoint (step 2) goes back to two ranks of 2 images.
    done = torchrun(["--out", str(out), "--resume", "--steps", "4", "--images-per-step", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "at step 2" in done.stdout
    steps = metrics(out)
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and steps[3]["epoch"] == pytest.approx(4 * 4 / 297, abs=1e-4)


@pytest.mark.slow
def test_torchrun_fsdp_trains_the_same_weights(ddp_run, tmp_path):
    """FSDP2 over two gloo ranks: same samples (same seeds), same rewards, and weights equal to the
    unsharded run's to float rounding; its checkpoint (gathered from the shards) resumes on one process."""
    ddp, _ = ddp_run
    out = tmp_path / "run"
    done = torchrun(FLAGS + ["--fsdp", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model, gradients and optimizer state sharded (FSDP2)" in done.stdout
    for sharded, whole in zip(metrics(out), metrics(ddp)):
        for key in ("reward", "completion_tokens", "parse_failure_rate", "batch_srcc"):
            assert sharded[key] == pytest.approx(whole[key], nan_ok=True), key
        assert sharded["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    for folder in ("checkpoint-1", "final"):
        a, b = weights(out / folder), weights(ddp / folder)
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), folder
    assert grpo.main(["--out", str(out), "--resume", "--steps", "3", "--images-per-step", "4"]) == 0
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_torchrun_lora_trains_the_adapters_and_resumes_on_one_process(tiny, tmp_path):
    out = tmp_path / "run"
    done = torchrun(FLAGS + ["--lora-rank", "4", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("LoRA: rank 4 adapters") == 1  # rank 0 alone reports
    assert (out / "checkpoint-1" / lora.ADAPTER_FILE).exists() and not (out / "checkpoint-1" / "config.json").exists()
    assert {lora.ADAPTER_FILE, "model.safetensors"} <= {p.name for p in (out / "final").iterdir()}
    assert grpo.main(["--out", str(out), "--resume", "--steps", "3", "--images-per-step", "4"]) == 0
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and metrics(out)[2]["kl"] > 0


@pytest.mark.slow
def test_ctrl_c_to_torchrun_stops_every_rank_after_the_same_step_with_one_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(torchrun_command(BASE + ["--steps", "50", "--save-every", "100", "--eval-split", "none",
                                                     "--out", str(out)]),
                            cwd=Path(grpo.__file__).parent, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "stderr", "w"))
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr").read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does: torchrun passes it on to each rank
    proc.wait(timeout=120)
    done = len(metrics(out))
    assert 1 <= done < 50
    assert [p.name for p in harness.checkpoints.checkpoints(out)] == [f"checkpoint-{done}"] and not (out / "final").exists()
    assert (tmp_path / "stderr").read_text().count(f"stopped after step {done} of 50") == 1


@pytest.mark.slow
def test_torchrun_more_processes_than_images_is_refused_before_training(tiny, tmp_path):
    done = torchrun(FLAGS + ["--images-per-step", "150", "--out", str(tmp_path / "run")])
    assert done.returncode != 0
    assert "2 processes x --images-per-step 150 = 300 images per step, but training set 'synthetic' has only 297" \
        in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
