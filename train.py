"""Pre-training I-JEPA: `python train.py` trains the demo recipe on the built-in scenes.

The work is one function, `train(TrainConfig)`, that the notebooks call too; the command line
maps its flags onto that config. Per step: a batch (ordinary or packed) from `packing.BatchStream`,
then `training_step` (forward, backward, AdamW, EMA) with the schedules below, pure functions of
the optimiser step.

    python train.py                                   # demo recipe: 1,200 steps, about 17 minutes on 2 CPU cores -> checkpoints/demo/
    python train.py --steps 200 --out checkpoints/run1
    python train.py --steps 400 --out checkpoints/run1 --resume
    python train.py --dataset data/digits             # a folder of images: the folder recipe, printed (folder_recipe)
    torchrun --nproc_per_node 2 train.py --steps 100   # DistributedDataParallel
"""

import argparse
import collections
import json
import math
import os
import shutil
import statistics
import sys
import time
import typing
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
from tqdm import tqdm  # the plain-text bar: it reads the same in a terminal, a notebook and a saved notebook

import data
import models as M
import packing as P
from evaluation.rankme import image_rankme, rankme
from studies import ec_ijepa, mae, sigreg


METHODS = ("ijepa", "mae", "pixels", "sigreg")
PIXEL_METHODS = ("mae", "pixels")  # the decoder predicts each hidden patch's pixels (studies/mae.py)
DEMO_STEPS = 1200  # the demo recipe's length when no --steps, --epochs or --minutes is given (12.8 epochs)
DEMO_OUT = "checkpoints/demo"  # where the command line writes when no --out is given


