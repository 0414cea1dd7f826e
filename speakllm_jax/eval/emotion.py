"""情緒辨識的評估：準確率、各類召回與混淆矩陣（JSON 報表與圖）。"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def emotion_report(
    labels: Sequence[str], predictions: Sequence[str], classes: Sequence[str]
) -> dict[str, Any]:
    """由逐段的真實標籤與預測算出 `accuracy`、`per_class`（召回與筆數）與 `confusion`。

    `confusion[i][j]` 為真實類別 `classes[i]` 被預測成 `classes[j]` 的段數；不在 `classes`
    裡的標籤是錯誤輸入，直接報錯（指名標籤）。
    """
    if len(labels) != len(predictions):
        raise ValueError(f"標籤 {len(labels)} 筆、預測 {len(predictions)} 筆，數量不同")
    index = {c: i for i, c in enumerate(classes)}
    for x in list(labels) + list(predictions):
        if x not in index:
            raise ValueError(f"未知的情緒標籤 {x!r}；可用：{tuple(classes)}")
    conf = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(labels, predictions, strict=True):
        conf[index[t], index[p]] += 1
    total = int(conf.sum())
    per_class = {
        c: {
            "count": int(conf[i].sum()),
            "recall": float(conf[i, i] / conf[i].sum()) if conf[i].sum() else None,
        }
        for i, c in enumerate(classes)
    }
    return {
        "segments": total,
        "accuracy": float(np.trace(conf) / total) if total else None,
        "per_class": per_class,
        "classes": list(classes),
        "confusion": conf.tolist(),
    }


def plot_confusion(report: dict[str, Any], path: str | Path) -> Path:
    """把 `emotion_report` 的混淆矩陣畫成熱圖（列為真實、行為預測）。"""
    # 延後匯入：matplotlib 很重，只在畫圖時需要
    import matplotlib

    matplotlib.use("Agg")
    # 延後匯入：matplotlib 很重，只在畫圖時需要
    import matplotlib.pyplot as plt

    conf = np.asarray(report["confusion"])
    classes = report["classes"]
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=120)
    ax.imshow(conf, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("label")
    acc = report.get("accuracy")
    ax.set_title(f"emotion accuracy {acc:.2f}" if acc is not None else "emotion")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
