"""train.py: exact resume, checkpoints that refuse what they should, NaN stop, flags, DDP."""

import dataclasses
import fractions
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

import data
import evaluation.rankme as RM
import models as M
import train as T

pytestmark = pytest.mark.slow  # training runs, resumes and 2-process DDP, nearly every test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(num_images=48, resolution=32, batch_size=16, checkpoint_every=2, log_every=1, warmup=0.25)


def weights(model):
    return {f"{part}.{k}": v for part in ("student", "teacher", "predictor")
            for k, v in getattr(model, part).state_dict().items()}


@pytest.mark.parametrize("variant", [dict(packing=False), dict(packing=True), dict(shift=3, flip=True),
                                     dict(method="mae", loss="mse"), dict(method="sigreg", sigreg_slices=16)],
                         ids=["batches", "packing", "augmented", "mae", "sigreg"])
def test_resume_gives_identical_weights(tmp_path, variant):
    one = T.train(T.TrainConfig(steps=8, out=str(tmp_path / "one"), **variant, **TINY), progress=False)
    T.train(T.TrainConfig(steps=8, out=str(tmp_path / "two"), stop_after=4, **variant, **TINY), progress=False)
    two = T.train(T.TrainConfig(steps=8, out=str(tmp_path / "two"), resume=True, **variant, **TINY), progress=False)
    assert one.steps == two.steps == 8
    a, b = weights(one.model), weights(two.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 8 and not os.path.exists(tmp_path / "two" / "checkpoint.pt.tmp")
    rows = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert len(rows) == 8  # steps 1..4 then 5..8, one row per step at log_every=1
    # the logged time is the whole run's: the resumed segment counts on from the first one's
    seconds = [row["seconds"] for row in rows]
    assert seconds == sorted(seconds) and ckpt["seconds"] >= seconds[-1] > seconds[3] > 0


def test_checkpoint_or_train_finishes_a_stopped_run_and_then_leaves_it_alone(tmp_path, capsys):
    path = str(tmp_path / "run" / "checkpoint.pt")
    cfg = T.TrainConfig(steps=4, **TINY)
    T.train(T.TrainConfig(**{**dataclasses.asdict(cfg), "out": str(tmp_path / "run"), "stop_after": 2}), progress=False)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert T.checkpoint_or_train(path, cfg) == path
    assert "stopped at step 2 of 4: resuming" in capsys.readouterr().out
    assert torch.load(path, weights_only=True)["step"] == 4
    before = os.path.getmtime(path)
    T.checkpoint_or_train(path, cfg)  # finished: used as it is
    assert os.path.getmtime(path) == before


def test_checkpoint_or_train_keeps_copies_at_steps_and_trains_the_same_run(tmp_path, capsys):
    cfg = T.TrainConfig(steps=6, **TINY)
    path = str(tmp_path / "kept" / "checkpoint.pt")
    assert T.checkpoint_or_train(path, cfg, keep_steps=(4, 2)) == path
    for at in (2, 4):
        assert torch.load(tmp_path / "kept" / f"step-{at}.pt", weights_only=True)["step"] == at
    assert torch.load(path, weights_only=True)["step"] == 6
    straight = T.train(T.TrainConfig(**{**dataclasses.asdict(cfg), "out": str(tmp_path / "straight")}), progress=False)
    kept = T.model_from_checkpoint(path)[0].state_dict()
    assert all(torch.equal(kept[k], v) for k, v in straight.model.state_dict().items())  # segments = one run
    capsys.readouterr()
    T.checkpoint_or_train(path, cfg, keep_steps=(2, 4))  # everything there: nothing trained
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="already at step 6, past 5.*train afresh"):
        T.checkpoint_or_train(path, cfg, keep_steps=(5,))


@pytest.fixture
def steady_clock(monkeypatch):
    """A clock that advances 10 ms each time it is read: every step takes the same time, whatever
    the machine's load."""
    now = [0.0]

    def clock():
        now[0] += 0.01
        return now[0]
    monkeypatch.setattr(T.time, "perf_counter", clock)


def test_a_timed_run_stores_its_length_and_is_then_a_finished_checkpoint(tmp_path, steady_clock, capsys):
    cfg = T.TrainConfig(minutes=0.02, **TINY)
    path = str(tmp_path / "run" / "checkpoint.pt")
    assert T.checkpoint_or_train(path, cfg) == path  # no checkpoint yet: trains one
    assert "training one now (0.02 minutes of micro" in capsys.readouterr().out
    saved = torch.load(path, weights_only=True)
    assert saved["total_steps"] == saved["step"] >= 4  # the schedules' final length: the steps reached
    before = os.path.getmtime(path)
    assert T.checkpoint_or_train(path, cfg) == path  # finished: used as it is
    assert os.path.getmtime(path) == before