def option(default, help: str):
    """A TrainConfig field; the command line gets a flag --the-name with this help (`build_parser`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    dataset: str = option("scenes", "scenes (built in), stl10, cifar10, or a folder of class sub-folders")
    num_images: int = option(12_000, "training images of the built-in scenes")
    resolution: int = option(64, "image side in pixels (packing: the largest side)")
    model: str = option("micro", f"one of {sorted(M.PRESETS)}")
    predictor_dim: int | None = option(None, "predictor width (default: the preset's)")
    predictor_depth: int | None = option(None, "predictor blocks (default: the preset's)")
    patch_size: int = option(8, "patch side in pixels")
    masking: str = option("multiblock", f"one of {sorted(M.MASKINGS)}")
    num_targets: int = option(4, "multiblock masking: target blocks per image (2 leave a larger context on small grids)")
    context_scale: tuple = option((0.85, 1.0), "multiblock masking: the share of the image the context block covers, "
                                               "drawn from this range before the targets are cut out of it")
    packing: bool = option(False, "variable-resolution images packed into fixed-shape batches (packing.py)")
    feature_norm: str = option("layernorm", f"one of {M.FEATURE_NORMS}, the normalisation of the targets "
                                            f"(batchnorm: statistics over every rank's batch under torchrun)")
    loss: str = option("smooth_l1", f"one of {M.LOSSES}")
    predictor_norm: str = option("none", f"one of {M.PREDICTOR_NORMS}: what normalises the predictor's output "
                                         f"(none, as released; layernorm: trainable; free: without parameters)")
    condition_encoders: bool = option(False, "train the encoder-conditioned variant (studies/ec_ijepa.py)")
    method: str = option("ijepa", f"one of {METHODS}: I-JEPA, MAE (pixels of randomly masked patches, "
                                  f"studies/mae.py; needs --loss mse), pixels (I-JEPA's masks and predictor with "
                                  f"MAE's pixel targets: the I-JEPA paper's Table 7 ablation; needs --loss mse) or a "
                                  f"JEPA without teacher kept from collapse by SIGReg (studies/sigreg.py)")
    mask_ratio: float = option(mae.MASK_RATIO, "--method mae: the share of patches hidden (random masking)")
    sigreg_weight: float = option(sigreg.SIGREG_WEIGHT, "--method sigreg: lambda in (1 - lambda) prediction + lambda SIGReg")
    sigreg_slices: int = option(sigreg.SIGREG_SLICES, "--method sigreg: random directions SIGReg tests per step")
    shift: int = option(0, "augmentation: translate each training image by up to N pixels (0: none)")
    flip: bool = option(False, "augmentation: mirror each training image left-right half of the time")
    steps: int | None = option(None, f"length of the run in steps; give one of --steps, --epochs, --minutes "
                                     f"(none of them: the demo recipe's {DEMO_STEPS} steps)")
    epochs: float | None = option(None, "length of the run in passes over the training images")
    minutes: float | None = option(None, "length of the run in minutes of wall-clock time; the schedules follow "
                                         "the measured steps, so such a run cannot be resumed")
    batch_size: int = option(128, "images per step (packing: rows are sized to hold about this many)")
    lr: float = option(2e-3, "peak learning rate")
    warmup: float = option(0.1, "fraction of the run spent warming up the learning rate")
    weight_decay: tuple = option((0.04, 0.4), "weight decay, start -> end (cosine)")
    ema: tuple = option((0.998, 1.0), "teacher momentum, start -> end (the official recipe: 0.996 -> 1.0)")
    grad_clip: float = option(0.0, "clip the gradient norm to this (0: no clipping, as the official recipe)")
    seed: int = option(0, "seed of the initial weights, of the images' order and of every size, mask and augmentation")
    out: str | None = option(None, f"folder for checkpoint.pt and log.jsonl (command line default: {DEMO_OUT})")
    resume: bool = option(False, "continue the run in --out from its checkpoint")
    checkpoint_every: int = option(200, "write the checkpoint every so many steps")
    log_every: int = option(10, "log a row (loss, schedules, RankMe, ...) every so many steps")
    stop_after: int | None = option(None, "stop this invocation after so many steps (resume later)")
    compile: bool = option(False, "torch.compile the forward; with --packing every batch has one shape and it "
                                  "compiles once, without it the padded lengths vary and it compiles a second, "
                                  "dynamic-shape graph")
    device: str = option("auto", "auto (cuda if there is one, else cpu), cpu, cuda, ...")
    workers: int = option(0, "DataLoader worker processes that prepare the images (any number gives the same batches)")

    def jepa_config(self) -> M.JEPAConfig:
        return M.JEPAConfig(model=self.model, patch_size=self.patch_size, feature_norm=self.feature_norm,
                            loss=self.loss, predictor_dim=self.predictor_dim, predictor_depth=self.predictor_depth,
                            predictor_norm=self.predictor_norm)

    def make_masking(self):
        """The mask sampler this run trains with (models.make_masking, with num_targets for multiblock;
        MAE's random masking for --method mae; --method pixels keeps the JEPAs' masks)."""
        multiblock_only = (self.num_targets != TrainConfig.num_targets
                           or tuple(self.context_scale) != TrainConfig.context_scale)
        if self.method == "mae":
            if self.masking != TrainConfig.masking or multiblock_only:
                raise ValueError("--method mae hides a random share of the patches (--mask-ratio); "
                                 "--masking, --num-targets and --context-scale apply to the JEPAs")
            return mae.RandomMasking(self.mask_ratio)
        if self.masking != "multiblock":
            if multiblock_only:
                raise ValueError(f"--num-targets and --context-scale apply to multiblock masking only, not {self.masking!r}")
            return M.make_masking(self.masking)
        if self.num_targets < 1:
            raise ValueError(f"--num-targets must be at least 1, got {self.num_targets}")
        low, high = self.context_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"--context-scale LOW HIGH: shares of the image with 0 < LOW <= HIGH <= 1, got {low} {high}")
        return M.make_masking(self.masking, num_targets=self.num_targets, context_scale=(low, high))


def build_model(cfg: TrainConfig) -> M.IJEPA:
    """The model a config trains: I-JEPA, its encoder-conditioned variant (studies/ec_ijepa.py),
    MAE (studies/mae.py; with I-JEPA's masks for --method pixels) or the SIGReg JEPA
    (studies/sigreg.py). Each builds its student first, from the same draws, so one seed gives every
    method the same initial encoder."""
    if cfg.method in PIXEL_METHODS:  # "pixels": the same model; only its masks differ (make_masking)
        return mae.MAE(cfg.jepa_config())
    if cfg.method == "sigreg":
        return sigreg.SIGRegJEPA(cfg.jepa_config(), cfg.sigreg_weight, cfg.sigreg_slices)
    return (ec_ijepa.ConditionedIJEPA if cfg.condition_encoders else M.IJEPA)(cfg.jepa_config())


def initial_model(cfg: TrainConfig) -> M.IJEPA:
    """The model at the exact weights `train(cfg)` starts from (drawn with cfg.seed), e.g. the
    random-init baseline of a trained checkpoint. The caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg)


STEP_WINDOW = 200  # --minutes: the run is sized from the median duration of the last so many steps
RANKME_IMAGES = 256  # fixed training images whose mean-pooled teacher features give the logged RankMe
# AdamW's betas: (0.9, 0.95) here, where the official code keeps PyTorch's default (0.9, 0.999). A
# shorter memory of the squared gradients suits the short, high-LR runs of a CPU (a common choice for ViTs).
ADAM_BETAS = (0.9, 0.95)

# Fields that may differ when resuming; every other field must match the checkpoint's.
RESUMABLE = {"out", "resume", "checkpoint_every", "log_every", "stop_after", "compile", "device", "workers"}


