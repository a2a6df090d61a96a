"""Classification metrics (method.md section 4), with MedMNIST's own definitions of ACC and AUC.

Pure functions of labels and scores, shared by sites, server and benchmarks.
"""

from __future__ import annotations

import warnings

import numpy as np

MULTI_LABEL = "multi-label, binary-class"  # medmnist's task name for ChestMNIST

# Health metrics (docs/recipe.md): the server keeps their worst site (`<name>_worst`, the
# minimum) beside the mean, since one site whose fused space is empty is enough to worry.
HEALTH_WORST_OF = (
    "rec_r2",
    "rec_dependence",
    "rec_r2_warmup",
    "rec_dependence_warmup",
    "rec_r2_received",
    "rec_dependence_received",
)


def _auc(y_true: np.ndarray, scores: np.ndarray, task: str) -> float:
    """MedMNIST's AUC; where a class has only one outcome in `y_true` (small local
    shards), the mean over the classes where AUC is defined."""
    from medmnist.evaluator import getAUC
    from sklearn.metrics import roc_auc_score

    try:
        return float(getAUC(y_true, scores, task))
    except ValueError:
        pass
    if task == "binary-class":
        return float("nan")
    columns = y_true if task == MULTI_LABEL else np.eye(scores.shape[1], dtype=int)[y_true]
    aucs = [
        roc_auc_score(columns[:, c], scores[:, c]) for c in range(scores.shape[1]) if len(np.unique(columns[:, c])) == 2
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def majority_share(y_true: np.ndarray, task: str) -> float:
    """The accuracy of always predicting the most common class (per label for ChestMNIST's
    multi-label task): a model scoring exactly this has learnt nothing beyond the prior."""
    if len(y_true) == 0:
        return float("nan")
    if task == MULTI_LABEL:
        positive = np.asarray(y_true, dtype=float).mean(axis=0)
        return float(np.mean(np.maximum(positive, 1 - positive)))
    counts = np.bincount(np.asarray(y_true).reshape(-1).astype(np.int64))
    return float(counts.max() / counts.sum())


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, task: str) -> dict[str, float]:
    """Accuracy, macro-F1, balanced accuracy (over classes present) and AUC."""
    from medmnist.evaluator import getACC
    from sklearn.metrics import balanced_accuracy_score, f1_score

    if len(y_true) == 0:
        return {"acc": float("nan"), "macro_f1": float("nan"), "balanced_acc": float("nan"), "auc": float("nan")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes absent from a shard
        if task == MULTI_LABEL:
            predicted = (scores > 0.5).astype(int)
            f1 = f1_score(y_true, predicted, average="macro", zero_division=0)
            per_label = [
                balanced_accuracy_score(y_true[:, c], predicted[:, c])
                for c in range(y_true.shape[1])
                if len(np.unique(y_true[:, c])) == 2
            ]
            balanced = float(np.mean(per_label)) if per_label else float("nan")
        else:
            predicted = scores.argmax(axis=1)
            present = np.unique(y_true)
            f1 = f1_score(y_true, predicted, labels=present, average="macro", zero_division=0)
            balanced = balanced_accuracy_score(y_true, predicted)
        return {
            "acc": float(getACC(y_true, scores, task)),
            "macro_f1": float(f1),
            "balanced_acc": float(balanced),
            "auc": _auc(y_true, scores, task),
        }
