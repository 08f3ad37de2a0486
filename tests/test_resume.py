"""grpo.py checkpoints and resume: nothing is lost to a crash, a kill or Ctrl-C.

The reference for every resumed run is the same run done straight through: final weights must be
bitwise equal (torch.equal) and every metrics.jsonl field equal except wall-clock timings.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import grpo
import preresq
from harness import presets
import harness.checkpoints
import harness.config
import harness.logs

# The `tiny` preset, small batches, short answers, no held-out evaluation: about a second a step.
FLAGS = ["--model", "tiny", "--device", "cpu", "--images-per-step", "2", "--num-generations", "2",
         "--max-new-tokens", "64", "--eval-split", "none", "--workers", "1"]
STRAIGHT = FLAGS + ["--steps", "4", "--save-every", "2", "--log-rollouts", "1"]


def weights(folder: Path) -> dict:
    found = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        found.update(load_file(f))
    assert found, f"no weights in {folder}"
    return found


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def metrics(out: Path) -> list[str]:
    """metrics.jsonl without wall-clock fields, one canonical JSON text per step (NaN == NaN)."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.dumps({k: v for k, v in json.loads(l).items() if not k.endswith(("seconds", "per_second"))},
                       sort_keys=True) for l in lines]


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """4 steps in one go (checkpoint at step 2): the run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert grpo.main(STRAIGHT + ["--out", str(out)]) == 0
    return out


def test_straight_run_learns_and_writes_a_complete_checkpoint(straight, tiny):
    # the weights moved (so equal weights below mean something) and the steps differ from each other
    initial = weights(presets.model_path("tiny"))
    final = weights(straight / "final")
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    assert len(set(metrics(straight))) == 4
    # checkpoint-2: a Hugging Face folder + the trainer state; no checkpoint at the last step (final/ is it)
    assert [p.name for p in harness.checkpoints.checkpoints(straight)] == ["checkpoint-2"]
    ckpt = straight / "checkpoint-2"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json",
            harness.checkpoints.CHECKPOINT_STATE} <= {p.name for p in ckpt.iterdir()}
    assert not list(straight.glob(".checkpoint-*"))
    state = torch.load(ckpt / harness.checkpoints.CHECKPOINT_STATE, weights_only=False)
    assert state["step"] == 2 and state["stage"] == 2
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["optimizer"]["state"] and state["optimizer"]["state"][0]["step"] == 2  # two AdamW steps
    assert state["data"]["next_step"] == 2 and state["data"]["items"] == len(data.synthetic_dataset())
    assert state["counters"] == {"skipped_items": 0, "nonfinite_steps": 0}
    cfg = harness.config.parse_args(grpo.Settings, STRAIGHT + ["--out", str(straight)])[0]
    assert state["config"] == {**asdict(cfg), "out": str(straight)}
    # the folder loads as an ordinary model
    model = preresq.load_model(str(ckpt), "cpu")[0]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny[0].parameters())


def test_crash_then_resume_equals_the_straight_run(straight, tmp_path, monkeypatch):
    """Killed after step 3 was logged (checkpoint-2 is the newest); `--out DIR --resume` alone finishes it."""
    out = tmp_path / "run"
    log_json = harness.logs.log_json

    class Killed(Exception):
        pass

    def log_then_die(path, record):
        log_json(path, record)
        if path.name == "metrics.jsonl" and record["step"] == 3:
            with open(path, "a") as f:
                f.write('{"step": 4, "rew')  # a line torn by the kill
            raise Killed

    monkeypatch.setattr(harness.logs, "log_json", log_then_die)
    with pytest.raises(Killed):
        grpo.main(STRAIGHT + ["--out", str(out)])
    monkeypatch.undo()
    assert [p.name for p in harness.checkpoints.checkpoints(out)] == ["checkpoint-2"] and not (out / "final").exists()

    assert grpo.main(["--out", str(out), "--resume"]) == 0  # every other flag from the checkpoint
    assert_same_weights(out / "final", straight / "final")
    assert metrics(out) == metrics(straight)
    # every answer of every step, its terms and advantage: one line a step, the same texts and numbers
    logged = (straight / "rollouts.jsonl").read_text()
    assert [json.loads(l)["step"] for l in logged.splitlines()] == [1, 2, 3, 4]
    assert (out / "rollouts.jsonl").read_text() == logged


def test_resume_reloads_the_reference_model_and_crosses_the_stage_boundary(tmp_path, monkeypatch):
    """KL against the initial model (reloaded from --model on resume), mu = 2, and explore-stable
    switching from stage 1 (G = 3, prompt pool) to stage 2 (G = 2) exactly at the resumed step."""
    run = FLAGS + ["--beta", "0.04", "--num-iterations", "2", "--schedule", "explore-stable", "--stage1-steps", "1",
                   "--stage1-generations", "3", "--stage2-generations", "2", "--steps", "2", "--save-every", "1"]
    assert grpo.main(run + ["--out", str(tmp_path / "straight")]) == 0
    save = harness.checkpoints.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the checkpoint

    monkeypatch.setattr(harness.checkpoints, "save_checkpoint", save_then_die)
    assert grpo.main(run + ["--out", str(tmp_path / "run")]) == 130
    monkeypatch.undo()
    assert grpo.main(["--out", str(tmp_path / "run"), "--resume"]) == 0
    log = [json.loads(l) for l in metrics(tmp_path / "run")]
    assert [r["stage"] for r in log] == [1, 2] and log[1]["kl"] > 0  # the reference model mattered
    assert metrics(tmp_path / "run") == metrics(tmp_path / "straight")
    assert_same_weights(tmp_path / "run" / "final", tmp_path / "straight" / "final")


def test_same_seed_and_flags_give_the_same_metrics(straight, tmp_path):
    again = tmp_path / "again"
    assert grpo.main(STRAIGHT + ["--out", str(again)]) == 0
    assert metrics(again) == metrics(straight)
    assert_same_weights(again / "final", straight / "final")
    # ... and the comparison can fail: another seed draws other images and samples other answers
    other = tmp_path / "other"
    assert grpo.main(FLAGS + ["--seed", "43", "--steps", "1", "--out", str(other)]) == 0
    a, b = json.loads(metrics(other)[0]), json.loads(metrics(straight)[0])
    assert {k: a[k] for k in ("reward", "completion_length", "loss")} != {k: b[k] for k in ("reward", "completion_length", "loss")}


def refused(argv, capsys) -> str:
    """grpo.main must refuse (exit 2, no traceback); returns what it printed."""
    capsys.readouterr()  # what earlier runs of the test printed
    assert grpo.main(argv) == 2
    message = capsys.readouterr().err
    assert message.startswith("grpo.py: error: ") and "Traceback" not in message
    return message


def copy_run(straight: Path, dest: Path) -> Path:
    shutil.copytree(straight, dest)
    return dest


@pytest.mark.parametrize("flag, value", [("model", "small"), ("data", "synthetic-video"), ("lr", 0.5),
                                         ("num_generations", 4), ("reward", "fidelity")])
def test_resume_with_a_different_model_dataset_or_flag_names_the_difference(straight, tmp_path, flag, value, capsys):
    out = copy_run(straight, tmp_path / "run")
    before = (out / "metrics.jsonl").read_text()
    saved = json.loads((out / "config.json").read_text())[flag]
    name = "--" + flag.replace("_", "-")
    message = refused(["--out", str(out), "--resume", name, str(value)], capsys)
    assert f"{name}: checkpoint {saved!r}, now {value!r}" in message and "--force" in message
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched


def test_force_resumes_with_a_changed_flag(straight, tmp_path):
    out = copy_run(straight, tmp_path / "run")
    shutil.rmtree(out / "final")
    assert grpo.main(["--out", str(out), "--resume", "--force", "--lr", "0.002", "--steps", "3"]) == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 0.002
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3]
    assert lines[:2] == (straight / "metrics.jsonl").read_text().splitlines()[:2]  # kept as they were
    assert (out / "final" / "model.safetensors").exists()


def test_resume_on_changed_data_is_refused(tmp_path, capsys):
    root = tmp_path / "synthetic"
    run = FLAGS + ["--data-root", str(root), "--steps", "2", "--save-every", "1", "--out", str(tmp_path / "run")]
    assert grpo.main(run) == 0
    labels = root / "train.txt"
    lines = labels.read_text().splitlines()
    ref, dist, mos = lines[0].split()
    labels.write_text("\n".join([f"{ref} {dist} {float(mos) - 0.5}"] + lines[1:]) + "\n")
    message = refused(["--out", str(tmp_path / "run"), "--resume"], capsys)
    assert "training data differ" in message and "--force" in message
    assert grpo.main(["--out", str(tmp_path / "run"), "--resume", "--force"]) == 0


def test_data_fingerprint_sees_scores_files_and_order():
    a = data.Item("/x/a.png", 3.0, 3.0, "s")
    b = data.Item("/x/b.png", 4.0, 4.0, "s")
    base = harness.checkpoints.data_fingerprint({"s": [a, b]})
    assert harness.checkpoints.data_fingerprint({"s": [a, b]}) == base
    assert harness.checkpoints.data_fingerprint({"s": [a, data.Item("/x/b.png", 4.5, 4.5, "s")]}) != base
    assert harness.checkpoints.data_fingerprint({"s": [a, data.Item("/x/c.png", 4.0, 4.0, "s")]}) != base
    assert harness.checkpoints.data_fingerprint({"s": [b, a]}) != base
    assert harness.checkpoints.data_fingerprint({"s": [a, data.Item("/elsewhere/b.png", 4.0, 4.0, "s")]}) == base  # moved folder


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    """The one-line message alone, as every other refusal: no usage block before it."""
    message = refused(["--out", str(tmp_path), "--resume"], capsys)
    assert message == f"grpo.py: error: --resume: no complete checkpoint in {tmp_path}; start without --resume\n"
    assert refused(["--resume"], capsys) == "grpo.py: error: --resume needs --out DIR (the folder of the run to continue)\n"


def test_a_fresh_run_refuses_a_folder_with_checkpoints(straight, capsys):
    assert "--resume" in refused(STRAIGHT + ["--out", str(straight)], capsys)


def test_half_written_checkpoint_is_ignored(straight, tmp_path):
    out = copy_run(straight, tmp_path / "run")
    partial = out / "checkpoint-3"  # e.g. copied by hand without its trainer state
    shutil.copytree(out / "checkpoint-2", partial)
    (partial / harness.checkpoints.CHECKPOINT_STATE).unlink()
    (out / ".checkpoint-4-k2x9q1").mkdir()  # a save cut short
    assert [p.name for p in harness.checkpoints.checkpoints(out)] == ["checkpoint-2"]


def test_resume_and_a_new_save_remove_what_a_killed_save_left(straight, tmp_path, capsys, monkeypatch):
    """A kill during a save leaves atomic_folder's hidden temporary folder, as large as a checkpoint:
    --resume removes such folders, and so does every new save; nothing else hidden is touched."""
    out = copy_run(straight, tmp_path / "run")
    shutil.rmtree(out / "final")
    shutil.copytree(out / "checkpoint-2", out / ".checkpoint-3-k2x9q1ab")  # a save of step 3 cut short
    (out / ".final-0a_b2c3d").mkdir()
    others = {".checkpoint-3-notes": "a folder of mine", ".mine-k2x9q1ab": "mine too", ".checkpoint-4-abcdefgh": "a file"}
    for name, text in others.items():
        if name.endswith("h"):
            (out / name).write_text(text)
        else:
            (out / name).mkdir()
            (out / name / "notes.txt").write_text(text)
    assert grpo.main(["--out", str(out), "--resume"]) == 0
    assert f"removed {out / '.checkpoint-3-k2x9q1ab'}" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob(".*")) == sorted(others)
    assert all((out / name if name.endswith("h") else out / name / "notes.txt").read_text() == text
               for name, text in others.items())
    assert_same_weights(out / "final", straight / "final")
    # a new save, in a run that a killed save of another process left a partial folder in
    log_json = harness.logs.log_json

    def leave_a_partial_folder(path, record):
        log_json(path, record)
        if path.name == "metrics.jsonl" and record["step"] == 1:
            (path.parent / ".checkpoint-9-zzzzzzzz").mkdir()
    monkeypatch.setattr(harness.logs, "log_json", leave_a_partial_folder)
    assert grpo.main(FLAGS + ["--steps", "2", "--save-every", "1", "--out", str(tmp_path / "again")]) == 0
    assert not list((tmp_path / "again").glob(".checkpoint-*"))


def test_resume_with_fewer_steps_shortens_the_schedule_with_the_run(tmp_path, capsys, monkeypatch):
    """8 steps planned (stage 1: steps 1-4), stopped at checkpoint-2, resumed with --steps 4: stage 1 is
    half the new length (steps 1-2) and steps 3-4 train in stage 2, as the schedule line says."""
    save = harness.checkpoints.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt
    out = tmp_path / "run"
    monkeypatch.setattr(harness.checkpoints, "save_checkpoint", save_then_die)
    assert grpo.main(FLAGS + ["--steps", "8", "--save-every", "2", "--out", str(out)]) == 130
    monkeypatch.undo()
    assert "stage 1 (prompt pool, G 4) steps 1-4, stage 2 (fixed prompt, G 2) steps 5-8" in capsys.readouterr().out
    assert grpo.main(["--out", str(out), "--resume", "--steps", "4"]) == 0
    assert "stage 1 (prompt pool, G 4) steps 1-2, stage 2 (fixed prompt, G 2) steps 3-4" in capsys.readouterr().out
    assert [json.loads(l)["stage"] for l in metrics(out)] == [1, 1, 2, 2]
    assert json.loads((out / "config.json").read_text())["stage1_steps"] == 2
    # one step: stage 1 has none, and the line says so rather than "steps 1-0"
    assert grpo.main(FLAGS + ["--steps", "1", "--out", str(tmp_path / "one")]) == 0
    assert "stage 1 (prompt pool, G 4) no steps, stage 2 (fixed prompt, G 2) step 1" in capsys.readouterr().out


def test_steps_text_never_prints_an_empty_or_backwards_range():
    assert harness.logs.steps_text(1, 0) == "no steps" and harness.logs.steps_text(21, 9) == "no steps"
    assert harness.logs.steps_text(3, 3) == "step 3" and harness.logs.steps_text(1, 4) == "steps 1-4"


def cut(path: Path) -> None:
    """A copy cut short, as a full disk or a kill during a copy leaves it."""
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xff not what was saved " * 40)


@pytest.mark.parametrize("damage", [cut, garbage])
def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(straight, tmp_path, damage,
                                                                                       capsys):
    """checkpoint-3's training state damaged: the run says so, resumes from checkpoint-2 and ends with the
    straight run's weights and metrics."""
    out = copy_run(straight, tmp_path / "run")
    shutil.rmtree(out / "final")
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    damage(out / "checkpoint-3" / harness.checkpoints.CHECKPOINT_STATE)
    assert grpo.main(["--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"grpo.py: warning: damaged checkpoint {out / 'checkpoint-3'}: trainer_state.pt cannot be read" in err
    assert f"resuming from {out / 'checkpoint-2'}, the newest sound one" in err and "Traceback" not in err
    assert_same_weights(out / "final", straight / "final")
    assert metrics(out) == metrics(straight)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                  "preprocessor_config.json", harness.checkpoints.CHECKPOINT_STATE])