def check_config(cfg: TrainConfig) -> None:
    """Raise a ValueError naming the flag and what is allowed."""
    cfg.jepa_config()  # preset, feature norm and loss names
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {METHODS}")
    if cfg.method in PIXEL_METHODS and cfg.loss != "mse":
        raise ValueError(f"--method {cfg.method} regresses pixels with the mean squared error, as MAE does: add --loss mse")
    if cfg.method in PIXEL_METHODS and cfg.predictor_norm != "none":
        raise ValueError(f"--predictor-norm normalises predicted features; --method {cfg.method}'s decoder predicts pixels")
    if not all(0 <= m <= 1 for m in cfg.ema):
        raise ValueError(f"--ema momenta must be from 0 to 1 (0: the teacher is the student, 1: it never moves), "
                         f"got {cfg.ema}")
    if cfg.method != "ijepa" and cfg.condition_encoders:
        raise ValueError(f"--condition-encoders conditions I-JEPA's two encoders; --method {cfg.method} has one")
    cfg.make_masking()  # MAE's mask ratio too
    sigreg.check_settings(cfg.sigreg_weight, cfg.sigreg_slices)
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if sum(x is not None for x in (cfg.steps, cfg.epochs, cfg.minutes)) != 1:
        raise ValueError("give exactly one of --steps, --epochs, --minutes")
    for name in ("steps", "epochs", "minutes"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.minutes is not None and cfg.stop_after:
        raise ValueError("--stop-after needs --steps or --epochs: a --minutes run cannot be resumed")
    if cfg.resume and not cfg.out:
        raise ValueError("--resume needs --out DIR, the folder holding checkpoint.pt")
    if cfg.resume and not os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        raise ValueError(f"--resume: no checkpoint at {os.path.join(cfg.out, 'checkpoint.pt')}; "
                         f"start without --resume or point --out at an earlier run")
    if not 0 <= cfg.shift < cfg.resolution // 2:
        raise ValueError(f"--shift must be from 0 to less than half the resolution ({cfg.resolution // 2}), got {cfg.shift}")
    if cfg.resolution % cfg.patch_size:
        raise ValueError(f"--resolution {cfg.resolution} must be a multiple of the patch size {cfg.patch_size}")


# -----------------------------------------------------------------------------------------------
# Optimiser and schedules (pure functions of the optimiser step, so nothing can be stepped twice)


def param_groups(model: M.IJEPA) -> list:
    """AdamW groups over the trainable parts (student and predictor): weight decay on matrices
    only; none on 1-D tensors (biases, norms, DynTanh alpha) or the mask token. The fixed sin-cos
    positions are not parameters at all. Groups carry `apply_wd` so the schedule can set them."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def make_optimizer(model: M.IJEPA, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the student and predictor, weight decay on matrices only (`param_groups`). The
    fused implementation updates every parameter in one kernel call: the same update as the loop
    over parameters, 3x faster on a CPU (35 ms of a 2-s step at benchmarks/train_step.py's size)."""
    return torch.optim.AdamW(param_groups(model), lr=cfg.lr, betas=ADAM_BETAS, weight_decay=cfg.weight_decay[0],
                             fused=True)


def cosine(progress: float, start: float, end: float) -> float:
    """Half a cosine from `start` (progress 0) to `end` (progress 1 and beyond): flat at both ends,
    fastest in the middle. Every cosine schedule of the project is this one."""
    progress = min(1.0, max(0.0, progress))
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def lr_at(step: int, total: int, peak: float, warmup: int, final: float = 1e-6) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `final`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine((step - warmup) / max(1, total - warmup), peak, final)


def weight_decay_at(step: int, total: int, start: float = 0.04, end: float = 0.4) -> float:
    """Cosine from `start` to `end` over the run (the official schedule grows it)."""
    return cosine(step / max(1, total), start, end)


def ema_momentum_at(step: int, total: int, start: float = 0.998, end: float = 1.0) -> float:
    """Linear from `start` to `end` over the run (the official recipe starts at 0.996)."""
    return start + (end - start) * min(1.0, step / max(1, total))


def set_schedules(optimizer, cfg: TrainConfig, step: int, total: int) -> dict:
    """Set this step's learning rate and weight decay; return them with the EMA momentum."""
    lr = lr_at(step, total, cfg.lr, max(1, int(cfg.warmup * total)))
    wd = weight_decay_at(step, total, *cfg.weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["apply_wd"]:
            group["weight_decay"] = wd
    return {"lr": lr, "weight_decay": wd, "ema_momentum": ema_momentum_at(step, total, *cfg.ema)}


# -----------------------------------------------------------------------------------------------
# One step


@dataclass
class StepResult:
    loss: torch.Tensor  # detached
    output: M.JEPAOutput
    grad_norms: dict  # per block, when asked for


def block_grad_norms(model: M.IJEPA) -> dict:
    """L2 norm of the gradient of every student and predictor block (and the embeddings)."""
    norms = {}
    for prefix, module in (("student", model.student), ("predictor", model.predictor)):
        for i, block in enumerate(module.blocks):
            grads = [p.grad for p in block.parameters() if p.grad is not None]
            norms[f"{prefix}.{i}"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
    return norms


def target_spread(targets: torch.Tensor) -> float:
    """How much the regression targets differ from token to token, whatever their scale: the
    per-channel standard deviation over tokens, averaged over channels, over the root mean square
    of every entry. targets (T, D) -> a number from 0 (every token has the same target: collapse)
    to about 1 (zero-mean features that vary from token to token as much as they are large)."""
    return float(targets.std(0).mean() / targets.pow(2).mean().sqrt().clamp_min(1e-12))


# Collapse: every token gets nearly the same target, so the student can predict it without looking
# at the image, and the loss falls while the encoder learns nothing. The spread of the targets
# (`target_spread`) shows it where the loss cannot; notebooks/Failure_Modes.ipynb measures the
# threshold on runs that collapse and runs that do not.
COLLAPSE_SPREAD = 0.2


def collapse_warning(row: dict) -> str | None:
    """The warning a logged row earns (its targets' spread below COLLAPSE_SPREAD), or None."""
    spread = row.get("target_spread")
    if spread is None or spread >= COLLAPSE_SPREAD:
        return None
    return (f"warning: the run looks collapsed at step {row['step']}: the targets' spread (target_spread in the log) "
            f"is {spread:.3f}, below {COLLAPSE_SPREAD}: every token gets nearly the same target, so a low loss "
            f"({row['loss']:.4f}) says nothing. Try: keep the stop-gradient and a moving EMA teacher "
            f"(--ema 0.998 1.0), LayerNorm targets (--feature-norm layernorm), a lower --lr; and probe a checkpoint "
            f"(python evaluate.py probe) before trusting the loss. notebooks/Failure_Modes.ipynb shows what collapse "
            f"looks like")


def training_step(model: M.IJEPA, optimizer: torch.optim.Optimizer, batch: M.MaskedBatch, momentum: float,
                  forward=None, grad_clip: float = 0.0, grad_norms: bool = False) -> StepResult:
    """One step: forward (teacher, student, predictor, loss), backward, AdamW, EMA of the teacher.

    `forward` runs the model (a `torch.compile`d or DistributedDataParallel wrapper, say); by
    default the model itself. On CUDA the forward runs under bf16 autocast."""
    device = batch.context_patches.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = (model if forward is None else forward)(batch)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    norms = block_grad_norms(model) if grad_norms else {}
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    model.update_teacher(momentum)
    return StepResult(out.loss.detach(), out, norms)


# -----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """The checkpoint's contents, read with weights_only=True (tensors and plain values only: no
    code in the file can run). The error says which of the ways it can fail this is."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e):  # torch's only sign that weights_only refused a class the file names
            raise ValueError(f"checkpoint {path!r} was refused by torch.load(weights_only=True): it holds Python "
                             f"objects besides tensors and plain values, and loading those could run code from the "
                             f"file; load it with weights_only=False only if you trust where it comes from") from e
        raise ValueError(f"cannot read checkpoint {path!r}: it is not a PyTorch file, or it is truncated or corrupt "
                         f"({type(e).__name__}: {e}); delete it and start again, or resume from a good copy") from e


def read_log(folder: str) -> list:
    """The rows of a run's log.jsonl (one dict per logged step, as `train` writes them)."""
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def missing_keys(ckpt, keys) -> list:
    """The keys a checkpoint lacks of those given (all of them if it is not a dict)."""
    return [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]


def config_differences(saved: dict, cfg: TrainConfig) -> list:
    now, defaults = asdict(cfg), asdict(TrainConfig())  # a field newer than the checkpoint had its default
    return [f"{k}: checkpoint {saved.get(k, defaults[k])!r} vs now {now[k]!r}" for k in now
            if k not in RESUMABLE and _plain(saved.get(k, defaults[k])) != _plain(now[k])]


def _plain(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def checkpoint_config(ckpt: dict) -> TrainConfig:
    """The TrainConfig stored in a loaded checkpoint (fields newer than the file take their defaults)."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items() if k in known})


def model_from_checkpoint(path: str, device="cpu") -> tuple:
    """(IJEPA with the checkpoint's weights, its TrainConfig) — for notebooks and scripts."""
    ckpt = load_checkpoint(path)
    missing = missing_keys(ckpt, ("config", "student", "teacher", "predictor"))
    if missing:
        raise ValueError(f"{path!r} is not a checkpoint of train.py (it lacks {', '.join(missing)})")
    cfg = checkpoint_config(ckpt)
    model = build_model(cfg)
    try:
        for part in ("student", "teacher", "predictor"):
            getattr(model, part).load_state_dict(ckpt[part])
    except RuntimeError as e:
        raise ValueError(f"{path!r}: the weights do not fit the configuration stored with them ({str(e).splitlines()[0]}); "
                         f"the file was written by another version of this code: train it again") from e
    return model.to(device), cfg


# The committed reference model: the weights of a long run of this file (how it was made:
# checkpoints/reference/README.md). The demo checkpoint is what `python train.py` writes.
REFERENCE_CHECKPOINT = "checkpoints/reference/checkpoint.pt"
DEMO_CHECKPOINT = os.path.join(DEMO_OUT, "checkpoint.pt")
WEIGHTS = ("config", "step", "total_steps", "student", "teacher", "predictor")  # what export_weights keeps
RUN_STATE = ("optimizer", "epoch", "in_epoch", "rng")  # what a run needs besides them to go on


def export_weights(src: str, dst: str) -> None:
    """Copy a training checkpoint without its optimiser state and log: config, step and the three
    networks, the part a trained model needs. Written atomically."""
    ckpt = load_checkpoint(src)
    missing = missing_keys(ckpt, WEIGHTS)
    if missing:
        raise ValueError(f"{src!r} is not a checkpoint of train.py (it lacks {', '.join(missing)})")
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    save_checkpoint(dst, {k: ckpt[k] for k in WEIGHTS})


def reference_model(path: str = REFERENCE_CHECKPOINT, device="cpu") -> tuple:
    """(IJEPA, TrainConfig) of the committed reference model. A missing, truncated or mismatched file
    raises an error that says how to get it back."""
    how = ("restore it with `git checkout -- checkpoints/reference` or rebuild it with the commands in "
           "checkpoints/reference/README.md")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the reference model {path!r} is missing: {how}")
    try:
        return model_from_checkpoint(path, device)
    except ValueError as e:
        raise ValueError(f"the reference model is unusable: {e}. Instead: {how}") from e


def default_checkpoint() -> str:
    """The checkpoint scripts and notebooks use when none is given: the reference model if it is there,
    else the demo checkpoint, trained first (with a progress bar) if it is missing too."""
    if os.path.exists(REFERENCE_CHECKPOINT):
        return REFERENCE_CHECKPOINT
    print(f"no reference model at {REFERENCE_CHECKPOINT}: using the demo checkpoint {DEMO_CHECKPOINT}")
    return checkpoint_or_train(DEMO_CHECKPOINT, TrainConfig(steps=DEMO_STEPS))


def check_resumable(ckpt: dict, path: str) -> None:
    """Raise a ValueError, saying what to do instead, if a checkpoint holds no run that can go on."""
    missing = missing_keys(ckpt, WEIGHTS + RUN_STATE)
    if missing:
        raise ValueError(f"cannot resume from {path}: it lacks {', '.join(missing)} (the weights alone, as "
                         f"export_weights writes them, are a model, not a run that can go on); train afresh")
    if ckpt["total_steps"] is None:
        raise ValueError(f"{path} was written part-way through a --minutes run (at step {ckpt['step']}), which "
                         f"cannot be resumed: its schedules were sized by its own clock. Train afresh without "
                         f"--resume; a run given its length with --steps or --epochs can be stopped and resumed")


def run_length(cfg: TrainConfig) -> str:
    """The length of the run a config asks for, in words."""
    return next(f"{value} {name}" for name, value in (("steps", cfg.steps), ("epochs", cfg.epochs), ("minutes", cfg.minutes))
                if value is not None)


def checkpoint_or_train(path: str, cfg: TrainConfig, keep_steps=()) -> str:
    """`path` if it holds a finished run; otherwise train `cfg` into path's folder first, and say so.
    A run that stopped part-way (interrupted, or --stop-after) is resumed, not used as it is (a
    --minutes run cut short cannot be: the error says what to do instead).

    keep_steps: steps at which a copy of the checkpoint is kept beside it as `step-N.pt` (what
    benchmarks/probe_vs_steps.py probes). The run is trained in segments that stop at each of them
    (--stop-after), which gives the same run as one invocation: resuming is exact."""
    out = os.path.dirname(path)
    for at in sorted(keep_steps):
        copy = os.path.join(out, f"step-{at}.pt")
        if os.path.exists(copy):
            continue
        done = load_checkpoint(path)["step"] if os.path.exists(path) else 0
        if done > at:
            raise ValueError(f"{path} is already at step {done}, past {at}: its step-{at}.pt can no longer be "
                             f"kept; train afresh into another folder, or drop {at} from the steps to keep")
        if done < at:
            print(f"training {out} to step {at} (a copy of the checkpoint is kept there)")
            train(TrainConfig(**{**asdict(cfg), "out": out, "resume": done > 0, "stop_after": at - done}))
        shutil.copyfile(path, copy + ".tmp")
        os.replace(copy + ".tmp", copy)  # a copy is whole or absent, as the checkpoint itself
    if not os.path.exists(path):
        print(f"no checkpoint at {path}: training one now ({run_length(cfg)} of {cfg.model} into {out})")
        train(TrainConfig(**{**asdict(cfg), "out": out}))
        return path
    state = load_checkpoint(path)
    total = state.get("total_steps", 0)  # None: written part-way through a --minutes run
    if total is None or state.get("step", 0) < total:
        check_resumable(state, path)
        print(f"{path} stopped at step {state['step']} of {total}: resuming it")
        train(TrainConfig(**{**asdict(cfg), "out": out, "resume": True}))
    return path


# -----------------------------------------------------------------------------------------------
# The run


def build_dataset(cfg: TrainConfig):
    """The training images. The built-in scenes are rendered once here, so that DataLoader
    workers share them instead of rendering them again."""
    if cfg.dataset == "scenes":
        images, labels = data.SceneDataset(cfg.num_images, resolution=cfg.resolution, split="train",
                                           seed=cfg.seed).tensors()
        return list(zip(data.normalize(images), labels.tolist()))
    ds = data.get_dataset(cfg.dataset, split="train", resolution=cfg.resolution)
    return NormalizedDataset(ds)


class NormalizedDataset(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        return data.normalize(item["image"][None])[0], int(item.get("label", -1))


def build_stream(cfg: TrainConfig, dataset, rank=0, world=1) -> P.BatchStream:
    masking = cfg.make_masking()
    packing = None
    if cfg.packing:
        probe = P.PackingConfig.balanced(masking, patch_size=cfg.patch_size, side_range=(cfg.resolution // 2, cfg.resolution),
                                         min_side=4 * cfg.patch_size, max_area=cfg.resolution ** 2,
                                         image_size=(cfg.resolution, cfg.resolution),
                                         row_tokens=2 * (cfg.resolution // cfg.patch_size) ** 2)
        # rows for about batch_size images: measured tokens per image over the measured occupancy
        sizes = [P.random_size(cfg.resolution, cfg.resolution, probe, torch.Generator().manual_seed(i)) for i in range(200)]
        tokens = statistics.mean(h * w for h, w in sizes) / cfg.patch_size ** 2
        rows = max(1, round(cfg.batch_size * tokens / ((probe.context_len + probe.hidden_len) * 0.93)))
        packing = P.PackingConfig(**{**asdict(probe), "rows": rows})
    augment = data.RandomShiftFlip(cfg.shift, cfg.flip) if cfg.shift or cfg.flip else None
    return P.BatchStream(dataset, masking, cfg.patch_size, packing, cfg.batch_size, cfg.seed, rank=rank, world=world,
                         augment=augment, workers=cfg.workers)


def batches_forever(stream, epoch: int, skip: int):
    """(epoch, index in epoch, batch) without end, starting `skip` batches into `epoch`: a resumed
    run replays the data pipeline up to where it stopped, so it sees exactly the same batches
    (with any number of workers: see packing.BatchStream)."""
    while True:
        stream.set_epoch(epoch)
        for i, batch in enumerate(stream):
            if i >= skip:
                yield epoch, i, batch
        epoch, skip = epoch + 1, 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrainResult:
    model: M.IJEPA
    log: list  # the logged rows (also in out/log.jsonl)
    losses: list  # the loss of every step of this invocation
    steps: int  # the step reached
    total_steps: int  # the schedules' length (with --minutes, the final estimate: = steps)
    seconds: float  # this invocation's wall-clock time (the log's "seconds" counts the whole run, over resumes)
    config: TrainConfig


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    check_config(cfg)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = resolve_device(cfg.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)

    def from_rank0(value: int) -> int:
        """Every rank follows rank 0 on the run's length: ranks that sized it themselves (their own
        packed stream, their own clock) would follow different schedules, drift apart, and the
        rank that runs longer would wait forever in an all-reduce."""
        if not distributed:
            return value
        t = torch.tensor([value], dtype=torch.long, device=device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(t, src=0)
        return int(t)

    torch.manual_seed(cfg.seed)
    model = initial_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    dataset = build_dataset(cfg)
    rankme_images = torch.stack([dataset[i][0] for i in range(min(RANKME_IMAGES, len(dataset)))]).to(device)
    stream = build_stream(cfg, dataset, rank, world)
    step, epoch, in_epoch, total = 0, 0, 0, None
    seconds_before = 0.0  # the run's training time before this invocation (a resumed run's earlier segments)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt") if cfg.out else None
    log_path = os.path.join(cfg.out, "log.jsonl") if cfg.out else None
    if cfg.out and rank == 0:
        os.makedirs(cfg.out, exist_ok=True)

    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        check_resumable(ckpt, ckpt_path)
        saved_world = ckpt.get("world", world)  # older checkpoints did not store it
        if saved_world != world:
            raise ValueError(f"{ckpt_path} was written by {saved_world} process(es), this run has {world}: each "
                             f"process trains on its own share of the images, so another number would see other "
                             f"batches. Resume with torchrun --nproc_per_node {saved_world} (1: plain python), or "
                             f"train afresh into another --out")
        diff = config_differences(ckpt["config"], cfg)
        if diff:
            raise ValueError(f"{ckpt_path} was written with another configuration; differing fields: "
                             f"{'; '.join(diff)}. Resume with the same flags, or train afresh into another --out")
        model.student.load_state_dict(ckpt["student"])
        model.teacher.load_state_dict(ckpt["teacher"])
        model.predictor.load_state_dict(ckpt["predictor"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, in_epoch, total = ckpt["step"], ckpt["epoch"], ckpt["in_epoch"], ckpt["total_steps"]
        torch.set_rng_state(ckpt["rng"])
        seconds_before = ckpt.get("seconds", 0.0)  # older checkpoints did not count it
    elif log_path and rank == 0 and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log

    forward = model
    if distributed:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)

    def checkpoint_state():
        return {"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
                "predictor": model.predictor.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "epoch": epoch, "in_epoch": in_epoch, "total_steps": total, "world": world,
                "config": {k: _plain(v) for k, v in asdict(cfg).items()}, "rng": torch.get_rng_state(),
                "seconds": seconds_before + time.perf_counter() - start}

    if total is None and cfg.steps is not None:
        total = cfg.steps
    if total is None and cfg.epochs is not None:
        per_epoch = sum(1 for _ in build_stream(cfg, dataset, rank, world)) if cfg.packing else \
            math.ceil(len(dataset) / world / cfg.batch_size)
        total = from_rank0(max(1, round(cfg.epochs * per_epoch)))  # rank 0's stream decides
    # --minutes: the schedules need a length in steps that is not known in advance. Before every
    # step it is re-estimated as the steps done plus those that fit in the time left at the median
    # wall-clock step (data loading included) of the last STEP_WINDOW steps. The median ignores the
    # slow first step, logging and checkpoint steps and passing load on the machine; the schedules
    # are smooth in step / length, so the settling estimate moves them little. The run ends when no
    # further step fits, a small margin before the deadline; its length is then the steps reached.
    # Until then its checkpoints store no length (None): the run cannot be resumed, since a new
    # clock would size other schedules.
    timed = cfg.minutes is not None and total is None
    deadline = time.perf_counter() + cfg.minutes * 60 if timed else None

    def steps_that_fit() -> int:
        remaining = 0.98 * (deadline - time.perf_counter())
        return step + int(remaining / statistics.median(wall_times)) if wall_times else 10**9

    log, losses, start, wall_times = [], [], time.perf_counter(), collections.deque(maxlen=STEP_WINDOW)
    warned = False
    stop_at = step + cfg.stop_after if cfg.stop_after else None
    in_terminal = sys.stderr.isatty() and "ipykernel" not in sys.modules  # a notebook's stream claims to be a tty
    bar = tqdm(total=total, initial=step, disable=not progress or rank != 0, desc="pre-training", dynamic_ncols=True,
               mininterval=0.5 if in_terminal else 30)  # a log file or notebook gets a line every 30 s
    batches = batches_forever(stream, epoch, in_epoch)
    while True:
        if total is not None and step >= total or stop_at is not None and step >= stop_at:
            break
        schedule_length = from_rank0(steps_that_fit()) if timed else total  # rank 0's clock decides
        if timed and schedule_length <= step:
            break
        t_wall = time.perf_counter()
        epoch, i, batch = next(batches)
        in_epoch = i + 1
        batch = batch.to(device)
        sched = set_schedules(optimizer, cfg, step, schedule_length)
        t0 = time.perf_counter()
        want_log = step % cfg.log_every == 0
        result = training_step(model, optimizer, batch, sched["ema_momentum"], forward, cfg.grad_clip, grad_norms=want_log)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        # The loss averaged over the ranks: every rank logs the same value and, when it is not
        # finite, every rank stops at this step (a rank stopping alone would leave the others
        # waiting in the next all-reduce).
        loss = float(M.sum_over_ranks(result.loss.clone()) / world)
        if not math.isfinite(loss):
            bar.close()
            kept = f"the last good checkpoint is kept at {ckpt_path}" if ckpt_path and os.path.exists(ckpt_path) \
                else "no checkpoint was written before it"
            raise FloatingPointError(f"loss is {loss} at step {step}; training stopped ({kept}). Lower --lr, "
                                     f"or enable --grad-clip")
        step += 1
        wall_times.append(time.perf_counter() - t_wall)
        if step == 2:  # the first step (allocations, warm-up) is a poor guide to the others
            wall_times.popleft()
        losses.append(loss)
        images = len(batch.grids)
        if timed:
            bar.total = max(step, steps_that_fit())
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images / dt:.0f}", refresh=False)  # drawn at the bar's interval
        if want_log and rank == 0:
            out = result.output
            targets = out.teacher_features[out.is_target].detach().float()  # (T, D) this step's regression targets
            row = {"step": step, "loss": loss, **{f"loss_{k}": float(v) for k, v in out.parts.items()},
                   **sched, "grad_norms": result.grad_norms,
                   "rankme": image_rankme(model.teacher, rankme_images),
                   "target_token_rankme": rankme(targets),
                   # collapse shows here first: every target alike (std over tokens -> 0), or all of them small
                   "target_std": float(targets.std(0).mean()), "target_norm": float(targets.norm(dim=1).mean()),
                   "target_spread": target_spread(targets),
                   "padding": 1 - P.occupancy(batch),
                   "images_per_s": images / dt, "images": images,
                   "seconds": seconds_before + time.perf_counter() - start}  # the whole run's, over resumes
            log.append(row)
            warning = collapse_warning(row)
            if warning and not warned:  # once per invocation
                bar.write(warning)
                warned = True
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if ckpt_path and rank == 0 and step % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_path, checkpoint_state())
    bar.close()
    if timed:
        total = step
    if ckpt_path and rank == 0:
        save_checkpoint(ckpt_path, checkpoint_state())
    if distributed:
        dist.destroy_process_group()
    return TrainResult(model, log, losses, step, total, time.perf_counter() - start, cfg)


# -----------------------------------------------------------------------------------------------
# Command line


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """One flag per TrainConfig field, --the-name, with the field's default and help: booleans as
    --flag / --no-flag, pairs (start, end) as two numbers, X | None as X. defaults=False: a flag
    that is not given is left out of the parsed namespace (to tell which flags were given)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)  # int | None -> int
        default = f.default if defaults else argparse.SUPPRESS
        if kind is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        elif kind is tuple:
            ap.add_argument(flag, type=float, nargs=2, metavar=("START", "END"), default=default, help=help)
        else:
            ap.add_argument(flag, type=kind, default=default, help=help)
    if defaults:
        ap.set_defaults(out=DEMO_OUT)  # the command line always writes its run somewhere
    return ap


def parse_args(argv=None) -> TrainConfig:
    """The TrainConfig of a command line. For a folder of images, the fields whose flags were not
    given come from `folder_recipe`, and what it chose is printed."""
    ap = build_parser()
    a = ap.parse_args(argv)
    given = set(vars(build_parser(defaults=False).parse_args(argv)))
    try:
        data.check_dataset(a.dataset)
        if os.path.isdir(a.dataset):
            summary = data.describe_folder(a.dataset)
            recipe = folder_recipe(summary, a.resolution if "resolution" in given else None)
            chosen = {k: v for k, v in recipe.items()
                      if k not in given and not (k == "num_targets" and a.masking != "multiblock")
                      and not (k == "epochs" and given & {"steps", "minutes"})}
            for k, (value, _) in chosen.items():
                setattr(a, k, value)
            print(describe_choices(a.dataset, summary, chosen))
        if a.steps is None and a.epochs is None and a.minutes is None:
            a.steps = DEMO_STEPS  # the demo recipe
        cfg = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(a).items()})
        check_config(cfg)
    except ValueError as e:
        ap.error(str(e))
    return cfg


# -----------------------------------------------------------------------------------------------
# A recipe for a folder of images: what `python train.py --dataset FOLDER` chooses by itself


FOLDER_IMAGES_SEEN = DEMO_STEPS * TrainConfig.batch_size  # a folder run's length: the demo's 153,600 images


def folder_recipe(summary: data.FolderSummary, resolution: int | None = None) -> dict:
    """{field: (value, why)}: the recipe for a folder, from what `data.describe_folder` sees (and
    the resolution, when the user chose it). It keeps the demo's 8 x 8 grid of patches, where the
    masking and the model were tuned, and changes what the digits folder showed it must: two
    target blocks, and a length in passes over the folder. The command line uses a choice only
    where its flag was not given. What was measured and not chosen (benchmarks/README.md, *Real
    images*): 28-px digits at 32 px in 4-px patches, with shifts of up to 2 px, learned less than
    the same digits upscaled to 64 px."""
    resolution = resolution or 64
    patch = resolution // 8 if resolution % 8 == 0 else TrainConfig.patch_size
    if resolution != 64:
        why = f"an 8 x 8 grid of patches at the chosen {resolution} px" if resolution % 8 == 0 else \
            f"the demo's {patch}-px patches ({resolution} px is not a multiple of 8)"
    elif summary.side < 64:
        why = (f"{summary.side}-px images upscaled to the demo's 64 px, an 8 x 8 grid of 8-px patches (at 32 px in "
               f"4-px patches the digits folder learned less)")
    else:
        why = f"{summary.side}-px images at the demo's 64 px, an 8 x 8 grid of 8-px patches (the CPU's budget)"
    return {
        "resolution": (resolution, why),
        "patch_size": (patch, "the 8 x 8 grid at that resolution"),
        "out": (os.path.join("checkpoints", os.path.basename(os.path.normpath(summary.path))),
                "the folder's own run (checkpoints/demo is the scenes' demo)"),
        "num_targets": (2, ("two target blocks leave a larger context on an 8 x 8 grid; with the demo's four the "
                            "digits folder learned on one seed of two")),
        "epochs": (round(FOLDER_IMAGES_SEEN / summary.images, 1),
                   f"the demo's budget of {FOLDER_IMAGES_SEEN:,} images seen, over {summary.images:,} images"),
    }


def describe_choices(dataset: str, summary: data.FolderSummary, chosen: dict) -> str:
    """What the folder recipe saw and chose, as the command line prints it."""
    colour = "greyscale" if summary.greyscale else "colour"
    lines = [f"{dataset}: {summary.images:,} training images, median side {summary.side} px, {colour}."]
    if chosen:
        lines.append("The folder recipe chose (give a flag to choose otherwise):")
    for k, (value, why) in chosen.items():
        shown = f"--{k.replace('_', '-')} {value}"
        lines.append(f"  {shown:<24} {why}")
    return "\n".join(lines)


def checkpoint_to_use(path: str | None) -> str:
    """The checkpoint a command line works on: `path`, which must exist, or when None the default
    (`default_checkpoint`: the reference model, else the demo's, trained first if missing)."""
    if path is None:
        return default_checkpoint()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: train one with python train.py, or give its path")
    return path


def run_command(program: str, work) -> int:
    """Run a command line's `work()` (which returns its exit code): a mistake a user can make (bad
    input, a missing or unusable file, a diverging loss) prints one line, `PROGRAM: error: ...`,
    without a traceback, and returns 1. The three command lines of the project share it."""
    try:
        return work()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"{program}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    """The command line: errors a user can cause (bad flags, a dataset that cannot be read, a
    checkpoint that does not fit, a diverging loss) print one line, without a traceback."""
    cfg = parse_args(argv)

    def work():
        result = train(cfg)
        if result.losses:
            print(f"trained to step {result.steps} of {result.total_steps} in {result.seconds / 60:.1f} min; "
                  f"last loss {result.losses[-1]:.4f}")
        return 0

    return run_command("train.py", work)


if __name__ == "__main__":
    sys.exit(main())
