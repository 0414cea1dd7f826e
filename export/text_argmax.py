"""文字頭的貪婪 argmax，不算出整個詞表的 fp32 logits：先以 bf16 篩出候選，再精確重算候選。

服務路徑每一幀每個會話只要 `lm_head` 的 argmax（下一幀的文字輸入），不要 logits 本身。tiny 示範
模型保留了 Qwen 真實的 151 936 詞詞表，fp32 的 `[32, 64] × [64, 151 936]` 占了一個 tick 的一半。

做法：以 bf16 的權重與隱狀態算一次 logits `l̃`（CPU 有 AVX512-BF16 時比 fp32 快約 2.5 倍），
再以嚴格的誤差上界 `ε` 篩選：真正的最大者 `u` 滿足 `l̃_u ≥ l_u − ε ≥ l_{v*} − ε ≥ max l̃ − 2ε`，
所以 `l̃ ≥ max l̃ − 2ε` 的詞一定包含它。候選（隨機模型平均一列約三個，訓練過的模型通常一個）以
float64 重算 fp32 權重與隱狀態的內積（乘積在 float64 中是精確的），取最大者，並列取索引最小。

`ε`：bf16 的單位捨入 `u = 2⁻⁸`，權重與隱狀態各捨入一次（`2u + u²`）、fp32 累加 H 項
（`γ_H = H·2⁻²⁴ / (1 − H·2⁻²⁴)`，與相加順序無關）、輸出再捨入成 bf16 一次（`u`），都乘上
`Σ|w_i h_i| ≤ max_v ‖w_v‖ · ‖h‖`；另加一個絕對項涵蓋次正規數被清為 0（DAZ／FTZ）。任一列的
隱狀態或 bf16 logits 不是有限值、門檻不為正、可能溢位、或候選超過 `max_candidates` 時，那一列改以
fp32 全算（與 `torch.argmax` 相同的語意）。

結果是 fp32 權重與隱狀態的精確 argmax；與 fp32 `F.linear` 再 argmax 的差別只在兩個 logits 的差距
小於 fp32 的捨入時（fp32 本身的結果在那時也隨批次大小而變）。只在 CPU、fp32、無偏置、支援 bf16
矩陣乘法、至少 `min_rows` 列時使用，其餘情形就是 fp32 全算。
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch
from torch import nn

_U = 2.0**-8  # bf16 的單位捨入（8 位有效位數、就近捨入）
_BLOCK = 16  # 篩選時每塊的寬列數（先比塊的最大值，過門檻的塊才逐一比較）


def bound_factor(hidden: int) -> float:
    """`|l̃_v − l_v| ≤ bound_factor(H) · ‖w_v‖ · ‖h‖`（不含絕對項）的係數。"""
    g = hidden * 2.0**-24
    gamma = g / (1.0 - g)
    return ((2 * _U + _U * _U) + gamma * (1 + _U) ** 2 + _U * (1 + gamma) * (1 + _U) ** 2) * 1.01


@functools.cache
def bf16_supported() -> bool:
    """這台機器的 CPU 支援 bf16 的矩陣乘法（oneDNN，fp32 累加）；每幀都問，只查一次。"""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


class ScreenedArgmax:
    """`linear`（詞表頭）輸出的 argmax，不產生 fp32 logits；見模組說明。"""

    def __init__(self, linear: nn.Linear, max_candidates: int = 1024, min_rows: int = 1) -> None:
        self.linear = linear
        self.max_candidates = int(max_candidates)
        # 少於這麼多列時不篩選。預設 1：一列時 bf16 讀的權重也只有一半（AVX512-BF16 的機器上量到
        # `[1, 64] × [64, 151 936]` 3.9 → 1.8 ms），單一會話也走篩選。
        self.min_rows = int(min_rows)
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._state: tuple[torch.Tensor, float, np.ndarray] | None = None
        self.candidates = 0  # 最近一次呼叫的候選總數（測試與剖析用）
        self.fallback_rows = 0  # 最近一次呼叫改以 fp32 全算的列數

    def applies(self, hidden: torch.Tensor) -> bool:
        """這個權重與輸入是否走篩選（否則 fp32 全算）。"""
        w = self.linear.weight
        return (
            self.linear.bias is None
            and w.device.type == "cpu"
            and w.dtype == torch.float32
            and hidden.dtype == torch.float32
            and hidden.device.type == "cpu"
            and hidden.reshape(-1, hidden.shape[-1]).shape[0] >= self.min_rows
            and w.shape[0] > self.max_candidates
            and bf16_supported()
        )

    def _weights(self) -> tuple[torch.Tensor, float, np.ndarray]:
        """bf16 權重、最大的列範數、fp32 權重的 numpy 檢視；權重改變（載入、就地更新）時重算。"""
        w = self.linear.weight
        try:
            version = w._version
        except RuntimeError:  # inference_mode 裡建的張量沒有版本計數（也不能在模式外就地修改）
            version = -1
        key = (w.data_ptr(), version, tuple(w.shape))
        with self._lock:
            if self._key != key or self._state is None:
                with torch.no_grad():
                    wd = w.detach()
                    norm = float(torch.linalg.vector_norm(wd.double(), dim=-1).max())
                    if not np.isfinite(norm):
                        norm = float("inf")  # 權重有非有限值：每一列都改以 fp32 全算
                    self._state = (wd.to(torch.bfloat16), norm, wd.numpy())
                self._key = key
            return self._state

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [..., H]` → 每個位置的 argmax `[...]`（int64）。"""
        shape = hidden.shape[:-1]
        h = hidden.detach().reshape(-1, hidden.shape[-1])
        if not self.applies(h):
            return greedy(self.linear(h).float()).reshape(shape)
        wb, wmax, w_np = self._weights()
        n, dim = h.shape
        # 算成 `[V, n]`（權重在左：oneDNN 在這個形狀快一倍）。bf16 的位元當成 int16：正數的大小順序
        # 與整數相同，負數都比正數小，所以門檻為正時直接以整數比較（不必轉成 fp32）。
        bits = torch.mm(wb, h.to(torch.bfloat16).t()).view(torch.int16).numpy()
        h64 = h.numpy().astype(np.float64)
        hnorm = np.sqrt((h64 * h64).sum(-1))
        habs = np.abs(h64).max(-1) if dim else np.zeros(n)
        eps = bound_factor(dim) * wmax * hnorm + dim * 2.0**-120 * (1 + habs) * (1 + wmax)
        # 把 `[V, n]` 看成較寬的 `[V / k, k·n]`（同一塊記憶體）：numpy 沿第 0 維的 int16 歸約與比較
        # 在寬列上才向量化得好。整個陣列只掃一次：每 `_BLOCK` 個寬列取一次最大值，之後只在最大值
        # 過門檻的塊裡找候選（隨機 tiny 模型每列只有一兩塊）。
        k = next(k for k in (128, 64, 32, 16, 8, 4, 2, 1) if bits.shape[0] % k == 0)
        wide = bits.reshape(-1, k * n)
        nb = wide.shape[0] // _BLOCK
        blocks = wide[: nb * _BLOCK].reshape(nb, _BLOCK, k * n)
        tail = wide[nb * _BLOCK :]  # 湊不滿一塊的寬列直接比較
        bmax = blocks.max(1)
        colmax = np.concatenate([bmax, tail]).max(0)
        top = (colmax.reshape(k, n).max(0).astype(np.int32) << 16).view(np.float32)
        top = top.astype(np.float64)
        # 門檻取成不大於真值的 fp32，再截斷成 bf16（正數截斷即向下捨入）
        thr = np.nextafter((top - 2 * eps).astype(np.float32), np.float32(-np.inf))
        tbits = (thr.view(np.int32) >> 16).astype(np.int16)
        # 逐列改以 fp32 全算：最大者不是有限的正數、門檻不為正、或可能溢位（|l| ≤ ‖w‖‖h‖）
        bad = ~np.isfinite(top) | ~(thr > 0) | ~(wmax * hnorm < 1e37)
        tbits[bad] = np.iinfo(np.int16).max
        twide = np.tile(tbits, k)
        hit_b, hit_j = np.nonzero(bmax >= twide[None, :])
        seg_i, seg_g = np.nonzero(blocks[hit_b, :, hit_j] >= twide[hit_j][:, None])
        tail_r, tail_j = np.nonzero(tail >= twide[None, :])
        wrow = np.concatenate([hit_b[seg_i] * _BLOCK + seg_g, nb * _BLOCK + tail_r])
        wcol = np.concatenate([hit_j[seg_i], tail_j])
        cols = wrow * k + wcol // n
        rows = wcol % n
        counts = np.bincount(rows, minlength=n)
        bad |= (counts > self.max_candidates) | (counts == 0)
        keep = ~bad[rows]
        rows, cols = rows[keep], cols[keep]
        exact = np.einsum("nh,nh->n", w_np[cols].astype(np.float64), h64[rows])
        out = np.zeros(n, dtype=np.int64)
        if rows.size:
            order = np.lexsort((cols, -exact, rows))  # 依列，精確值大者先，並列時索引小者先
            r, c = rows[order], cols[order]
            first = np.ones(r.size, dtype=bool)
            first[1:] = r[1:] != r[:-1]
            out[r[first]] = c[first]
        fallback = np.flatnonzero(bad)
        for i in fallback:
            out[i] = int(greedy(self.linear(h[i : i + 1]).float())[0])
        self.candidates = int(rows.size)
        self.fallback_rows = int(fallback.size)
        return torch.from_numpy(out).reshape(shape)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """最後一維的 argmax（同 `torch.argmax(logits, dim=-1)`，並列時取第一個）。

    CPU 上改用 numpy 的 argmax：torch 的 CPU argmax 對 15 萬詞的詞表慢一個數量級（一列約 0.27 ms，
    numpy 約 0.02 ms），批次排程每一步每個會話都要取一次。"""
    if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.float64):
        return torch.argmax(logits, dim=-1)
    x = logits.detach()
    return torch.from_numpy(np.ascontiguousarray(x.numpy().argmax(axis=-1)))