@pytest.mark.parametrize("damage", [cut, garbage])
def test_every_file_of_a_checkpoint_is_checked(straight, tmp_path, name, damage):
    folder = shutil.copytree(straight / "checkpoint-2", tmp_path / "checkpoint-2")
    assert harness.checkpoints.damage(folder) is None
    damage(folder / name)
    assert harness.checkpoints.damage(folder).startswith(f"{name} cannot be read (")
    (folder / name).unlink()  # a folder without its training state is no checkpoint (checkpoints skips it)
    assert harness.checkpoints.damage(folder).startswith(f"{name} missing" if name.endswith(".json") else
                                          f"{name} cannot be read (FileNotFoundError" if name == harness.checkpoints.CHECKPOINT_STATE
                                          else "it holds no weights (*.safetensors)")


def test_every_checkpoint_damaged_is_refused_naming_each(straight, tmp_path, capsys):
    out = copy_run(straight, tmp_path / "run")
    cut(out / "checkpoint-2" / "model.safetensors")
    before = sorted(p.name for p in out.rglob("*"))
    message = refused(["--out", str(out), "--resume"], capsys)
    assert f"--resume: every checkpoint in {out} is damaged:\n  {out / 'checkpoint-2'}: model.safetensors" in message
    assert "start the run again with another --out" in message
    assert sorted(p.name for p in out.rglob("*")) == before


