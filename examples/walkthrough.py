"""Iterative pruning with fine-tuning in between: the prune -> fine-tune walkthrough with fxprune.

A CIFAR-style ResNet-18 learns scikit-learn's 8x8 digits, then loses a little more of
its channels at every step, fine-tuning after each one so it never falls far. Runs in
about a minute on 2 CPU cores: python examples/walkthrough.py
(bench/walkthrough.py runs the full 20-step version beside Torch-Pruning.)
"""

import torch
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fxprune
from fxprune.export.latency import compare_latency

STEPS, RATIO, EPOCHS_PER_STEP = 5, 0.75, 1
torch.manual_seed(0)
torch.set_num_threads(1)  # on a small shared CPU one steady thread beats two that contend

# Data: 1797 grayscale 8x8 digits, a fixed split, standardised.
digits = load_digits()
x_all = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
x_all = (x_all - x_all.mean()) / x_all.std()
y_all = torch.tensor(digits.target)
train_idx, test_idx = train_test_split(
    range(len(y_all)), test_size=0.2, random_state=0, stratify=digits.target
)
x_train, y_train, x_test, y_test = (
    x_all[train_idx],
    y_all[train_idx],
    x_all[test_idx],
    y_all[test_idx],
)

# ResNet-18, CIFAR variant: 3x3 stride-1 stem and no max-pool, so 8x8 inputs keep their
# resolution; one input channel.
model = torchvision.models.resnet18(num_classes=10)
model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
model.maxpool = nn.Identity()


def train(net: nn.Module, epochs: int, lr: float) -> None:
    # A new optimizer every time: pruning replaces the parameter tensors.
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train)).split(64):
            loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


@torch.no_grad()
def accuracy(net: nn.Module) -> float:
    return (net.eval()(x_test).argmax(1) == y_test).float().mean().item()


train(model, epochs=6, lr=0.05)  # prune a trained model: importance means nothing before
print(f"dense: accuracy {accuracy(model):.3f}, {fxprune.count_macs(model, x_test[:1]):,} MACs")

# One Pruner for all steps: step i keeps 1 - RATIO * i / STEPS of every group's channels.
# round_to=8 keeps widths that ONNX Runtime's CPU kernels run fast; the classifier's
# outputs are the 10 classes, so it is ignored.
pruner = fxprune.Pruner(model, x_test[:1], ratio=RATIO, steps=STEPS, round_to=8, ignore=[model.fc])
while not pruner.done:
    res = pruner.step()  # verify=True by default: the oracle checks every step's surgery
    before = accuracy(pruner.module)
    train(pruner.module, EPOCHS_PER_STEP, lr=0.01)  # small steps + fine-tune: little is lost
    print(
        f"step {pruner.step_index}: {res.report.params_after:,} params, accuracy "
        f"{before:.3f} -> {accuracy(pruner.module):.3f} ({res.report.verified})"
    )

train(pruner.module, epochs=3, lr=0.01)  # a last, longer fine-tune to recover
print(f"pruned: accuracy {accuracy(pruner.module):.3f}")

# Fewer MACs are a promise; measure: dense and pruned timed in interleaved rounds on
# ONNX Runtime, the speedup being the median of per-round latency ratios.
report = compare_latency(
    {"dense": model, "pruned": pruner.module},
    lambda batch: torch.randn(batch, 1, 8, 8),
    backends=("ort",),
    batch_sizes=(1, 64),
    rounds=10,
    num_threads=1,
)
print(report.table())
