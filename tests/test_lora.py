"""lora.py and grpo.py --lora-rank: adapters that start as the identity, a reference that is the policy
with its adapters off, only adapters trained, a merged final/ that loads as a plain model, exact resume."""
import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer

import model_shapes
import grpo
from harness import lora
import preresq
from support.cli import InputError
import harness.checkpoints
import harness.config
import harness.logs

G = 3
# The laptop preset's tokenizer, which every model of these tests shares (the sampler's suppressed ids).
TOKENIZER = AutoTokenizer.from_pretrained(Path(__file__).resolve().parent.parent / "models" / "tiny")
SUPPRESSED = preresq.suppressed_ids(TOKENIZER)


@pytest.fixture()
def inputs(blank):
    """Two prompts (different picture sizes), G = 3 completions each, one cut short; random advantages."""
    model, tok, ip = blank
    rng = np.random.default_rng(0)
    pictures = [[Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))] for h, w in ((56, 84), (84, 56))]
    prompts = preresq.encode_prompts(tok, ip, pictures, [preresq.IMAGE_PROMPT] * 2)
    gen = torch.Generator().manual_seed(0)
    comp = torch.randint(0, 300, (2 * G, 7), generator=gen)
    mask = torch.ones_like(comp)
    mask[1, 4:] = 0
    rollout = grpo.Rollout(prompts, preresq.Answers(comp, mask, [], G), torch.zeros(2), [], G, False)
    return rollout, torch.randn(2 * G, generator=gen)


def policy_loss(model, rollout, advantages, cfg):
    """grpo.policy_loss on the whole batch (its own totals); the model's tokenizer plays no part."""
    policy = preresq.Policy(model, TOKENIZER, None)
    mask = rollout.answers.mask
    return grpo.policy_loss(policy, rollout, advantages, None, None, cfg, len(mask), mask.sum().item())


def with_adapters(model, rank=4, targets="language", **kw):
    model = copy.deepcopy(model)
    lora.add_adapters(model, rank, targets=targets, seed=0, **kw)
    return model


def logprobs(model, rollout):
    with torch.no_grad():
        return preresq.completion_logprobs(model, preresq.cache_prompts(model, rollout.prompts), rollout.answers.ids,
                                           rollout.answers.mask, temperature=1.0,
                                           num_generations=rollout.num_generations, suppressed=SUPPRESSED)


