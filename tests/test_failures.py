"""grpo.py under the failures a user meets: each gives a clear message (what, where,
what to do) and loses nothing. Runs go through grpo.main, in process, on the `tiny` preset.
"""
import errno
import io
import json
import math
import pathlib
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import grpo
import preresq
from harness import presets
from support import files
import rewards
import harness.checkpoints
import harness.config
import harness.logs
import harness.prefetch

FLAGS = ["--model", "tiny", "--device", "cpu", "--images-per-step", "2", "--num-generations", "2",
         "--max-new-tokens", "64", "--eval-split", "none", "--workers", "1"]


def records(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict:
    return load_file(Path(folder) / "model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def png(rng, size=(56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def labelled_folder(root: Path, good: int, corrupt: int = 0, missing: int = 0) -> list[str]:
    """root/ with `good` PNGs, `corrupt` truncated PNGs and a label file naming them and `missing` absent
    files; returns the --data flags for it."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(good):
        (root / f"good{i}.png").write_bytes(png(rng))
        lines.append(f"good{i}.png {1 + i}")
    for i in range(corrupt):
        whole = png(rng)
        (root / f"bad{i}.png").write_bytes(whole[:len(whole) // 2])
        lines.append(f"bad{i}.png 2.5")
    lines += [f"gone{i}.png 3" for i in range(missing)]
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return ["--data", "labels", "--labels", str(root / "labels.txt"), "--data-root", str(root), "--split", "all"]


def fails(argv, capsys) -> str:
    """Run grpo.main; it must fail with a message (exit code 2 or SystemExit). Returns the message."""
    try:
        code = grpo.main(argv)
        message = capsys.readouterr().err
    except SystemExit as e:
        code, message = e.code, str(e.code) + capsys.readouterr().err
    assert code not in (0, None), "the run should have failed"
    assert "Traceback" not in message
    return message


# --------------------------------------------------------------------------- data

def test_missing_dataset_folder(tmp_path, capsys):
    message = fails(FLAGS + ["--data", "kadid", "--data-root", str(tmp_path / "kadid10k"), "--out",
                             str(tmp_path / "run")], capsys)
    assert f"--data-root {tmp_path / 'kadid10k'} for 'kadid' is not a folder" in message and "layout" in message


def test_empty_dataset_folder(tmp_path, capsys):
    (tmp_path / "kadid10k").mkdir()
    message = fails(FLAGS + ["--data", "kadid", "--data-root", str(tmp_path / "kadid10k"), "--out",
                             str(tmp_path / "run")], capsys)
    assert str(tmp_path / "kadid10k") in message and "--data-root" in message


def test_malformed_labels_name_file_and_line(tmp_path, capsys):
    flags = labelled_folder(tmp_path / "set", good=2)
    with open(tmp_path / "set" / "labels.txt", "a") as f:
        f.write("good0.png four\n")
    message = fails(FLAGS + flags + ["--out", str(tmp_path / "run")], capsys)
    assert "labels.txt" in message and "line 3" in message


def test_missing_images_are_listed_before_training(tmp_path, capsys):
    flags = labelled_folder(tmp_path / "set", good=2, missing=1)
    message = fails(FLAGS + flags + ["--out", str(tmp_path / "run")], capsys)
    assert "1 of 3 labelled files" in message and "gone0.png" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_corrupt_images_in_training_are_skipped_counted_and_named(tmp_path, capsys):
    flags = labelled_folder(tmp_path / "set", good=2, corrupt=2)
    out = tmp_path / "run"
    # 2 steps of 2 images = one pass over the 4 items: both corrupt ones are met once
    assert grpo.main(FLAGS + flags + ["--steps", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for i in range(2):
        assert f"warning: skipped an unreadable item: cannot decode image {tmp_path / 'set' / f'bad{i}.png'}" in err
    log = records(out)
    assert [r["step"] for r in log] == [1, 2] and log[-1]["skipped_items"] == 2
    for r in log:  # a batch with no readable image is logged as skipped, and trains on nothing
        assert ("skipped" in r) == ("loss" not in r)
    assert (out / "final" / "model.safetensors").exists()


def test_a_picture_the_image_processor_refuses_is_skipped_and_counted(tmp_path, capsys):
    """2000 x 3 pixels: Qwen2-VL's smart_resize refuses a long side over 200 times the short one."""
    flags = labelled_folder(tmp_path / "set", good=3)
    Image.new("RGB", (2000, 3), (90, 90, 90)).save(tmp_path / "set" / "wide.png")
    with open(tmp_path / "set" / "labels.txt", "a") as f:
        f.write("wide.png 2.0\n")
    out = tmp_path / "run"
    assert grpo.main(FLAGS + flags + ["--steps", "2", "--out", str(out)]) == 0  # one pass over the 4 items
    err = capsys.readouterr().err
    assert f"skipped an unreadable item: {tmp_path / 'set' / 'wide.png'} is 2000 x 3 pixels" in err
    assert "over 200 times its short one" in err and records(out)[-1]["skipped_items"] == 1


def test_a_training_set_with_no_readable_picture_is_refused_before_training(tmp_path, capsys):
    flags = labelled_folder(tmp_path / "set", good=0, corrupt=3)
    (tmp_path / "set" / "labels.txt").write_text("".join(f"bad{i}.png {1 + i}\n" for i in range(3)))
    message = fails(FLAGS + flags + ["--steps", "2", "--out", str(tmp_path / "run")], capsys)
    assert message.startswith("grpo.py: error: no picture of training set 'labels' could be read: all 3 failed")
    assert f"cannot decode image {tmp_path / 'set' / 'bad0.png'}" in message and "--check-images" in message
    assert not (tmp_path / "run").exists()


def test_a_run_whose_every_step_was_skipped_ends_without_curves(tmp_path):
    """One readable picture among unreadable ones: steps whose batch has none are skipped; a run of only
    such steps has no reward to draw, and ends normally."""
    harness.logs.log_json(tmp_path / "metrics.jsonl", {"step": 1, "skipped": "no readable images in this batch"})
    harness.logs.draw_run_curves(tmp_path)
    assert not (tmp_path / "curves.png").exists()


def test_missing_file_and_corrupt_clip_at_load_time_are_reported_not_fatal(tmp_path):
    import data

    rng = np.random.default_rng(0)
    (tmp_path / "ok.png").write_bytes(png(rng))
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(rng.integers(0, 255, 2000, dtype=np.uint8)))
    items = [data.Item(str(tmp_path / n), 3.0, 3.0, "s") for n in ("ok.png", "deleted.png", "clip.mp4")]
    kept, visuals, problems = harness.prefetch.load_visuals(items, None)
    assert [it.path for it in kept] == [str(tmp_path / "ok.png")] and len(visuals) == 1
    assert len(problems) == 2
    assert str(tmp_path / "deleted.png") in problems[0] and "does not exist" in problems[0]
    assert str(tmp_path / "clip.mp4") in problems[1]


# --------------------------------------------------------------------------- model

def test_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    message = fails(FLAGS + ["--model", str(tmp_path / "model"), "--steps", "1", "--out", str(tmp_path / "run")],
                    capsys)
    assert f"{tmp_path / 'model'} is not a model folder" in message and "save_pretrained" in message


def test_a_damaged_model_folder(tmp_path, tiny, capsys):
    model, tokenizer, image_processor = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"half a file")
    message = fails(FLAGS + ["--model", str(folder), "--steps", "1", "--out", str(tmp_path / "run")], capsys)
    assert f"could not load a Qwen2.5-VL model from {folder}" in message


