"""grpo.py: the GRPO maths against hand-worked numbers, the update, and the loop end to end."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import grpo
import oracles
import preresq
from support.cli import InputError
import harness.config


def test_group_advantages_hand_worked():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    # group: mean 2, unbiased std 1 -> (r - 2) / (1 + 1e-4); a constant group has no signal
    expected = torch.tensor([[-1 / 1.0001, 0.0, 1 / 1.0001], [0.0, 0.0, 0.0]])
    assert torch.allclose(grpo.group_advantages(r, "group"), expected, atol=1e-7)
    # batch: the unbiased std of all six rewards is sqrt(5.375 / 5) = 1.036822
    s = math.sqrt(5.375 / 5) + 1e-4
    assert torch.allclose(grpo.group_advantages(r, "batch"), torch.tensor([[-1 / s, 0, 1 / s], [0, 0, 0]]), atol=1e-6)
    assert torch.allclose(grpo.group_advantages(r, "none"), torch.tensor([[-1.0, 0, 1], [0, 0, 0]]))
    assert torch.equal(grpo.group_advantages(torch.tensor([[2.0], [3.0]])), torch.zeros(2, 1))  # G = 1


def test_kl_k3_hand_worked():
    logp = torch.log(torch.tensor([[0.5, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.3]]))
    # d = ln(0.25 / 0.5) = -ln 2: exp(d) - d - 1 = 0.5 + ln 2 - 1 = 0.193147; equal log-probs: 0
    assert torch.allclose(grpo.kl_k3(logp, ref), torch.tensor([[0.5 + math.log(2) - 1, 0.0]]), atol=1e-6)


def test_aggregations_hand_worked():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert grpo.aggregate(x, m, "grpo").item() == pytest.approx((1.5 + 5.0) / 2)  # 3.25
    assert grpo.aggregate(x, m, "dapo").item() == pytest.approx(18 / 5)
    assert grpo.aggregate(x, m, "dr_grpo", max_len=4).item() == pytest.approx(18 / 8)
    # micro-batches add up to the full-batch loss when given the batch totals
    for kind in ("grpo", "dapo", "dr_grpo"):
        whole = grpo.aggregate(x, m, kind, max_len=4)
        parts = sum(grpo.aggregate(x[i:i + 1], m[i:i + 1], kind, max_len=4, num_sequences=2, num_tokens=5.0)
                    for i in range(2))
        assert parts.item() == pytest.approx(whole.item())


def test_clipped_surrogate_hand_worked():
    old = torch.zeros(3, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5]]))
    adv = torch.tensor([2.0, -2.0, -2.0])
    loss, clipped = grpo.clipped_surrogate(logp, old, adv, 0.2)
    # ratio 1.5, A=2: min(3, 2.4) = 2.4 (clipped); A=-2: min(-3, -2.4) = -3; ratio 0.5, A=-2: min(-1, -1.6) = -1.6 (clipped)
    assert torch.allclose(loss, torch.tensor([[-2.4], [3.0], [1.6]]))
    assert clipped.flatten().tolist() == [True, False, True]


def test_on_policy_ratio_is_one_and_never_clips_but_has_gradient():
    logp = torch.log(torch.tensor([[0.2, 0.5], [0.9, 0.4]])).requires_grad_()
    adv = torch.tensor([1.0, -0.5])
    mask = torch.ones(2, 2)
    loss, stats = grpo.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, epsilon=0.2)
    loss.backward()
    assert stats["clip_fraction"] == 0.0
    assert loss.item() == pytest.approx(-(1.0 - 0.5) / 2)  # -mean_i A_i: reads ~0 for normalised advantages
    # d loss / d logp = -A_i / (tokens_i * sequences) = -A_i / 4
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25], [0.125, 0.125]]))


def test_kl_term_enters_with_beta():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, stats = grpo.grpo_loss(logp, logp, ref, torch.tensor([0.0]), torch.ones(1, 1), beta=0.04, epsilon=0.2)
    assert loss.item() == pytest.approx(0.04 * (0.5 + math.log(2) - 1), rel=1e-5)
    assert stats["kl"] == pytest.approx(0.5 + math.log(2) - 1, rel=1e-5)


def test_reasoning_tokens_take_their_own_kl_coefficient():
    # token KLs 0.193147 (ln 2 apart) and 0 / 0.193147; the first token is reasoning, weighted 1.0,
    # the others beta = 0.1: row 1 (0.193147 * 1.0 + 0) / 2, row 2 (0 + 0.193147 * 0.1) / 2, mean of rows
    logp = torch.log(torch.tensor([[0.5, 0.3], [0.3, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.3], [0.3, 0.25]]))
    k = 0.5 + math.log(2) - 1
    reasoning = torch.tensor([[True, False], [True, False]])
    loss, _ = grpo.grpo_loss(logp, logp, ref, torch.zeros(2), torch.ones(2, 2), beta=0.1, epsilon=0.2,
                             reasoning=reasoning, reasoning_beta=1.0)
    assert loss.item() == pytest.approx((k / 2 + 0.1 * k / 2) / 2, rel=1e-5)
    # without a mask, or without a reasoning coefficient, every token takes beta
    for kw in ({}, {"reasoning": reasoning}):
        loss, _ = grpo.grpo_loss(logp, logp, ref, torch.zeros(2), torch.ones(2, 2), beta=0.1, epsilon=0.2, **kw)
        assert loss.item() == pytest.approx(0.1 * k / 2, rel=1e-5)


def test_reasoning_mask_covers_think_only(blank):
    _, tok, _ = blank
    end = tok.convert_tokens_to_ids(preresq.END_OF_TURN)
    texts = ["<think>I see severe blur.</think>\n<answer>2.10\n2.00</answer>", "3.0 with no reasoning", "<think>cut off"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    width = max(map(len, ids))
    comp = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])
    mask = preresq.reasoning_mask(tok, comp, preresq.completion_mask(comp, end))
    first = tok.decode(comp[0][mask[0]])
    assert first.startswith("<think>I see severe blur.</think>") and "<answer>" not in first
    assert mask[0, :int(mask[0].sum())].all()  # a prefix
    assert not mask[1].any() and not mask[2].any()  # nothing closes: no reasoning tokens


def update_inputs(blank, g=3):
    model, tok, ip = blank
    rng = np.random.default_rng(0)
    imgs = [[Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))] for h, w in ((56, 84), (84, 56))]
    prompts = preresq.encode_prompts(tok, ip, imgs, [preresq.IMAGE_PROMPT] * 2)
    comp = torch.randint(0, 300, (2 * g, 7))
    attn = torch.ones_like(comp)
    attn[1, 4:] = 0
    adv = torch.randn(2 * g)
    return model, tok, prompts, comp, attn, adv


def rollout(prompts, comp, attn, g):
    return grpo.Rollout(prompts, preresq.Answers(comp, attn, [], g), torch.zeros(0), [], g, False)


def policy_loss(model, tok, rollout, adv, old, cfg):
    """grpo.policy_loss on this process's whole batch (its own totals)."""
    policy = preresq.Policy(model, tok, None)
    mask = rollout.answers.mask
    return grpo.policy_loss(policy, rollout, adv, old, None, cfg, len(mask), mask.sum().item())


