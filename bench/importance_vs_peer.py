"""Which channels does L2 importance keep? fxprune vs Torch-Pruning on a trained network.

Trains the walkthrough's digits ResNet-18 (bench/walkthrough.py; 10 epochs, seed 0), then
cuts it once at several ratios (``round_to=8``, classifier ignored) and reports test accuracy
right after the cut, before any fine-tuning: the better the channels kept, the higher it is.

* ``fxprune l2``: ``fxprune.prune(..., importance="l2")`` (scores weights only);
* ``with running stats``: the same L2 averaged over every member of a group, BatchNorm running
  statistics and biases included (fxprune's rule before this was measured);
* ``torch-pruning``: ``tp.pruner.MagnitudePruner`` with ``MagnitudeImportance(p=2)``.

    python bench/importance_vs_peer.py       # about 2 minutes on 2 cores
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch_pruning as tp  # noqa: E402

import fxprune  # noqa: E402
from bench import walkthrough as w  # noqa: E402

logger = logging.getLogger(__name__)
RATIOS = (0.2, 0.4, 0.6)


def l2_of_every_member(group, params) -> torch.Tensor:
    """L2 over all of a group's members (buffers and biases too), mean-normalised."""
    per = []
    for m in group.members:
        t = params.get(m.param)
        if t is None or not t.is_floating_point():
            continue
        others = tuple(d for d in range(t.dim()) if d != m.dim)
        v = t.detach().float().pow(2).sum(others) if others else t.detach().float().pow(2)
        out = torch.zeros(group.size, dtype=torch.float64)
        sel = m.index_map >= 0
        out.index_add_(0, m.index_map[sel], v[sel].double())
        per.append(out)
    s = torch.stack(per).mean(0)
    return s / (s.mean() + 1e-12)


def main() -> int:
    torch.set_num_threads(2)
    cfg = w.Config()
    data = w.load_data(0)
    model = w.build_model(cfg.width, 0)
    w.train(model, data, 10, 0.05, 0, cfg, cosine=True)
    x = data["x_test"][:1]
    print(f"dense accuracy {w.accuracy(model, data):.3f}")
    print("| cut | fxprune l2 | with running stats | torch-pruning |")
    print("|---|---|---|---|")
    for ratio in RATIOS:
        cells = []
        for importance in ("l2", l2_of_every_member):
            res = fxprune.prune(
                model, x, ratio=ratio, round_to=8, ignore=[model.fc], importance=importance
            )
            cells.append(w.accuracy(res.module, data))
        peer = copy.deepcopy(model)
        tp.pruner.MagnitudePruner(
            peer,
            x,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            round_to=8,
            ignored_layers=[peer.fc],
        ).step()
        cells.append(w.accuracy(peer, data))
        print(f"| {ratio:.0%} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