def test_an_offline_hub_id(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = fails(FLAGS + ["--model", "nobody/no-such-model-7B", "--steps", "1", "--out", str(tmp_path / "run")],
                    capsys)
    assert "'nobody/no-such-model-7B' is not in the local hub cache and HF_HUB_OFFLINE is set" in message
    assert "hf download nobody/no-such-model-7B" in message


# --------------------------------------------------------------------------- output folder

def test_output_folder_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "run"
    target.write_text("my notes")
    message = fails(FLAGS + ["--out", str(target)], capsys)
    assert f"--out {target} is a file" in message
    assert target.read_text() == "my notes"
    message = fails(FLAGS + ["--out", str(target / "inside")], capsys)
    assert f"cannot write to --out {target / 'inside'}" in message


def test_output_folder_not_writable(tmp_path, capsys, monkeypatch):
    # Tests run as root, for whom chmod does not bite: the refusal is simulated at the access check,
    # which comes before any data are generated or any folder is made.
    import os

    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if pathlib.Path(p) == tmp_path else access(p, mode))
    message = fails(FLAGS + ["--out", str(tmp_path / "run" / "sub")], capsys)
    assert f"cannot write to --out {tmp_path / 'run' / 'sub'} ({tmp_path} is not writable)" in message
    assert message.startswith("grpo.py: error: ") and not (tmp_path / "run").exists()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    save, calls = torch.save, []

    def full_disk_on_second_checkpoint(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the model files of checkpoint-2 are written by now; the state is not
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_second_checkpoint)
    flags = FLAGS + ["--steps", "3", "--save-every", "1", "--keep-last", "1", "--out", str(out)]
    assert grpo.main(flags) == 1
    monkeypatch.undo()
    message = capsys.readouterr().err
    assert f"could not write {out / 'checkpoint-2'}" in message and "No space left on device" in message
    assert f"Nothing earlier in {out} was lost; the newest checkpoint is {out / 'checkpoint-1'}" in message
    assert f"python grpo.py --out {out} --resume" in message
    # checkpoint-1 survives (--keep-last 1 prunes only after a complete save), nothing half-written remains
    assert [p.name for p in harness.checkpoints.checkpoints(out)] == ["checkpoint-1"]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert torch.load(out / "checkpoint-1" / harness.checkpoints.CHECKPOINT_STATE, weights_only=False)["step"] == 1

    assert grpo.main(["--out", str(out), "--resume"]) == 0  # space freed: the run goes on
    assert [r["step"] for r in records(out)] == [1, 2, 3]
    assert [p.name for p in harness.checkpoints.checkpoints(out)] == ["checkpoint-2"]  # pruned to the newest
    assert (out / "final" / "model.safetensors").exists()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, byte for byte, by its path inside it (folders show in the paths)."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run shorter than --save-every (no checkpoint-*), with held-out logs: what a short
    demo leaves. Each test copies it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    flags = FLAGS[:-4] + ["--eval-split", "test", "--eval-size", "2", "--eval-samples", "1", "--workers", "1"]
    assert grpo.main(flags + ["--steps", "1", "--out", str(out)]) == 0
    assert {"final", "metrics.jsonl", "eval.jsonl", "eval_items.jsonl"} <= {p.name for p in out.iterdir()}
    assert not harness.checkpoints.checkpoints(out)
    return out


