"""Pre-training I-JEPA.

`training_step` is the whole optimisation step that benchmarks, notebooks and the trainer share.
"""

import torch

import models as M


def training_step(model: M.IJEPA, optimizer: torch.optim.Optimizer, batch: M.MaskedBatch,
                  momentum: float, forward=None) -> torch.Tensor:
    """One step: forward (teacher, student, predictor, loss), backward, optimiser step, EMA.

    `forward` is the callable to run the model with (a `torch.compile`d model, say); by default
    the model itself. Returns the loss, detached.
    """
    out = (forward or model)(batch)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    model.update_teacher(momentum)
    return out.loss.detach()
