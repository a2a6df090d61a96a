"""Training and evaluation kernels on this CPU: channels_last, inference_mode, evaluation
batch size and threads. Merges its figures into benchmarks/round_cost.json ("kernels").

    .venv/bin/python -m benchmarks.kernels

Each figure is images per second over a few timed repetitions after a warm-up, on random
28 x 28 inputs (3 channels, 8 classes, like BloodMNIST), batch 256 for training.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "round_cost.json"


def _rate(step, images: int, repeats: int = 5) -> float:
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return round(images * repeats / (time.perf_counter() - started), 1)


def training_rate(fused: bool, channels_last: bool, threads: int) -> float:
    from client_app.trainers.fusedspacefed import task_aware_loss
    from models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(fused=fused, in_channels=3, num_classes=8, image_size=28)
    x, y = torch.rand(256, 3, 28, 28), torch.randint(0, 8, (256,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = task_aware_loss(model, x, y, loss_fn, 1.0)[0] if fused else loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    return _rate(step, 256)


def evaluation_rate(batch: int, inference: bool, threads: int) -> float:
    from models import build_model

    torch.set_num_threads(threads)
    model = build_model(fused=True, in_channels=3, num_classes=8, image_size=28).eval()
    x = torch.rand(batch, 3, 28, 28)
    context = torch.inference_mode if inference else torch.no_grad

    def step() -> None:
        with context():
            model(x)

    return _rate(step, batch)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    results: dict[str, Any] = {"threads_available": torch.get_num_threads(), "rows": []}
    for fused in (False, True):
        for threads in (1, 2):
            plain = training_rate(fused, False, threads)
            last = training_rate(fused, True, threads)
            results["rows"].append(
                {
                    "what": f"training, {'ResNet-20 + autoencoder (task-aware)' if fused else 'ResNet-20'}",
                    "threads": threads,
                    "default img/s": plain,
                    "channels_last img/s": last,
                    "ratio": round(last / plain, 2),
                }
            )
    for threads in (1, 2):
        for batch in (256, 512, 1024):
            grad = evaluation_rate(batch, False, threads)
            inference = evaluation_rate(batch, True, threads)
            results["rows"].append(
                {
                    "what": f"evaluation, FusedSpaceFed model, batch {batch}",
                    "threads": threads,
                    "default img/s": grad,
                    "inference_mode img/s": inference,
                    "ratio": round(inference / grad, 2),
                }
            )
    data = json.loads(OUT.read_text()) if OUT.exists() else {"runs": {}}
    data["kernels"] = results
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    for row in results["rows"]:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