def test_truncate_log_keeps_steps_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "rew')
    harness.checkpoints.truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


# --------------------------------------------------------------------------- signals (real processes)

def start(args: list[str], tmp_path: Path, driver: str | None = None,
          extra_env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """grpo.py (or a driver script around it) in a child process; stderr goes to a file."""
    err = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-c", driver, *args] if driver else [sys.executable, grpo.__file__, *args]
    # the child computes with as many threads as this process, so that its sums match bit for bit
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()), **(extra_env or {})}
    proc = subprocess.Popen(cmd, cwd=Path(grpo.__file__).parent, stdout=subprocess.DEVNULL, stderr=open(err, "w"),
                            env=env)
    return proc, err


def wait_for(condition, proc, timeout=180.0):
    t = time.time()
    while not condition():
        assert proc.poll() is None, "the run ended early"
        assert time.time() - t < timeout, "timed out"
        time.sleep(0.05)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_resumes_exactly(straight, tmp_path):
    out = tmp_path / "run"
    proc, err = start(STRAIGHT + ["--out", str(out)], tmp_path)
    wait_for(lambda: logged_steps(out) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130  # stopped, not finished: a pipeline's next command does not run
    message = err.read_text()
    done = logged_steps(out)
    assert 1 <= done < 4
    assert "SIGTERM: finishing this step" in message
    assert f"stopped after step {done} of 4" in message and f"python grpo.py --out {out} --resume" in message
    assert harness.checkpoints.checkpoints(out)[-1].name == f"checkpoint-{done}" and not (out / "final").exists()

    assert grpo.main(["--out", str(out), "--resume"]) == 0
    assert_same_weights(out / "final", straight / "final")
    assert metrics(out) == metrics(straight)


# Steps after the first sleep a minute, so that the second Ctrl-C surely lands inside a step. The
# file named by IN_SLOW_STEP appears when that sleep begins: a test that signals before it could
# hit the gap between two steps, where the first Ctrl-C ends the run cleanly instead.
SLOW_STEPS = """
import os, sys, time
import grpo
step, calls = grpo.grpo_step, []
def slow_step(*args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
        open(os.environ["IN_SLOW_STEP"], "w").close()
        time.sleep(60)
    return step(*args, **kwargs)
grpo.grpo_step = slow_step
sys.exit(grpo.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "in-slow-step"
    proc, err = start(FLAGS + ["--steps", "4", "--save-every", "100", "--out", str(out)], tmp_path, SLOW_STEPS,
                      extra_env={"IN_SLOW_STEP": str(marker)})
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "finishing this step" in err.read_text(), proc, timeout=30)
    t = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert time.time() - t < 20  # not the minute the step still had to go
    message = err.read_text()
    assert "interrupted" in message and "No checkpoint was saved yet" in message and "Traceback" not in message
    assert not harness.checkpoints.checkpoints(out) and not list(out.glob(".checkpoint-*"))
    assert logged_steps(out) == 1