def test_a_finished_run_is_never_replaced(finished, tmp_path, capsys):
    out = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(out)
    message = fails(FLAGS + ["--steps", "1", "--out", str(out)], capsys)
    assert message.startswith(f"grpo.py: error: --out {out} is not empty (") and "Choose another --out" in message
    assert snapshot(out) == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")  # any file: a new run never writes beside it
    assert "is not empty (todo.txt)" in fails(FLAGS + ["--steps", "1", "--out", str(tmp_path / "notes")], capsys)
    assert snapshot(tmp_path / "notes") == {"todo.txt": b"mine"}


@pytest.fixture
def broken_model(tmp_path) -> Path:
    folder = shutil.copytree(presets.model_path("tiny"), tmp_path / "broken")
    (folder / "config.json").write_text('{"model_type": "qwen2_5_vl", "vision_config": ')  # cut short
    return folder


def test_a_refused_run_touches_no_earlier_run_and_creates_nothing(finished, broken_model, tmp_path, capsys):
    """The run folder is made only once the model has loaded: a model that does not load leaves an
    earlier run as it was (byte for byte) and a new --out not created."""
    out = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(out)
    fails(FLAGS + ["--model", str(broken_model), "--steps", "1", "--out", str(out)], capsys)
    assert snapshot(out) == before
    message = fails(FLAGS + ["--model", str(broken_model), "--steps", "1", "--out", str(tmp_path / "new")], capsys)
    assert str(broken_model) in message and not (tmp_path / "new").exists()


def test_a_refused_resume_cuts_no_log(tmp_path, broken_model, capsys):
    """--resume cuts the logs back to the checkpoint only once the checkpoint and the models loaded."""
    out = tmp_path / "run"
    assert grpo.main(FLAGS + ["--steps", "2", "--save-every", "1", "--out", str(out)]) == 0
    before = snapshot(out)
    fails(["--out", str(out), "--resume", "--force", "--steps", "3", "--model", str(broken_model)], capsys)
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["is", "lies inside", "holds"])
def test_out_is_never_the_models_folder(where, tmp_path, capsys):
    model = shutil.copytree(presets.model_path("tiny"), tmp_path / "models" / "mine")
    out = {"is": model, "lies inside": model / "run", "holds": model.parent}[where]
    before = snapshot(tmp_path)
    message = fails(FLAGS + ["--model", str(model), "--steps", "1", "--out", str(out)], capsys)
    assert f"--out {out} {where} the model's folder {model}" in message and "outside it" in message
    assert snapshot(tmp_path) == before


