"""優化器：AdamW + 線性暖身 + 餘弦衰減 + 全域範數裁剪。

權重衰減只套用在二維以上的參數（矩陣、嵌入），不套用在偏置與正規化尺度。
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(optim: Any, total_steps: int) -> optax.Schedule:
    """暖身到 `optim.lr` 後以餘弦衰減到 `lr * final_lr_ratio`。"""
    warmup = int(optim.warmup_steps)
    decay_steps = max(int(total_steps), warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(optim.lr),
        warmup_steps=warmup,
        decay_steps=decay_steps,
        end_value=float(optim.lr) * float(optim.final_lr_ratio),
    )


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(optim: Any, total_steps: int) -> optax.GradientTransformation:
    """依設定區塊 `config.optim` 建立優化器。"""
    schedule = learning_rate_schedule(optim, total_steps)
    parts = []
    if float(optim.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim.b1),
            b2=float(optim.b2),
            eps=float(optim.eps),
            weight_decay=float(optim.weight_decay),
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)
