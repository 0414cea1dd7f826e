"""文字頭的篩選 argmax（`export.text_argmax.ScreenedArgmax`）：與 fp32 全算的 argmax 相同。

篩選本身在沒有 AVX512-BF16 的 CPU 上也能跑（torch 的通用 bf16 矩陣乘法同樣以 fp32 累加，只是慢），
所以這裡一律把 `bf16_supported` 設為真，讓每台機器都測到篩選的路徑。
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import export.text_argmax as ta
from export.text_argmax import ScreenedArgmax, bound_factor, greedy

VOCAB, HIDDEN = 6000, 64


@pytest.fixture
def head(monkeypatch) -> nn.Linear:
    monkeypatch.setattr(ta, "bf16_supported", lambda: True)
    torch.manual_seed(0)
    lin = nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(VOCAB, 1) * 2)  # 列範數各不相同
    return lin


def test_equals_full_fp32_argmax_on_random_inputs(head) -> None:
    sa = ScreenedArgmax(head)
    seen = 0
    for s in range(30):
        h = torch.randn(16, 1, HIDDEN) * (0.01 + s)
        got = sa(h)
        assert got.shape == (16, 1) and got.dtype == torch.int64
        assert torch.equal(got, greedy(head(h).float()))
        assert sa.fallback_rows == 0 and 16 <= sa.candidates < 16 * 50
        seen += sa.candidates
    assert seen > 30 * 16  # 有些列不只一個候選：精確重算真的在選


def test_bf16_error_stays_within_the_bound(head) -> None:
    """`|l̃ − l| ≤ bound_factor(H) · ‖w_v‖ · ‖h‖`：bf16 logits 與 float64 精確值的差距。"""
    h = torch.randn(64, HIDDEN) * 3
    approx = F.linear(h.bfloat16(), head.weight.detach().bfloat16()).double()
    exact = h.double() @ head.weight.detach().double().T
    scale = (
        torch.linalg.vector_norm(head.weight.detach().double(), dim=-1)[None]
        * (torch.linalg.vector_norm(h.double(), dim=-1)[:, None])
    )
    ratio = ((approx - exact).abs() / (bound_factor(HIDDEN) * scale)).max().item()
    assert 0.05 < ratio <= 1.0


def test_near_tie_that_bf16_cannot_see_is_decided_exactly(head) -> None:
    """兩個詞的權重只差 bf16 分辨不出的一點：bf16 的 logits 並列，結果是 fp32 較大的那個。"""
    h = torch.randn(2, HIDDEN)
    with torch.no_grad():
        w = head.weight
        w[10] = 4 * h[0] / h.norm()
        w[20] = w[10] + 1e-5 * h[0] / h.norm()
    approx = F.linear(h.bfloat16(), w.detach().bfloat16()).float()
    assert approx[0, 10] == approx[0, 20] and int(approx[0].argmax()) == 10
    sa = ScreenedArgmax(head)
    got = sa(h)
    assert torch.equal(got, greedy(head(h).float())) and int(got[0]) == 20
    assert sa.candidates >= 2


def test_degenerate_rows_fall_back_to_full_fp32(head) -> None:
    """全為 0 的隱狀態（詞表全部並列：候選太多）與含 NaN 的列以 fp32 全算，語意同 argmax。"""
    h = torch.randn(3, HIDDEN)
    h[0] = 0
    h[2, 5] = float("nan")
    sa = ScreenedArgmax(head)
    got = sa(h)
    assert torch.equal(got, greedy(head(h).float().detach()))
    assert int(got[0]) == 0 and sa.fallback_rows == 2


def test_follows_weight_updates(head) -> None:
    """權重就地改變（載入新權重）之後不沿用舊的 bf16 副本。"""
    sa = ScreenedArgmax(head)
    h = torch.randn(8, HIDDEN)
    before = sa(h)
    with torch.no_grad():
        head.weight.neg_()
    after = sa(h)
    assert torch.equal(after, greedy(head(h).float().detach()))
    assert not torch.equal(before, after)


def test_unsupported_cases_compute_full_fp32(head, monkeypatch) -> None:
    """有偏置、bf16 權重、少於 `min_rows` 列、或這台 CPU 不支援 bf16 時不篩選，結果同 fp32 全算。"""
    h = torch.randn(4, HIDDEN)
    biased = nn.Linear(HIDDEN, VOCAB)
    for lin, x in [(biased, h), (head.bfloat16(), h.bfloat16())]:
        sa = ScreenedArgmax(lin)
        assert not sa.applies(x)
        assert torch.equal(sa(x), greedy(lin(x).float().detach()))
    head.float()
    one = ScreenedArgmax(head, min_rows=2)
    assert not one.applies(h[:1]) and one.applies(h) and ScreenedArgmax(head).applies(h[:1])
    assert torch.equal(one(h[:1]), greedy(head(h[:1]).float().detach()))
    monkeypatch.setattr(ta, "bf16_supported", lambda: False)
    assert not ScreenedArgmax(head).applies(h)
    assert np.array_equal(ScreenedArgmax(head)(h).numpy(), greedy(head(h).detach()).numpy())


def test_weights_made_under_inference_mode(monkeypatch) -> None:
    """在 `torch.inference_mode()` 裡建的模型（權重沒有版本計數）也能篩選。"""
    monkeypatch.setattr(ta, "bf16_supported", lambda: True)
    with torch.inference_mode():
        lin = nn.Linear(HIDDEN, VOCAB, bias=False)
        h = torch.randn(4, HIDDEN)
        assert torch.equal(ScreenedArgmax(lin)(h), greedy(lin(h)))


@pytest.mark.parametrize("vocab", [4736, 4099, 1031 * 2])
def test_planted_maximum_found_in_any_block_or_tail(vocab, monkeypatch) -> None:
    """篩選先比每塊（16 個寬列）的最大值，湊不滿一塊的尾端直接比較：最大者放在第一個詞、最後一個
    詞（尾端）與中間的塊，都要找到。詞表大小涵蓋寬列數不是塊的倍數、質數（不能加寬）與不滿一塊。"""
    monkeypatch.setattr(ta, "bf16_supported", lambda: True)
    torch.manual_seed(vocab)
    lin = nn.Linear(HIDDEN, vocab, bias=False)
    h = torch.randn(3, HIDDEN)
    planted = [0, vocab - 1, vocab // 2 + 7]
    with torch.no_grad():
        for r, v in enumerate(planted):
            lin.weight[v] = 3 * h[r] / h[r].norm()
    sa = ScreenedArgmax(lin)
    got = sa(h)
    assert got.tolist() == planted and sa.fallback_rows == 0
    assert torch.equal(got, greedy(lin(h).float()))