def no_space_while_writing(path_part: str):
    """A save_pretrained that fails like a full disk while writing a folder whose name holds path_part."""
    from transformers import PreTrainedModel

    save = PreTrainedModel.save_pretrained

    def full(self, folder, *args, **kwargs):
        if path_part in Path(folder).name:
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, folder, *args, **kwargs)
    return full


def test_a_full_disk_at_final_with_no_checkpoint_says_nothing_can_be_resumed(tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space_while_writing(".final-"))
    out = tmp_path / "run"
    assert grpo.main(FLAGS + ["--steps", "1", "--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert f"grpo.py: error: could not write {out / 'final'}: No space left on device (" in message
    assert "The trained weights could not be saved" in message and "nothing can be resumed" in message
    assert "intact" not in message and "--resume" not in message
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl"]  # no half-written final/


def test_a_full_disk_at_final_names_the_newest_checkpoint(tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space_while_writing(".final-"))
    out = tmp_path / "run"
    assert grpo.main(FLAGS + ["--steps", "3", "--save-every", "2", "--out", str(out)]) == 1
    monkeypatch.undo()
    message = capsys.readouterr().err
    assert "The trained weights could not be saved" in message
    assert f"the newest checkpoint is {out / 'checkpoint-2'}" in message and f"--out {out} --resume" in message
    assert grpo.main(["--out", str(out), "--resume"]) == 0  # space freed: step 3 again, then final/
    assert [r["step"] for r in records(out)] == [1, 2, 3] and (out / "final" / "model.safetensors").exists()


class FullDisk:
    """A file whose write stores half of what it is given, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def full_disk_when(condition):
    """files.open, failing like a full disk for the files condition(file, mode) picks."""
    import builtins

    def open_(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        return FullDisk(f) if condition(file, mode) else f
    return open_


def test_a_full_disk_while_logging_stops_the_run_with_the_file_and_the_newest_checkpoint(tmp_path, capsys,
                                                                                        monkeypatch):
    out = tmp_path / "run"
    appends = []

    def second_metrics_line(file, mode):
        appends.append(file) if str(file).endswith("metrics.jsonl") else None
        return str(file).endswith("metrics.jsonl") and len(appends) == 2

    monkeypatch.setattr(files, "open", full_disk_when(second_metrics_line), raising=False)
    assert grpo.main(FLAGS + ["--steps", "3", "--save-every", "1", "--out", str(out)]) == 1
    monkeypatch.undo()
    message = capsys.readouterr().err
    assert f"grpo.py: error: could not write {out / 'metrics.jsonl'}: No space left on device (" in message
    assert f"the newest checkpoint is {out / 'checkpoint-1'}" in message and "Traceback" not in message
    assert [r["step"] for r in records(out)] == [1]  # the torn half line was cut away
    assert (out / "metrics.jsonl").read_text().endswith("}\n")
    assert grpo.main(["--out", str(out), "--resume"]) == 0
    assert [r["step"] for r in records(out)] == [1, 2, 3]


def test_one_write_path_leaves_no_partial_file(tmp_path, monkeypatch):
    (tmp_path / "page.html").write_text("the old page")
    monkeypatch.setattr(files, "open", full_disk_when(lambda file, mode: "w" in mode), raising=False)
    with pytest.raises(files.WriteError) as caught:
        files.write_file(tmp_path / "page.html", "a new page")
    assert str(caught.value).startswith(f"could not write {tmp_path / 'page.html'}: No space left on device (")
    assert f"{tmp_path / 'page.html'} was left as it was" in str(caught.value)
    monkeypatch.undo()
    (tmp_path / "summary.json").mkdir()  # a folder where the file should be
    with pytest.raises(files.WriteError, match="could not write .*summary.json: Is a directory"):
        files.write_file(tmp_path / "summary.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "summary.json"]
    assert (tmp_path / "page.html").read_text() == "the old page"
    files.write_file(tmp_path / "log.jsonl", "one\n", append=True)
    files.write_file(tmp_path / "log.jsonl", "two\n", append=True)
    assert (tmp_path / "log.jsonl").read_text() == "one\ntwo\n"


# --------------------------------------------------------------------------- stopping

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_run_saves_its_checkpoint_and_exits_130(signum, tmp_path, capsys, monkeypatch):
    """The signal arrives during step 1: the step ends, checkpoint-1 is saved, and the exit status says
    the run did not finish, so `grpo.py ... && grpo.py --model .../final` goes no further."""
    import os

    step = grpo.grpo_step

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return step(*args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_step", signalled)
    out = tmp_path / "run"
    assert grpo.main(FLAGS + ["--steps", "3", "--save-every", "100", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"stopped after step 1 of 3; checkpoint {out / 'checkpoint-1'}" in err and "grpo.py: interrupted" in err
    assert err.count("--resume") == 1 and not (out / "final").exists()
    assert [p.name for p in harness.checkpoints.checkpoints(out)] == ["checkpoint-1"]


# --------------------------------------------------------------------------- non-finite values

def test_inf_reward_skips_the_step_and_the_run_goes_on(tmp_path, monkeypatch):
    reward, calls = rewards.REWARDS["preresq"], []

    def inf_first(*args, **kwargs):
        calls.append(1)
        terms = reward(*args, **kwargs)
        if len(calls) == 1:
            terms["total"] = terms["total"].clone().fill_(math.inf)
        return terms

    monkeypatch.setitem(rewards.REWARDS, "preresq", inf_first)
    out = tmp_path / "run"
    assert grpo.main(FLAGS + ["--steps", "2", "--save-every", "1", "--out", str(out)]) == 0
    first, second = records(out)
    assert first["nonfinite"] == "reward" and first["nonfinite_steps"] == 1 and "loss" not in first
    assert "nonfinite" not in second and math.isfinite(second["loss"]) and second["nonfinite_steps"] == 1
    initial = weights(presets.model_path("tiny"))
    assert same_weights(weights(out / "checkpoint-1"), initial)  # the skipped step changed nothing
    assert not same_weights(weights(out / "final"), initial)  # the next one did


def test_nan_loss_skips_the_step(tmp_path, monkeypatch):
    loss_fn, calls = grpo.grpo_loss, []

    def nan_first(*args, **kwargs):
        calls.append(1)
        loss, stats = loss_fn(*args, **kwargs)
        return (loss * math.nan if len(calls) == 1 else loss), stats

    monkeypatch.setattr(grpo, "grpo_loss", nan_first)
    out = tmp_path / "run"
    assert grpo.main(FLAGS + ["--steps", "2", "--save-every", "1", "--out", str(out)]) == 0
    first, second = records(out)
    assert first["nonfinite"] == "loss" and first["nonfinite_steps"] == 1
    assert "nonfinite" not in second and math.isfinite(second["grad_norm"])
    assert same_weights(weights(out / "checkpoint-1"), weights(presets.model_path("tiny")))


def test_a_run_that_keeps_producing_nan_stops_with_a_message(tmp_path, capsys, monkeypatch):
    reward = rewards.REWARDS["preresq"]

    def always_nan(*args, **kwargs):
        terms = reward(*args, **kwargs)
        terms["total"] = terms["total"] * math.nan
        return terms

    monkeypatch.setitem(rewards.REWARDS, "preresq", always_nan)
    monkeypatch.setattr(harness.logs, "MAX_NONFINITE_STEPS", 2)
    out = tmp_path / "run"
    assert grpo.main(FLAGS + ["--steps", "5", "--save-every", "1", "--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert "steps 1-2 all gave a non-finite reward" in message and str(out / "metrics.jsonl") in message
    assert f"newest checkpoint is {out / 'checkpoint-1'}" in message and "--resume" in message
    assert [r["nonfinite_steps"] for r in records(out)] == [1, 2]


def test_an_update_that_leaves_nan_weights_stops_before_they_are_saved(tmp_path, capsys, monkeypatch):
    """The loss and the gradient are finite, the update is not (as float16's AdamW does): the run stops at
    that step, names the newest sound checkpoint, and saves nothing with the broken weights."""
    update, calls = torch.optim.AdamW.step, []

    def overflowing(self, *args, **kwargs):
        result = update(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = math.inf
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    out = tmp_path / "run"
    assert grpo.main(FLAGS + ["--steps", "4", "--save-every", "1", "--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert "step 2's update left non-finite weights" in message and "Traceback" not in message
    assert f"newest sound checkpoint is {out / 'checkpoint-1'}" in message and "--resume" in message
    assert harness.checkpoints.checkpoints(out) == [out / "checkpoint-1"] and not (out / "final").exists()
    assert not harness.logs.nonfinite_weights(preresq.load_model(str(out / "checkpoint-1"), "cpu")[0], grpo.Processes())


def score(cfg, texts, mos, g):
    """(reward terms, parse mask) of image answers, as a single-schedule step scores them."""
    scores, valid, fmt = rewards.parse_completions(texts, 5, g)
    return grpo.reward_terms(cfg, grpo.explore_stable(cfg, 0), scores, mos, valid, fmt, video=False), valid


def test_a_group_with_no_parsable_answer_has_zero_advantage():
    """Hand-worked: an answer without the format earns nothing (format 0, no accuracy terms), so a
    group of them has constant reward 0 and advantage exactly 0, never NaN (std 0 + eps)."""
    cfg = harness.config.run_config(grpo.Settings)(model="tiny").resolve()
    good = ["<think>ok</think>\n<answer>" + "\n".join([s] * 5) + "</answer>" for s in ("2.0", "4.0", "3.0")]
    texts = ["no answer", "<think>still nothing", "5 5 5"] + good
    terms, valid = score(cfg, texts, torch.tensor([2.0, 4.0]), 3)
    assert valid.tolist() == [[False] * 3, [True] * 3]
    assert terms["total"][0].tolist() == [0.0, 0.0, 0.0]
    adv = grpo.group_advantages(terms["total"])
    assert adv[0].tolist() == [0.0, 0.0, 0.0] and torch.isfinite(adv).all() and adv[1].abs().sum() > 0
    # the whole batch unparsable: all advantages 0, and the loss is finite (0)
    terms = score(cfg, ["x"] * 6, torch.tensor([2.0, 4.0]), 3)[0]
    adv = grpo.group_advantages(terms["total"]).reshape(-1)
    logp = torch.randn(6, 4)
    loss, _ = grpo.grpo_loss(logp, logp, None, adv, torch.ones(6, 4), beta=0.0, epsilon=0.2)
    assert torch.equal(adv, torch.zeros(6)) and loss.item() == 0.0


# --------------------------------------------------------------------------- batch shapes

def test_one_answer_per_image_is_refused_before_anything_runs(tmp_path, capsys):
    """G = 1 has no group baseline: every advantage, the loss and the update would be 0, a run that
    learns nothing. It is refused with the reason, in any stage, before a folder is made."""
    for flags in (["--num-generations", "1"], ["--schedule", "explore-stable", "--stage2-generations", "1"]):
        message = fails(FLAGS + flags + ["--steps", "1", "--out", str(tmp_path / "run")], capsys)
        assert "at least 2" in message and "nothing is learned" in message
    assert not (tmp_path / "run").exists()


def test_micro_batch_that_does_not_divide_the_batch(tmp_path):
    """B*G = 2*3 = 6 completions in micro-batches of 4 (4 + 2): the same step as one batch of 6."""
    flags = FLAGS + ["--num-generations", "3", "--steps", "1"]
    assert grpo.main(flags + ["--micro-batch-size", "4", "--out", str(tmp_path / "micro")]) == 0
    assert grpo.main(flags + ["--out", str(tmp_path / "whole")]) == 0
    (a,), (b,) = records(tmp_path / "micro"), records(tmp_path / "whole")
    assert a["completion_tokens"] == b["completion_tokens"] and a["reward"] == b["reward"]
    assert a["grad_norm"] > 0 and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_more_images_per_step_than_the_training_set_holds_is_refused(tmp_path, capsys):
    """12 pictures at 32 a step would report epoch 2.67 after one pass; refused, both numbers named."""
    flags = labelled_folder(tmp_path / "set", good=3)
    message = fails(FLAGS + flags + ["--images-per-step", "4", "--steps", "1", "--out", str(tmp_path / "run")],
                    capsys)
    assert "--images-per-step 4, but training set 'labels' has only 3 images" in message
    assert "--images-per-step 3 or less" in message and not (tmp_path / "run").exists()


# More processes than images (torchrun) is checked in test_distributed.py.


def test_logs_write_null_for_a_missing_number_not_bare_nan(tmp_path):
    """JSON has no NaN: a strict reader (jq, JavaScript, pandas' default) refuses a bare NaN."""
    path = tmp_path / "metrics.jsonl"
    harness.logs.log_json(path, {"step": 1, "batch_srcc": float("nan"), "reward": 0.5, "grad_norm": float("inf")})

    def refuse(name):
        raise ValueError(f"bare {name} in a JSON log")

    record = json.loads(path.read_text(), parse_constant=refuse)
    assert record == {"step": 1, "batch_srcc": None, "reward": 0.5, "grad_norm": None}