def test_a_timed_run_cut_short_is_not_resumed_and_the_error_says_what_to_do(tmp_path, steady_clock, monkeypatch):
    real, calls = T.training_step, []

    def crash_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "training_step", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        T.train(T.TrainConfig(minutes=0.02, out=str(tmp_path), **TINY), progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2  # checkpoint_every=2
    monkeypatch.setattr(T, "training_step", real)
    message = "written part-way through a --minutes run.*cannot be resumed.*--steps"
    with pytest.raises(ValueError, match=message):
        T.train(T.TrainConfig(minutes=0.02, out=str(tmp_path), resume=True, **TINY), progress=False)
    with pytest.raises(ValueError, match=message):
        T.checkpoint_or_train(str(tmp_path / "checkpoint.pt"), T.TrainConfig(minutes=0.02, **TINY))


@pytest.mark.parametrize("packing", [False, True], ids=["batches", "packing"])
def test_resume_with_another_number_of_workers_gives_identical_weights(tmp_path, packing):
    one = T.train(T.TrainConfig(steps=6, out=str(tmp_path / "one"), packing=packing, **TINY), progress=False)
    T.train(T.TrainConfig(steps=6, out=str(tmp_path / "two"), stop_after=4, workers=2, packing=packing, **TINY),
            progress=False)
    two = T.train(T.TrainConfig(steps=6, out=str(tmp_path / "two"), resume=True, workers=1, packing=packing, **TINY),
                  progress=False)
    a, b = weights(one.model), weights(two.model)
    assert two.steps == 6 and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_number_of_processes(tmp_path):
    T.train(T.TrainConfig(steps=2, out=str(tmp_path), **TINY), progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["world"] == 1
    torch.save({**saved, "world": 2}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1.*--nproc_per_node 2"):
        T.train(T.TrainConfig(steps=4, out=str(tmp_path), resume=True, **TINY), progress=False)


def test_unreadable_checkpoints_say_why(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*absent.pt"):
        T.load_checkpoint(str(tmp_path / "absent.pt"))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pt.*not a PyTorch file, or it is truncated or corrupt"):
        T.load_checkpoint(str(tmp_path / "notes.pt"))
    torch.save({"step": 1, "share": fractions.Fraction(1, 3)}, tmp_path / "objects.pt")
    with pytest.raises(ValueError, match=r"objects.pt.*refused by torch.load\(weights_only=True\): it holds Python objects"):
        T.load_checkpoint(str(tmp_path / "objects.pt"))
    torch.save({"config": {}, "student": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt.*not a checkpoint of train.py .it lacks teacher, predictor"):
        T.model_from_checkpoint(str(tmp_path / "partial.pt"))
    # the weights alone (export_weights) are a model, not a run that can go on
    T.train(T.TrainConfig(steps=2, out=str(tmp_path / "run"), **TINY), progress=False)
    T.export_weights(str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "weights" / "checkpoint.pt"))
    with pytest.raises(ValueError, match="cannot resume from .*it lacks optimizer, epoch, in_epoch, rng .*export_weights"):
        T.train(T.TrainConfig(steps=4, out=str(tmp_path / "weights"), resume=True, **TINY), progress=False)


def test_initial_model_is_where_training_starts_and_leaves_the_random_state_alone(monkeypatch):
    cfg = T.TrainConfig(steps=1, seed=3, **TINY)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model = T.initial_model(cfg)
    assert torch.equal(torch.get_rng_state(), state)
    started = {}

    def first_step(model, *args, **kwargs):
        started.update({k: v.clone() for k, v in weights(model).items()})
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "training_step", first_step)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, progress=False)
    built = weights(model)
    assert set(built) == set(started) and all(torch.equal(built[k], started[k]) for k in built)


def test_log_rows_hold_the_health_signals(tmp_path):
    result = T.train(T.TrainConfig(steps=3, out=str(tmp_path), **TINY), progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    for key in ("step", "loss", "lr", "weight_decay", "ema_momentum", "grad_norms", "rankme", "target_token_rankme",
                "padding", "images_per_s"):
        assert key in rows[0]
    assert set(rows[0]["grad_norms"]) >= {"student.0", "student.3", "predictor.0"}
    assert 0.0 <= rows[0]["padding"] < 1.0 and 1.0 <= rows[0]["target_token_rankme"] <= 128
    # RankMe as defined: image-level, the mean-pooled teacher features of the fixed training images
    # (all 48 here), computed directly from the final teacher for the last row
    images = data.normalize(data.SceneDataset(48, resolution=32, split="train", seed=0).tensors()[0])
    with torch.no_grad():
        direct = RM.rankme(result.model.teacher.eval().encode(images).mean(1))
    assert rows[-1]["step"] == 3 and rows[-1]["rankme"] == pytest.approx(direct, rel=1e-4)
    assert 1.0 <= direct <= 48
    # LayerNorm targets: every token has mean 0 and variance 1 over its 128 channels, so norm sqrt(128)
    assert rows[0]["target_norm"] == pytest.approx(128 ** 0.5, rel=1e-3) and 0 < rows[0]["target_std"] < 2
    # ... so the mean square of every entry is 1 and the spread is the standard deviation itself
    assert rows[0]["target_spread"] == pytest.approx(rows[0]["target_std"], rel=1e-3)


def test_target_spread_is_zero_for_identical_targets_and_one_for_independent_ones():
    assert T.target_spread(torch.randn(1, 64).expand(500, 64)) == 0.0
    assert T.target_spread(torch.randn(20_000, 64)) == pytest.approx(1.0, abs=0.01)
    # scale-free: shrinking every target changes the loss, not the spread
    x = torch.randn(300, 64) + 3 * torch.randn(1, 64)  # a large shared part: a spread well below 1
    assert T.target_spread(1e-3 * x) == pytest.approx(T.target_spread(x), rel=1e-5) and T.target_spread(x) < 0.5


def test_the_collapse_warning_fires_once_on_a_collapsed_run_and_never_on_a_healthy_one(monkeypatch, capsys):
    healthy = T.train(T.TrainConfig(steps=4, **TINY), progress=False)
    assert capsys.readouterr().out.count("collapsed") == 0
    assert min(row["target_spread"] for row in healthy.log) > T.COLLAPSE_SPREAD

    # Constructed collapse: a teacher frozen (momentum 1) with its final norm's weight and bias at 0
    # outputs 0 for every token of every image, so every target is the same.
    build = T.build_model

    def constant_teacher(cfg):
        model = build(cfg)
        with torch.no_grad():
            model.teacher.norm.weight.zero_()
            model.teacher.norm.bias.zero_()
        return model

    monkeypatch.setattr(T, "build_model", constant_teacher)
    collapsed = T.train(T.TrainConfig(steps=4, ema=(1.0, 1.0), **TINY), progress=False)
    said = capsys.readouterr().out
    assert said.count("looks collapsed") == 1 and "target_spread" in said and "step 1" in said
    assert all(row["target_spread"] < T.COLLAPSE_SPREAD for row in collapsed.log) and len(collapsed.log) == 4
    assert T.collapse_warning(collapsed.log[0]) is not None and T.collapse_warning(healthy.log[0]) is None


def test_a_fixed_momentum_of_0_makes_the_teacher_the_student_and_1_keeps_it_at_its_start():
    copied = T.train(T.TrainConfig(steps=3, ema=(0.0, 0.0), **TINY), progress=False).model
    student, teacher = copied.student.state_dict(), copied.teacher.state_dict()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    cfg = T.TrainConfig(steps=3, ema=(1.0, 1.0), **TINY)
    frozen = T.train(cfg, progress=False).model
    start = T.initial_model(cfg).teacher.state_dict()
    assert all(torch.equal(frozen.teacher.state_dict()[k], start[k]) for k in start)
    assert not torch.equal(frozen.student.state_dict()["patch_embed.weight"], start["patch_embed.weight"])


def test_resume_refuses_another_config_and_a_truncated_file(tmp_path):
    T.train(T.TrainConfig(steps=2, out=str(tmp_path), **TINY), progress=False)
    written = re.escape(f"lr: checkpoint {T.TrainConfig().lr} vs now 0.01")
    with pytest.raises(ValueError, match=f"differing fields: .*{written}"):
        T.train(T.TrainConfig(steps=2, out=str(tmp_path), resume=True, **{**TINY, "lr": 1e-2}), progress=False)
    path = tmp_path / "checkpoint.pt"
    # a checkpoint written before a config field existed resumes as if it had the field's default
    older = torch.load(path, weights_only=True)
    del older["config"]["shift"], older["config"]["flip"], older["config"]["num_targets"]
    torch.save(older, path)
    assert T.train(T.TrainConfig(steps=2, out=str(tmp_path), resume=True, **TINY), progress=False).steps == 2
    with pytest.raises(ValueError, match="differing fields: shift: checkpoint 0 vs now 2"):
        T.train(T.TrainConfig(steps=2, out=str(tmp_path), resume=True, shift=2, **TINY), progress=False)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="checkpoint.pt.*truncated or corrupt"):
        T.train(T.TrainConfig(steps=4, out=str(tmp_path), resume=True, **TINY), progress=False)


def test_exported_weights_load_as_the_same_model_and_errors_say_how_to_rebuild(tmp_path, monkeypatch):
    T.train(T.TrainConfig(steps=2, out=str(tmp_path), **TINY), progress=False)
    full, weights_only = tmp_path / "checkpoint.pt", tmp_path / "reference" / "checkpoint.pt"
    T.export_weights(str(full), str(weights_only))
    saved = torch.load(weights_only, weights_only=True)
    assert set(saved) == set(T.WEIGHTS) and "optimizer" not in saved
    assert weights_only.stat().st_size < full.stat().st_size
    model, cfg = T.reference_model(str(weights_only))
    trained, _ = T.model_from_checkpoint(str(full))
    assert cfg.steps == 2 and all(torch.equal(a, b) for a, b in zip(weights(model).values(), weights(trained).values()))

    with pytest.raises(FileNotFoundError, match="is missing: restore it with `git checkout.*rebuild it"):
        T.reference_model(str(tmp_path / "nothing.pt"))
    bad = dict(saved, student={k: v[..., :1] for k, v in saved["student"].items()})  # another model's shapes
    torch.save(bad, tmp_path / "mismatched.pt")
    with pytest.raises(ValueError, match="do not fit the configuration.*checkpoints/reference/README.md"):
        T.reference_model(str(tmp_path / "mismatched.pt"))
    weights_only.write_bytes(weights_only.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt.*checkpoints/reference/README.md"):
        T.reference_model(str(weights_only))
    with pytest.raises(ValueError, match="not a checkpoint of train.py .it lacks step, total_steps, student, teacher, predictor"):
        torch.save({"config": {}}, tmp_path / "not-ours.pt")
        T.export_weights(str(tmp_path / "not-ours.pt"), str(tmp_path / "out.pt"))

    # with no reference model on disk, scripts fall back to the demo checkpoint
    monkeypatch.setattr(T, "REFERENCE_CHECKPOINT", str(tmp_path / "absent.pt"))
    monkeypatch.setattr(T, "DEMO_CHECKPOINT", str(full))
    assert T.default_checkpoint() == str(full)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = T.training_step
    calls = []

    def failing_step(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            result.loss = torch.tensor(float("nan"))
        return result

    monkeypatch.setattr(T, "training_step", failing_step)
    with pytest.raises(FloatingPointError, match="loss is nan at step 2.*last good checkpoint is kept"):
        T.train(T.TrainConfig(steps=6, out=str(tmp_path), **TINY), progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_training_lowers_the_loss():
    result = T.train(T.TrainConfig(steps=30, **TINY), progress=False)
    losses = [row["loss"] for row in result.log]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3


def test_mae_and_the_sigreg_jepa_lower_their_losses():
    # MAE: predicting 0 (each patch's mean) scores about 1 on normalised pixels; learning goes below
    mae = [row["loss"] for row in T.train(T.TrainConfig(steps=30, method="mae", loss="mse", **TINY), progress=False).log]
    assert sum(mae[:3]) / 3 > 0.9 and sum(mae[-5:]) / 5 < 0.85 * sum(mae[:3]) / 3
    # SIGReg: both parts are logged, and the regulariser falls from its start (every token alike)
    log = T.train(T.TrainConfig(steps=30, method="sigreg", sigreg_slices=32, **TINY), progress=False).log
    sig = [row["loss_sigreg"] for row in log]
    assert {"loss_prediction", "loss_sigreg"} <= set(log[0]) and sum(sig[-5:]) / 5 < 0.5 * sum(sig[:3]) / 3
    assert sum(r["loss"] for r in log[-5:]) < 0.5 * sum(r["loss"] for r in log[:5])


@pytest.mark.parametrize("argv, message", [
    (["--model", "huge"], "unknown preset 'huge'"),
    (["--masking", "random"], "unknown masking 'random'"),
    (["--feature-norm", "rms"], "unknown feature norm 'rms'"),
    (["--loss", "l1"], "unknown loss 'l1'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--resume", "--out", "/nonexistent/run"], "--resume: no checkpoint at /nonexistent/run/checkpoint.pt"),
    (["--dataset", "/no/such/folder"], "not a known dataset"),
    (["--steps", "5", "--minutes", "2"], "exactly one of --steps, --epochs, --minutes"),
    (["--minutes", "2", "--stop-after", "5"], "--stop-after needs --steps or --epochs: a --minutes run cannot be resumed"),
    (["--predictor-depth", "0"], "predictor_depth=0: must be at least 1"),
    (["--predictor-dim", "90"], "predictor_dim=90: must be a positive multiple of 4"),
    (["--num-targets", "0"], "--num-targets must be at least 1, got 0"),
    (["--ema", "0.5", "1.5"], "--ema momenta must be from 0 to 1"),
    (["--predictor-norm", "rms"], "unknown predictor norm 'rms'"),
    (["--method", "mae", "--loss", "mse", "--predictor-norm", "free"], "--method mae's decoder predicts pixels"),
    (["--num-targets", "2", "--masking", "window"], "--num-targets and --context-scale apply to multiblock masking only, not 'window'"),
    (["--shift", "-1"], "--shift must be from 0 to less than half the resolution (32), got -1"),
    (["--shift", "16", "--resolution", "32", "--patch-size", "4"], "less than half the resolution (16), got 16"),
])
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_demo_recipe_is_a_fixed_number_of_steps():
    assert (T.parse_args([]).steps, T.parse_args([]).minutes) == (T.DEMO_STEPS, None)  # same schedules on any machine
    assert (T.parse_args(["--minutes", "3"]).steps, T.parse_args(["--epochs", "2"]).steps) == (None, None)


def test_every_config_field_is_a_flag_and_no_flags_give_the_demo_recipe(tmp_path):
    assert set(vars(T.build_parser().parse_args([]))) == {f.name for f in dataclasses.fields(T.TrainConfig)}
    assert T.parse_args([]) == T.TrainConfig(steps=T.DEMO_STEPS, out="checkpoints/demo")
    everything = T.parse_args([
        "--dataset", "cifar10", "--num-images", "100", "--resolution", "96", "--model", "tiny",
        "--predictor-dim", "96", "--predictor-depth", "2", "--patch-size", "16", "--masking", "multiblock",
        "--num-targets", "2", "--packing", "--feature-norm", "batchnorm", "--loss", "mse", "--condition-encoders",
        "--predictor-norm", "layernorm", "--method", "ijepa", "--mask-ratio", "0.6", "--sigreg-weight", "0.1", "--sigreg-slices", "64",
        "--shift", "3", "--flip", "--steps", "7", "--batch-size", "32", "--lr", "0.001", "--warmup", "0.2",
        "--weight-decay", "0.1", "0.3", "--ema", "0.99", "1", "--grad-clip", "1.5", "--seed", "4", "--out", "x",
        "--checkpoint-every", "9", "--log-every", "3", "--stop-after", "5", "--compile", "--device", "cpu",
        "--workers", "2"])
    assert everything == T.TrainConfig(
        dataset="cifar10", num_images=100, resolution=96, model="tiny", predictor_dim=96, predictor_depth=2,
        patch_size=16, masking="multiblock", num_targets=2, packing=True, feature_norm="batchnorm", loss="mse",
        condition_encoders=True, predictor_norm="layernorm", method="ijepa", mask_ratio=0.6, sigreg_weight=0.1, sigreg_slices=64,
        shift=3, flip=True, steps=7, batch_size=32, lr=0.001, warmup=0.2,
        weight_decay=(0.1, 0.3), ema=(0.99, 1.0), grad_clip=1.5, seed=4, out="x", checkpoint_every=9, log_every=3,
        stop_after=5, compile=True, device="cpu", workers=2)
    assert type(everything.predictor_dim) is int and type(everything.lr) is float and type(everything.ema[1]) is float
    (tmp_path / "checkpoint.pt").touch()
    assert T.parse_args(["--resume", "--out", str(tmp_path)]).resume
    assert (T.parse_args(["--epochs", "2.5"]).epochs, T.parse_args(["--minutes", "3"]).minutes) == (2.5, 3.0)
    assert not T.parse_args(["--no-packing"]).packing


def test_num_targets_reaches_the_sampler():
    masking = T.parse_args(["--num-targets", "2"]).make_masking()
    g = torch.Generator().manual_seed(0)
    assert masking.num_targets == 2 and all(len(masking(8, 8, g).blocks) <= 2 for _ in range(50))
    assert T.TrainConfig().make_masking().num_targets == 4  # the demo recipe's


def test_context_scale_reaches_the_sampler_and_bad_ranges_are_refused():
    g = torch.Generator().manual_seed(0)
    assert T.TrainConfig().make_masking().context_scale == (0.85, 1.0)  # the demo recipe's
    small = T.parse_args(["--context-scale", "0.3", "0.5"]).make_masking()
    assert small.context_scale == (0.3, 0.5)
    # with the targets cut out, a smaller context block leaves fewer context patches on every draw
    default = T.TrainConfig().make_masking()
    def mean_context(masking):
        return sum(len(masking(8, 8, g).context) for _ in range(200)) / 200

    assert mean_context(small) < 0.6 * mean_context(default)
    for low, high in ((0.5, 0.3), (0.0, 0.5), (0.5, 1.2)):
        with pytest.raises(ValueError, match="--context-scale"):
            T.TrainConfig(context_scale=(low, high)).make_masking()
    with pytest.raises(ValueError, match="multiblock masking only"):
        T.TrainConfig(masking="window", context_scale=(0.3, 0.5)).make_masking()
    with pytest.raises(ValueError, match="--context-scale apply to the JEPAs"):
        T.TrainConfig(method="mae", loss="mse", context_scale=(0.3, 0.5)).make_masking()


def test_predictor_flags_size_the_predictor():
    model = M.IJEPA(T.parse_args(["--predictor-dim", "96", "--predictor-depth", "2"]).jepa_config())
    assert len(model.predictor.blocks) == 2 and model.predictor.embed.out_features == 96
    model = M.IJEPA(T.parse_args([]).jepa_config())  # the preset's: micro predicts with 3 blocks of 64
    assert len(model.predictor.blocks) == 3 and model.predictor.embed.out_features == 64


def _ddp_worker(rank, port, out, run, clock_speed):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    if rank == 1 and clock_speed != 1.0:  # this rank's clock runs faster than rank 0's
        real = time.perf_counter
        T.time.perf_counter = lambda: clock_speed * real()
    result = T.train(T.TrainConfig(device="cpu", **{**TINY, **run}), progress=False)
    torch.save({"weights": weights(result.model), "steps": result.steps, "total": result.total_steps},
               os.path.join(out, f"rank{rank}.pt"))


def start_two_ranks(worker, args, timeout):
    """Run worker(rank, port, *args) on two gloo ranks; fail (not hang) if one ends up waiting for the other."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.start_processes(worker, args=(port, *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two ranks did not finish in {timeout} s: one waits for the other")


def run_two_ranks(tmp_path, run, clock_speed=1.0, timeout=300):
    """Train on two gloo ranks; fail (not hang) if one rank ends up waiting for the other."""
    start_two_ranks(_ddp_worker, (str(tmp_path), run, clock_speed), timeout)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_ranks_agree(a, b):
    assert (a["steps"], a["total"]) == (b["steps"], b["total"])
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    fresh = T.M.IJEPA(T.TrainConfig(**TINY).jepa_config())
    assert not torch.equal(a["weights"]["student.blocks.0.attn.qkv.weight"], fresh.student.blocks[0].attn.qkv.weight)


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    assert_ranks_agree(*run_two_ranks(tmp_path, {"steps": 3}))


def _ddp_nan_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    real, calls = T.training_step, []

    def step(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if rank == 1 and len(calls) == 2:  # rank 1 alone diverges, at step 1
            result.loss = torch.tensor(float("nan"))
        return result

    T.training_step = step
    try:
        T.train(T.TrainConfig(steps=4, device="cpu", **TINY), progress=False)
        outcome = "finished"
    except FloatingPointError as e:
        outcome = str(e)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


def test_two_process_ddp_a_nan_on_one_rank_stops_both(tmp_path):
    # Every rank checks the loss averaged over the ranks: both stop at the same step, neither waits.
    start_two_ranks(_ddp_nan_worker, (str(tmp_path),), timeout=120)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith("loss is nan at step 1")


DDP_PACKED = {"epochs": 1.0, "packing": True, "num_images": 64, "resolution": 64, "seed": 4}


def test_two_process_ddp_packed_epochs_follow_rank_0():
    # Each rank packs its own shard; here the two shards pack into different numbers of batches,
    # so ranks that counted their own epoch would disagree on the run's length.
    cfg = T.TrainConfig(**{**TINY, **DDP_PACKED})
    dataset = T.build_dataset(cfg)
    per_rank = [sum(1 for _ in T.build_stream(cfg, dataset, rank, 2)) for rank in (0, 1)]
    assert per_rank[0] != per_rank[1], per_rank


def test_two_process_ddp_packed_epochs_train_identically(tmp_path):
    cfg = T.TrainConfig(**{**TINY, **DDP_PACKED})
    rank0_batches = sum(1 for _ in T.build_stream(cfg, T.build_dataset(cfg), 0, 2))
    a, b = run_two_ranks(tmp_path, DDP_PACKED)
    assert a["total"] == rank0_batches  # 1 epoch of rank 0's stream
    assert_ranks_agree(a, b)


def test_two_process_ddp_minutes_follow_rank_0_clock(tmp_path):
    # Rank 1's clock runs 3x fast: alone, it would size a run a third as long as rank 0's.
    a, b = run_two_ranks(tmp_path, {"minutes": 0.15}, clock_speed=3.0)
    assert a["steps"] >= 4
    assert_ranks_agree(a, b)


@pytest.mark.parametrize("make, message", [
    (lambda folder: None, "no images"),
    (lambda folder: [(folder / "cat").mkdir(), (folder / "cat" / "a.png").write_bytes(b"not a png")], "no readable images"),
])
def test_unreadable_dataset_folder_is_one_line_without_traceback(tmp_path, make, message):
    folder = tmp_path / "images"
    folder.mkdir()
    make(folder)
    run = subprocess.run([sys.executable, "train.py", "--dataset", str(folder), "--steps", "1", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and message in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("train.py: error:"), run.stderr


def test_minutes_sizes_the_schedules_from_timed_steps(steady_clock):
    # The schedules are sized from the measured steps (the warm-up ramps from the second step on,
    # instead of crawling towards a 10**9-step run), they run to their end (the last learning rate
    # is near zero), and the deadline is kept.
    result = T.train(T.TrainConfig(minutes=0.05, **TINY), progress=False)
    lrs = [row["lr"] for row in result.log]
    assert result.steps >= 10 and result.total_steps == result.steps
    assert lrs[1] > 1e-4 * result.config.lr  # 10**9 steps would give 1e-9 of it
    assert lrs[-1] < 0.1 * max(lrs)
    assert result.seconds <= 0.05 * 60 + 0.1  # + the few clock reads after the last step


def test_schedules():
    assert T.lr_at(0, 100, 1e-3, 10) == pytest.approx(1e-4)
    assert T.lr_at(9, 100, 1e-3, 10) == pytest.approx(1e-3)
    assert T.lr_at(100, 100, 1e-3, 10, final=1e-6) == pytest.approx(1e-6)
    assert T.lr_at(55, 100, 1e-3, 10) == pytest.approx((1e-3 + 1e-6) / 2)
    assert T.weight_decay_at(0, 100) == pytest.approx(0.04) and T.weight_decay_at(100, 100) == pytest.approx(0.4)
    assert T.ema_momentum_at(0, 100) == pytest.approx(0.998) and T.ema_momentum_at(50, 100) == pytest.approx(0.999)
    assert T.ema_momentum_at(100, 100) == pytest.approx(1.0)


def test_param_groups_exclude_1d_and_mask_token_from_weight_decay():
    model = M.IJEPA(M.JEPAConfig(feature_norm="dyntanh"))
    decay, no_decay = T.param_groups(model)
    decay_ids, no_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert id(model.predictor.mask_token) in no_ids and id(model.student.norm.alpha) in no_ids
    assert id(model.student.blocks[0].attn.qkv.weight) in decay_ids
    assert all(p.ndim >= 2 for p in decay["params"])
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    assert not teacher_ids & (decay_ids | no_ids)
    trainable = {id(p) for p in model.student.parameters()} | {id(p) for p in model.predictor.parameters()}
    assert decay_ids | no_ids == trainable


def test_the_fused_adamw_makes_the_update_of_the_loop_over_parameters():
    """make_optimizer uses the fused AdamW (one kernel call for every parameter); it must make the
    update that the plain loop over parameters makes, weight-decay groups included."""
    torch.manual_seed(0)
    cfg = T.TrainConfig(weight_decay=(0.1, 0.1))
    fused_model = M.IJEPA(M.JEPAConfig())
    loop_model = M.IJEPA(M.JEPAConfig())
    loop_model.load_state_dict(fused_model.state_dict())
    fused = T.make_optimizer(fused_model, cfg)
    loop = torch.optim.AdamW(T.param_groups(loop_model), lr=cfg.lr, betas=T.ADAM_BETAS, weight_decay=cfg.weight_decay[0],
                             foreach=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    before = {name: p.clone() for name, p in fused_model.named_parameters() if p.requires_grad}
    for _ in range(3):
        for a, b in zip(fused_model.parameters(), loop_model.parameters()):
            if a.requires_grad:
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(not torch.equal(p, before[name]) for name, p in fused_model.named_parameters() if p.requires_grad)


def test_every_cosine_schedule_is_one_half_cosine():
    assert T.cosine(0.0, 2.0, 0.5) == 2.0 and T.cosine(1.0, 2.0, 0.5) == pytest.approx(0.5)
    assert T.cosine(0.5, 2.0, 0.5) == pytest.approx(1.25)  # half-way between, at the middle
    assert T.cosine(-1.0, 2.0, 0.5) == 2.0 and T.cosine(3.0, 2.0, 0.5) == pytest.approx(0.5)  # clamped
    warmup, total, peak = 10, 110, 1e-3
    assert T.lr_at(warmup, total, peak, warmup) == pytest.approx(peak)  # the decay starts at the peak
    assert T.lr_at(60, total, peak, warmup) == pytest.approx(T.cosine(0.5, peak, 1e-6))
    assert T.weight_decay_at(25, 100, 0.04, 0.4) == pytest.approx(T.cosine(0.25, 0.04, 0.4))


def test_command_line_errors_are_one_line(capsys):
    def fails():
        raise ValueError("first line\nsecond line")

    assert T.run_command("prog.py", fails) == 1
    assert capsys.readouterr().err == "prog.py: error: first line second line\n"
    assert T.run_command("prog.py", lambda: 0) == 0
    with pytest.raises(KeyError):  # a bug is not a user's mistake: it keeps its traceback
        T.run_command("prog.py", lambda: {}["missing"])


def small_folder(root, n=20, size=(28, 28), mode="L"):
    """A folder of two classes of n small images each (greyscale by default)."""
    from PIL import Image
    for c in ("zero", "one"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new(mode, size, 100 + i if mode == "L" else (100 + i, 20, 60)).save(root / c / f"{i}.png")
    return str(root)


def test_a_folder_without_flags_gets_the_folder_recipe_and_is_told_why(tmp_path, capsys):
    folder = small_folder(tmp_path / "digits")
    cfg = T.parse_args(["--dataset", folder])
    assert (cfg.resolution, cfg.patch_size, cfg.num_targets, cfg.shift, cfg.flip) == (64, 8, 2, 0, False)
    assert (cfg.steps, cfg.epochs) == (None, round(T.FOLDER_IMAGES_SEEN / 40, 1))  # the demo's images seen
    assert cfg.out == os.path.join("checkpoints", "digits")  # not over the scenes' demo checkpoint
    printed = capsys.readouterr().out
    assert "40 training images, median side 28 px, greyscale" in printed
    for shown in ("--resolution 64", "--patch-size 8", "--num-targets 2", "--epochs 3840.0", "--out checkpoints"):
        assert shown in printed
    assert T.parse_args(["--dataset", small_folder(tmp_path / "photos", mode="RGB")]).resolution == 64
    assert "colour" in capsys.readouterr().out


def test_a_flag_given_for_a_folder_overrides_the_recipe_and_what_follows_from_it(tmp_path, capsys):
    folder = small_folder(tmp_path / "digits")
    cfg = T.parse_args(["--dataset", folder, "--resolution", "32", "--steps", "5", "--out", "x"])
    assert (cfg.resolution, cfg.patch_size, cfg.steps, cfg.epochs, cfg.out) == (32, 4, 5, None, "x")
    printed = capsys.readouterr().out
    assert "--patch-size 4" in printed and "--resolution" not in printed and "--epochs" not in printed
    cfg = T.parse_args(["--dataset", folder, "--masking", "window", "--minutes", "2"])
    assert (cfg.num_targets, cfg.epochs, cfg.minutes) == (T.TrainConfig.num_targets, None, 2.0)
    cfg = T.parse_args(["--dataset", folder, "--num-targets", "4", "--patch-size", "16", "--shift", "3", "--flip"])
    assert (cfg.num_targets, cfg.patch_size, cfg.resolution, cfg.shift, cfg.flip) == (4, 16, 64, 3, True)


def test_the_folder_recipe_follows_image_size_and_folder_size():
    large = T.folder_recipe(data.FolderSummary("photos", images=50_000, side=300, greyscale=False))
    assert {k: v for k, (v, _) in large.items()} == {
        "resolution": 64, "patch_size": 8, "out": os.path.join("checkpoints", "photos"), "num_targets": 2, "epochs": 3.1}
    small = T.folder_recipe(data.FolderSummary("d", images=4_000, side=28, greyscale=True))
    assert small["epochs"][0] == 38.4 and "upscaled" in small["resolution"][1]
    assert T.folder_recipe(data.FolderSummary("d", images=100, side=28, greyscale=True), resolution=48)["patch_size"][0] == 6
    assert all(why for _, why in large.values())  # every choice says why