def config(**kw):
    cfg = harness.config.run_config(grpo.Settings)(model="tiny").resolve()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_give_the_full_batch_gradient_of_the_joined_forward(blank, loss_type):
    """policy_loss (each prompt once, answers micro-batch by micro-batch) = one backward of the loss
    over the whole batch computed the unshared way (each row's prompt + answer, pictures and all)."""
    model, tok, prompts, comp, attn, adv = update_inputs(blank)
    sup = preresq.suppressed_ids(tok)
    cfg = config(loss_type=loss_type)
    model.zero_grad()
    logp = oracles.joined_logprobs(model, prompts, comp, attn, temperature=cfg.temperature, num_generations=3,
                                   suppressed=sup)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, attn, beta=cfg.beta, epsilon=cfg.epsilon,
                             loss_type=loss_type, max_len=cfg.max_new_tokens)
    loss.backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    for micro in (None, 2, 4):
        model.zero_grad()
        policy_loss(model, tok, rollout(prompts, comp, attn, 3), adv, None,
                    config(micro_batch_size=micro, loss_type=loss_type))
        got = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert torch.allclose(got, expected, atol=1e-6), micro
    model.zero_grad()


def test_clipping_acts_only_when_updating_several_times(blank):
    model, tok, prompts, comp, attn, adv = update_inputs(blank)
    cfg = config(lr=1e-2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    old = grpo.frozen_logprobs(preresq.Policy(model, tok, None), rollout(prompts, comp, attn, 3), cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr * 50)
    fractions = []
    for _ in range(2):
        opt.zero_grad()
        stats = policy_loss(model, tok, rollout(prompts, comp, attn, 3), adv, old, cfg)
        fractions.append(stats["clip_fraction"])
        opt.step()
    model.load_state_dict(state)
    assert fractions[0] == 0.0  # the first update is on-policy: ratio 1
    assert fractions[1] > 0.0  # after one step the ratio left [1 - eps, 1 + eps] somewhere


def test_toy_reward_rises(blank):
    """GRPO with a reward for starting the answer with an even token id raises that reward."""
    import copy

    model, tok, ip = blank
    model = copy.deepcopy(model)
    cfg = config(lr=1e-2, max_new_tokens=4)
    end = tok.convert_tokens_to_ids(preresq.END_OF_TURN)
    rng = np.random.default_rng(1)
    imgs = [[Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))] for _ in range(2)]
    prompts = preresq.encode_prompts(tok, ip, imgs, [preresq.IMAGE_PROMPT] * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    torch.manual_seed(0)
    history = []
    for _ in range(30):
        comp = preresq.sample_completions(model, tok, prompts, 8, max_new_tokens=4)
        reward = (comp[:, 0] % 2 == 0).float().reshape(2, 8)
        history.append(reward.mean().item())
        adv = grpo.group_advantages(reward).reshape(-1)
        opt.zero_grad()
        policy_loss(model, tok, rollout(prompts, comp, preresq.completion_mask(comp, end), 8), adv, None, cfg)
        opt.step()
    assert np.mean(history[:5]) < 0.7
    assert np.mean(history[-5:]) > 0.9


SMALL_RUN = ["--model", "tiny", "--device", "cpu", "--images-per-step", "2", "--num-generations", "3",
             "--max-new-tokens", "64", "--workers", "1"]
METRIC_KEYS = {"step", "stage", "reward", "reward_std", "zero_std_groups", "parse_failure_rate", "kl",
               "clip_fraction", "completion_length", "grad_norm", "lr", "seconds", "tokens_per_second",
               "reward/format", "reward/pair_fidelity", "reward/triplet_accuracy", "reward/group_rank",
               "reward/aspect_spread_penalty", "reward/triplet_balance", "batch_srcc"}


@pytest.mark.slow
def test_three_steps_train_log_and_leave_a_checkpoint_that_loads_and_generates(tiny, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    assert grpo.main(SMALL_RUN + ["--steps", "3", "--save-every", "2", "--eval-every", "3", "--eval-size", "4",
                                  "--out", str(out)]) == 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert METRIC_KEYS <= set(lines[0])
    evals = [json.loads(l) for l in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and all({"srcc", "plcc", "parse_failures"} <= set(e) for e in evals)
    assert (out / "curves.png").exists()
    before = tiny[0].state_dict()
    model = AutoModelForImageTextToText.from_pretrained(out / "checkpoint-2")
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    _, tok, ip = preresq.load_model(str(out / "final"), "cpu")
    final = AutoModelForImageTextToText.from_pretrained(out / "final")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (84, 84, 3), dtype=np.uint8))
    batch = preresq.encode_prompts(tok, ip, [[img]], [preresq.IMAGE_PROMPT])
    comp = preresq.sample_completions(final, tok, batch, 2, max_new_tokens=16)
    assert comp.shape[0] == 2 and comp.shape[1] >= 1


@pytest.mark.slow
def test_a_few_steps_on_synthetic_video(tiny, tmp_path):
    out = tmp_path / "video"
    assert grpo.main(SMALL_RUN + ["--data", "synthetic-video", "--steps", "2", "--eval-size", "2",
                                  "--eval-every", "2", "--out", str(out)]) == 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(l.get("skipped_items", 0) == 0 for l in lines)
    # the video variant of the reward: no within-group rank term in the total, but it is still logged
    assert "reward/group_rank" in lines[0]
    evals = [json.loads(l) for l in (out / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == 2 and evals[-1]["n"] + evals[-1]["parse_failures"] == 2


def test_exploration_to_stability_schedule():
    cfg = config(schedule="explore-stable", stage1_steps=3, stage1_generations=12, stage2_generations=6)
    stages = [grpo.explore_stable(cfg, s) for s in range(5)]
    assert [s.number for s in stages] == [1, 1, 1, 2, 2]
    assert [s.num_generations for s in stages] == [12, 12, 12, 6, 6]
    assert [s.spread_penalty for s in stages] == [True, True, True, False, False]
    stage1 = grpo.step_prompts(stages[0], cfg.seed, 0, 50, video=False)
    assert set(stage1) <= set(preresq.IMAGE_PROMPT_POOL) and len(set(stage1)) > 1
    assert grpo.step_prompts(stages[0], cfg.seed, 0, 50, video=False) == stage1  # seeded by step
    assert set(grpo.step_prompts(stages[4], cfg.seed, 7, 10, video=False)) == {preresq.IMAGE_PROMPT}
    single = grpo.explore_stable(config(schedule="single"), 0)
    assert (single.number, single.num_generations, single.spread_penalty) == (2, config().num_generations, True)
    assert single.prompts == (preresq.IMAGE_PROMPT,)


def test_the_paper_schedule_is_the_default_with_twice_g_in_stage_one(blank_dir):
    """Exploration-to-Stability is the default for images (the paper's 12 -> 6 from G = 6); the
    authors' video recipe keeps one stage; an explicit G1 / G2 wins."""
    for flags, g in ((["--model", str(blank_dir)], 6), ([], 6), (["--num-generations", "4"], 4)):
        cfg, _, _ = harness.config.parse_args(grpo.Settings, flags)
        assert (cfg.schedule, cfg.stage1_generations, cfg.stage2_generations) == ("explore-stable", 2 * g, g)
    cfg, _, _ = harness.config.parse_args(grpo.Settings, ["--num-generations", "4", "--stage1-generations", "5", "--stage2-generations", "3"])
    assert (cfg.stage1_generations, cfg.stage2_generations) == (5, 3)
    video, _, _ = harness.config.parse_args(grpo.Settings, ["--model", str(blank_dir), "--data", "synthetic-video"])
    assert video.schedule == "single" and video.num_generations == 5
    with pytest.raises(InputError):
        harness.config.parse_args(grpo.Settings, ["--stage1-generations", "1"])


def stage_rewards(cfg, texts, mos, g, step):
    import rewards

    scores, valid, fmt = rewards.parse_completions(texts, 5, g)
    return grpo.reward_terms(cfg, grpo.explore_stable(cfg, step), scores, mos, valid, fmt, video=False)


def test_stage_two_drops_the_spread_penalty():
    cfg = config(schedule="explore-stable", stage1_steps=3)
    texts = ["<think>x</think><answer>3\n3\n3\n3\n3</answer>"] * 3  # all aspects equal: maximal penalty
    mos = torch.tensor([3.0])
    stage1 = stage_rewards(cfg, texts, mos, 3, 0)
    stage2 = stage_rewards(cfg, texts, mos, 3, 3)
    assert torch.allclose(stage1["aspect_spread_penalty"], torch.full((1, 3), 0.25))
    assert torch.allclose(stage2["total"] - stage1["total"], torch.full((1, 3), 0.25 / 3))


def test_impossible_flags_fail_before_any_model_loads(capsys):
    for flags in (["--num-generations", "0"], ["--reward", "threshold", "--no-response-branch"],
                  ["--temperature", "0"], ["--no-response-branch", "--no-preference-branch"]):
        with pytest.raises(InputError):
            harness.config.parse_args(grpo.Settings, flags)


def test_reference_logprobs_come_back_to_the_policy_device(blank):
    model, tok, prompts, comp, attn, adv = update_inputs(blank)
    cfg = config(micro_batch_size=4)
    lp = grpo.frozen_logprobs(preresq.Policy(model, tok, None), rollout(prompts, comp, attn, 3), cfg)
    assert lp.shape == comp.shape and lp.device == comp.device and torch.isfinite(lp).all()


def test_exploration_lasts_half_of_a_run_set_by_epochs(blank_dir):
    """A real checkpoint trains for --epochs (the paper's 8), so the step count is known only once the
    data are: stage 1 must be half of that count, not half of an unset --steps (which gave 0 steps)."""
    cfg, _, _ = harness.config.parse_args(grpo.Settings, ["--model", str(blank_dir), "--schedule", "explore-stable"])
    assert cfg.steps is None and cfg.epochs == 8
    cfg.set_length(num_images=297)  # ceil(8 * 297 / 8)
    assert cfg.steps == 297 and cfg.stage1_steps == 148
    assert [grpo.explore_stable(cfg, s).number for s in (0, 147, 148, 296)] == [1, 1, 2, 2]
    assert grpo.explore_stable(cfg, 0).num_generations == 12
    # two processes halve the steps, and stage 1 with them; an explicit --stage1-steps is kept
    cfg, _, _ = harness.config.parse_args(grpo.Settings, ["--model", str(blank_dir), "--schedule", "explore-stable"])
    cfg.set_length(297, world=2)
    assert cfg.steps == 149 and cfg.stage1_steps == 74
    cfg, _, _ = harness.config.parse_args(grpo.Settings, ["--model", str(blank_dir), "--schedule", "explore-stable", "--stage1-steps", "5"])
    cfg.set_length(297)
    assert cfg.steps == 297 and cfg.stage1_steps == 5


def test_a_video_run_of_a_real_checkpoint_gets_the_authors_video_recipe(blank_dir):
    """The authors train video (LSVQ) with 5 videos per device, G = 5, 2 epochs and gradient
    checkpointing; image runs keep the paper's image defaults; explicit flags always win."""
    video, _, _ = harness.config.parse_args(grpo.Settings, ["--model", str(blank_dir), "--data", "lsvq", "--data-root", "/x"])
    assert (video.images_per_step, video.num_generations, video.epochs, video.gradient_checkpointing) == (5, 5, 2, True)
    image, _, _ = harness.config.parse_args(grpo.Settings, ["--model", str(blank_dir), "--data", "koniq", "--data-root", "/x"])
    assert (image.images_per_step, image.num_generations, image.epochs, image.gradient_checkpointing) == (8, 6, 8, False)
    mixed, _, _ = harness.config.parse_args(grpo.Settings, ["--model", str(blank_dir), "--data", "lsvq,koniq", "--data-root", "/x,/y"])
    assert mixed.num_generations == 6  # not every set is a video set: the image recipe
    mine, _, _ = harness.config.parse_args(grpo.Settings, ["--model", str(blank_dir), "--data", "lsvq", "--num-generations", "7",
                                  "--no-gradient-checkpointing"])
    assert mine.num_generations == 7 and mine.gradient_checkpointing is False and mine.images_per_step == 5
    assert "paper video: 5" in harness.config.build_parser(grpo.Settings).format_help()