def config(**kw):
    cfg = harness.config.run_config(grpo.Settings)(model="tiny", lora_rank=4).resolve()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def train(model, rollout, advantages, cfg, steps=3):
    """A few GRPO updates (grpo.update: the reference pass with adapters off, AdamW on the adapters)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    cfg.lr, cfg.steps = 5e-2, 1  # optimizer_step sets the learning rate of step 0: 5e-2
    policy, reference = preresq.Policy(model, TOKENIZER, None), lora.AdaptersOff(model, TOKENIZER, None)
    scored = SimpleNamespace(advantages=advantages, tokens=rollout.answers.mask.sum().item(), sequences=len(advantages))
    records = [grpo.update(policy, reference, [(rollout, scored)], cfg, optimizer, step=0) for _ in range(steps)]
    return optimizer, records


def test_adapters_start_as_the_identity(blank, inputs):
    rollout, _ = inputs
    base = logprobs(blank[0], rollout)
    model = with_adapters(blank[0], targets="language,vision,merger")
    assert all(torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in lora.layers(model))
    assert torch.equal(logprobs(model, rollout), base)
    assert all(torch.equal(v, blank[0].state_dict()[k]) for k, v in lora.merged_weights(model).items())
    # the A matrices are drawn from the seed alone: the global random stream is left as it was
    state = torch.random.get_rng_state()
    again = with_adapters(blank[0], targets="language,vision,merger")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a.lora_A, b.lora_A) for a, b in zip(lora.layers(model), lora.layers(again)))


def test_targets_wrap_the_named_projections():
    model = model_shapes.qwen_model("qwen2.5-vl-7b", "meta")
    names = lora.add_adapters(model, 16)
    layer = "model.language_model.layers.0."
    assert names[:7] == [layer + n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert len(names) == 7 * 28
    # the paper's model: r (in + out) per projection; 40.4 M trained numbers instead of 8.29 B
    text = model.config.text_config
    h, i, kv = text.hidden_size, text.intermediate_size, text.num_key_value_heads * 128
    per_layer = 16 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == 28 * per_layer == 40_370_176
    assert lora.targeted("model.visual.blocks.3.attn.qkv", "vision")
    assert lora.targeted("model.visual.merger.mlp.0", "merger") and not lora.targeted("lm_head", "language")


def test_only_adapters_get_gradients_and_optimizer_state(blank, inputs):
    rollout, advantages = inputs
    model = with_adapters(blank[0])
    optimizer, records = train(model, rollout, advantages, config())
    adapters = lora.adapter_weights(model)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(adapters)
    assert len(optimizer.state) == len(adapters) and all(p in optimizer.state for p in adapters.values())
    assert all(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in lora.layers(model))
    before = blank[0].state_dict()
    for k, v in model.state_dict().items():  # the frozen weights did not move
        if k in before:
            assert torch.equal(v, before[k]), k
    # the reference is the policy with its adapters off: no KL at the first step, some after it
    assert records[0]["kl"] == 0.0 and records[-1]["kl"] > 0


def test_adapters_off_give_the_base_model_after_training(blank, inputs):
    rollout, advantages = inputs
    model = with_adapters(blank[0], targets="language,vision,merger")
    train(model, rollout, advantages, config(lora_targets="language,vision,merger"))
    base = logprobs(blank[0], rollout)
    assert not torch.allclose(logprobs(model, rollout), base, atol=1e-3)
    with lora.adapters_off(model):
        assert torch.equal(logprobs(model, rollout), base)
    assert not torch.allclose(logprobs(model, rollout), base, atol=1e-3)  # back on after the block


def test_micro_batches_and_checkpointing_give_the_full_batch_gradient(blank, inputs):
    """Adapters in the vision tower too, so that the prompt's one backward reaches them."""
    rollout, advantages = inputs
    model = with_adapters(blank[0], targets="language,vision,merger")
    for m in lora.layers(model):
        torch.nn.init.normal_(m.lora_B, std=0.02)  # B = 0 would leave A without a gradient
    grads = []
    for micro, checkpointing in ((None, False), (2, True), (4, False)):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        policy_loss(model, rollout, advantages, config(micro_batch_size=micro))
        grads.append(torch.cat([p.grad.flatten() for p in lora.adapter_weights(model).values()]))
    assert grads[0].abs().max() > 1e-4 and all(g.isfinite().all() for g in grads)
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-6)
    # the vision adapters learned something through the prompt's backward
    assert any(p.grad.abs().max() > 0 for n, p in lora.adapter_weights(model).items() if ".visual." in n)


def test_a_bf16_model_keeps_float32_adapters_and_merges_into_bf16(blank_dir, inputs):
    rollout, advantages = inputs
    model = preresq.load_model(str(blank_dir), "cpu", "bfloat16")[0]
    lora.add_adapters(model, 4)
    policy_loss(model, rollout, advantages, config())
    adapters = lora.adapter_weights(model)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in adapters.values())
    assert any(p.grad.abs().max() > 0 for p in adapters.values())
    merged = lora.merged_weights(model)
    assert merged["model.language_model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16


def test_merged_folder_loads_as_a_plain_model_with_the_adapter_log_probs(blank, blank_dir, inputs, tmp_path):
    rollout, advantages = inputs
    model = with_adapters(blank[0])
    train(model, rollout, advantages, config())
    harness.checkpoints.save_folder(tmp_path / "final", model, blank[1], blank[2], weights=lora.merged_weights(model))
    assert {"model.safetensors", lora.ADAPTER_FILE, "config.json"} <= {p.name for p in (tmp_path / "final").iterdir()}
    merged = preresq.load_model(str(tmp_path / "final"), "cpu")[0]
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    assert (logprobs(merged, rollout) - logprobs(model, rollout)).abs().max() <= 1e-5
    # the adapter file alone, on the base model, is the trained policy again
    again = with_adapters(preresq.load_model(str(blank_dir), "cpu")[0])
    lora.load_adapters(again, tmp_path / "final" / lora.ADAPTER_FILE)
    assert torch.equal(logprobs(again, rollout), logprobs(model, rollout))
    with pytest.raises(ValueError, match="do not fit"):
        lora.load_adapters(with_adapters(blank[0], rank=2), tmp_path / "final" / lora.ADAPTER_FILE)


def test_lora_flags_that_cannot_work_are_refused():
    for flags, message in ((["--lora-rank", "0"], "at least 1"), (["--lora-rank", "4", "--lora-targets", "lm_head"],
                           "unknown lm_head"), (["--lora-rank", "4", "--fsdp"], "--fsdp with --lora-rank"),
                           (["--lora-rank", "4", "--reference-device", "cpu"], "no reference copy")):
        with pytest.raises(InputError, match=message):
            harness.config.parse_args(grpo.Settings, flags)
    assert harness.config.parse_args(grpo.Settings, ["--reference-device", "cpu"])[0].lora_rank is None  # full fine-tuning keeps it


# --------------------------------------------------------------------------- grpo.py --lora-rank end to end

FLAGS = ["--model", "tiny", "--device", "cpu", "--images-per-step", "2", "--num-generations", "2",
         "--max-new-tokens", "64", "--eval-split", "none", "--workers", "1", "--lora-rank", "8", "--lr", "2e-3"]
STRAIGHT = FLAGS + ["--steps", "4", "--save-every", "2"]


def metrics(out: Path) -> list[str]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.dumps({k: v for k, v in json.loads(l).items() if not k.endswith(("seconds", "per_second"))},
                       sort_keys=True) for l in lines]


