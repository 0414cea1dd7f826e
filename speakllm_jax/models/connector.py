"""連接器：Whisper 編碼器輸出（50 Hz）→ 語言模型寬度，降到語音 token 的幀率（25 Hz）。

做法：把相鄰 `stack` 幀串接（`[B, T, d] → [B, T/stack, stack·d]`），再經兩層 MLP
（GELU）投影到 LLM 寬度。每個輸出幀只看自己那 `stack` 個輸入幀，沒有前瞻，
所以逐塊串流時與整段計算結果相同。
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from speakllm_jax.models.layers import LayerNorm, dense


class Connector(nnx.Module):
    """幀堆疊 + MLP。`hidden=0` 時中間寬度取 LLM 寬度。"""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        stack: int = 2,
        hidden: int = 0,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        if stack < 1:
            raise ValueError(f"connector.stack 必須 ≥ 1，收到 {stack}")
        self.stack = stack
        self.dtype = dtype
        hidden = hidden or out_dim
        self.norm = LayerNorm(in_dim * stack, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = dense(
            in_dim * stack,
            hidden,
            ("embed", "mlp"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.fc2 = dense(
            hidden, out_dim, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def output_frames(self, input_frames: int) -> int:
        """輸入幀數 → 輸出幀數（不足一組的尾端捨去）。"""
        return input_frames // self.stack

    def __call__(self, frames: jax.Array) -> jax.Array:
        """`[B, T, in_dim]` → `[B, T // stack, out_dim]`。"""
        b, t, d = frames.shape
        t_out = t // self.stack
        x = frames[:, : t_out * self.stack].reshape(b, t_out, self.stack * d)
        x = self.norm(x.astype(self.dtype))
        x = jax.nn.gelu(self.fc1(x), approximate=False)
        return self.fc2(x)

    @staticmethod
    def mask(frame_mask: jax.Array, stack: int) -> jax.Array:
        """輸入幀遮罩 `[B, T]` → 輸出幀遮罩：一組中全部有效才算有效。"""
        b, t = frame_mask.shape
        t_out = t // stack
        m = frame_mask[:, : t_out * stack].reshape(b, t_out, stack)
        return jnp.all(m.astype(bool), axis=-1)
