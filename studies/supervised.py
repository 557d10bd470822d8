"""Training on the labels: the supervised baseline for the linear probe (Linear_Probe.ipynb), the
same encoder trained on the labels for a few minutes, and fine-tuning the last block of a
pre-trained encoder (the comparison of methods: MAE is said to need fine-tuning to catch up).
One loop serves both (`fit_classifier`)."""

import copy
import time

import torch
import torch.nn.functional as F

import data
import models as M
import train as T


def fit_classifier(encoder, train_x, train_y, test_x, test_y, classes, minutes=None, steps=None, seed=0, batch=128,
                   lr=1e-3):
    """Train `encoder`'s trainable parameters (those with requires_grad) and a new linear head on its
    mean-pooled output on the labels, for `minutes` of wall-clock time or `steps` steps (one of
    them; cosine learning rate over that budget, AdamW, no augmentation; images in [0, 1], normalised
    here), then score the test images. Returns (test top-1, steps taken); the encoder is left trained
    and in eval mode. The head's initial weights come from torch's global generator (the caller seeds
    it); `seed` orders the batches."""
    if (minutes is None) == (steps is None):
        raise ValueError("give one of minutes and steps")
    head = torch.nn.Linear(encoder.cfg.dim, classes)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    encoder.train()
    start, taken = time.perf_counter(), 0
    while True:
        done = (time.perf_counter() - start) / (minutes * 60) if minutes is not None else taken / steps
        if done >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = T.cosine(done, lr, 0.0)
        idx = torch.randint(len(train_x), (batch,), generator=g)
        logits = head(encoder.encode(data.normalize(train_x[idx])).mean(1))
        loss = F.cross_entropy(logits, train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        taken += 1
    encoder.eval()
    with torch.no_grad():
        pred = torch.cat([head(encoder.encode(data.normalize(test_x[i:i + 256])).mean(1)).argmax(1)
                          for i in range(0, len(test_x), 256)])
    return float((pred == test_y).float().mean()), taken


def train_supervised(train_x, train_y, test_x, test_y, classes, minutes, patch, seed=0, batch=128, lr=1e-3):
    """The same `micro` encoder, from its initial weights, trained whole on the labels for `minutes`
    (`fit_classifier`). How strong a reference it is depends on the budget: 2 minutes is a short
    baseline that a frozen pre-trained encoder can beat, 10 minutes on 12,000 scenes comes near what
    this encoder can reach on a label. Returns (test top-1, steps taken)."""
    torch.manual_seed(seed)
    encoder = M.VisionTransformer(M.JEPAConfig(model="micro", patch_size=patch).encoder_config())
    return fit_classifier(encoder, train_x, train_y, test_x, test_y, classes, minutes=minutes, seed=seed, batch=batch,
                          lr=lr)


def fine_tune_last_block(encoder, train_x, train_y, test_x, test_y, classes, steps, seed=0, batch=128, lr=1e-3):
    """A copy of a pre-trained encoder with its last block and final norm trained on the labels, the
    blocks before frozen, with a new linear head (`fit_classifier`, `steps` steps). The encoder
    passed in is not changed. Returns (test top-1, steps taken)."""
    torch.manual_seed(seed)
    tuned = copy.deepcopy(encoder).requires_grad_(False)
    for part in (tuned.blocks[-1], tuned.norm):
        part.requires_grad_(True)
    return fit_classifier(tuned, train_x, train_y, test_x, test_y, classes, steps=steps, seed=seed, batch=batch, lr=lr)