def same_files(a: Path, b: Path, name: str) -> None:
    wa, wb = load_file(a / name), load_file(b / name)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert grpo.main(STRAIGHT + ["--out", str(out)]) == 0
    return out


def test_a_lora_run_checkpoints_adapters_and_ends_with_a_merged_model(straight, tiny):
    ckpt = straight / "checkpoint-2"
    assert {p.name for p in ckpt.iterdir()} >= {lora.ADAPTER_FILE, harness.checkpoints.CHECKPOINT_STATE}
    assert not (ckpt / "model.safetensors").exists()  # the frozen weights are --model's
    state = torch.load(ckpt / harness.checkpoints.CHECKPOINT_STATE, weights_only=False)
    assert len(state["optimizer"]["state"]) == len(load_file(ckpt / lora.ADAPTER_FILE))  # adapters only
    log = [json.loads(l) for l in metrics(straight)]
    assert log[0]["kl"] == 0.0 and log[-1]["kl"] > 0  # against the policy with its adapters off
    # final/: the merged model (from_pretrained) and, beside its weights, the adapters
    merged = preresq.load_model(str(straight / "final"), "cpu")[0]
    policy = copy.deepcopy(tiny[0])
    lora.add_adapters(policy, 8, seed=42)
    lora.load_adapters(policy, straight / "final" / lora.ADAPTER_FILE)
    tok, ip = tiny[1], tiny[2]
    picture = [[Image.fromarray(np.random.default_rng(1).integers(0, 255, (84, 84, 3), dtype=np.uint8))]]
    prompts = preresq.encode_prompts(tok, ip, picture, [preresq.IMAGE_PROMPT])
    comp = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    rollout = grpo.Rollout(prompts, preresq.Answers(comp, torch.ones_like(comp), [], 2), torch.zeros(1), [], 2, False)
    lp = [logprobs(m, rollout) for m in (merged, policy, tiny[0])]
    # merged W + s BA against W x + s B(A x): float32 rounding only (measured 1.1e-5 at |log p| ~ 15,
    # a few ulps), while the trained adapters moved the log-probs from the base model's by 0.39
    assert (lp[0] - lp[1]).abs().max() <= 5e-5 and (lp[1] - lp[2]).abs().max() > 1e-2


def test_lora_crash_then_resume_equals_the_straight_run(straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    log_json = harness.logs.log_json

    class Killed(Exception):
        pass

    def log_then_die(path, record):
        log_json(path, record)
        if path.name == "metrics.jsonl" and record["step"] == 3:
            raise Killed

    monkeypatch.setattr(harness.logs, "log_json", log_then_die)
    with pytest.raises(Killed):
        grpo.main(STRAIGHT + ["--out", str(out)])
    monkeypatch.undo()
    assert [p.name for p in harness.checkpoints.checkpoints(out)] == ["checkpoint-2"]
    assert grpo.main(["--out", str(out), "--resume"]) == 0
    assert metrics(out) == metrics(straight)
    same_files(out / "final", straight / "final", lora.ADAPTER_FILE)
    same_files(out / "final", straight / "final", "model.safetensors")


def test_resuming_with_other_lora_flags_says_which(straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    assert grpo.main(["--out", str(out), "--resume", "--force", "--lora-rank", "4", "--steps", "5"]) == 2
    message = capsys.readouterr().err
    assert "holds no adapters that fit --lora-rank 4" in message and "Traceback" not in message
