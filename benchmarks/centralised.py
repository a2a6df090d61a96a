"""A centralised reference: the same classifier, optimiser and schedule (the project's
defaults, the learning-rate schedule stretched over the epochs) on the pooled training data.

    .venv/bin/python -m benchmarks.centralised --datasets breastmnist,retinamnist --epochs 60

Why: when every federated method stays at the majority-class accuracy after few rounds, this
shows whether the model, data pipeline and evaluation can learn at all, and how many SGD steps
that takes at the protocol's batch size and learning rate. Writes benchmarks/centralised.json,
which `benchmarks.report` turns into a table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "medmnist"
OUT = ROOT / "benchmarks" / "centralised.json"


def train_pooled(dataset: str, data_root: str, epochs: int, every: int, seed: int, cfg: dict[str, Any]) -> dict:
    """Train the pre-activation ResNet-20 on all training images; test accuracy every `every` epochs."""
    import torch

    from client_app.training import classification_loss, run_epochs
    from models import build_model
    from models.evaluation import evaluate_split
    from partitions.medmnist_data import dataset_spec, load_medmnist
    from partitions.site_data import to_tensors

    torch.set_num_threads(1)
    spec = dataset_spec(dataset)
    data = load_medmnist(dataset, data_root, spec.image_size, download=False)
    train, test = (to_tensors(data[s], spec.multi_label) for s in ("train", "test"))
    torch.manual_seed(seed)
    model = build_model(
        fused=False,
        in_channels=spec.channels,
        num_classes=spec.num_classes,
        image_size=spec.image_size,
        norm=cfg["norm"],
    )
    optimiser = torch.optim.SGD(
        model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
    )
    loss_fn = classification_loss(spec.multi_label)
    generator = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        optimiser.zero_grad()
        loss = loss_fn(model(x), y if spec.multi_label else y.view(-1))
        loss.backward()
        optimiser.step()
        return float(loss)

    points, steps, started = [], 0, time.time()
    for epoch in range(1, epochs + 1):
        for group in optimiser.param_groups:  # the run config's schedule, one "round" per epoch
            group["lr"] = cfg["round_lr"](epoch)
        model.train()
        steps += run_epochs(train, 1, cfg["batch_size"], cpu, generator, step)[1]
        if epoch % every == 0 or epoch == epochs:
            scores = evaluate_split(model, test, spec.task, cpu)
            points.append({"epoch": epoch, "steps": steps, **scores})
            print(f"{dataset} epoch {epoch} ({steps} steps): test acc {100 * scores['acc']:.2f} %", flush=True)
    majority = float(max(test.labels.view(-1).bincount()) / len(test)) if not spec.multi_label else None
    return {
        "train_samples": len(train),
        "points": points,
        "majority_share": majority,
        "seconds": time.time() - started,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="breastmnist,retinamnist")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--every", type=int, default=10, help="evaluate on the test split every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=str(DATA))
    p.add_argument("--batch-size", type=int, default=0, help="default: the project's batch-size")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.every < 1:
        raise SystemExit("--epochs and --every must be at least 1")
    sys.path.insert(0, str(ROOT))
    # the protocol's optimiser (method.md section 2): the project defaults
    from core.config import RunConfig
    from core.files import atomic_write_bytes

    defaults = RunConfig(num_server_rounds=args.epochs)
    cfg = {
        "lr": defaults.lr,
        "lr_schedule": defaults.lr_schedule,
        "momentum": defaults.momentum,
        "weight_decay": defaults.weight_decay,
        "batch_size": args.batch_size or defaults.batch_size,
        "norm": defaults.classifier_norm,
    }
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for dataset in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        results[dataset] = {
            "config": {**cfg, "epochs": args.epochs, "seed": args.seed},
            **train_pooled(
                dataset, args.data_root, args.epochs, args.every, args.seed, {**cfg, "round_lr": defaults.round_lr}
            ),
        }
        atomic_write_bytes(OUT, (json.dumps(results, indent=2) + "\n").encode())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
