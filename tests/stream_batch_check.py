"""`step_batch` 與逐一 `Streamer.step` 相同的共用檢查（voila 與 cosyvoice2 的測試共用）。"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from export.torch_model import Streamer, step_batch

PrevRow = Callable[[int, torch.Generator], dict[str, torch.Tensor]]


def prev_rows(model: Any, codebooks: int, codebook_size: int) -> PrevRow:
    """第 r 列上一幀的輸出（文字、聲調、語音碼、語音碼是否有效），由 `g` 決定。"""
    k = model.cfg.max_chars_per_token

    def prev_row(r: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            "text": torch.tensor([[100 + r]]),
            "tones": torch.randint(0, 6, (1, 1, k), generator=g),
            "codes": torch.randint(0, codebook_size, (1, 1, codebooks), generator=g),
            "codes_valid": torch.tensor([[r % 2 == 0]]),
        }

    return prev_row


def advanced_streamers(
    model: Any, starts: Sequence[int], prev_row: PrevRow
) -> tuple[list[Streamer], list[Streamer]]:
    """兩組同樣的串流，第 i 個先逐幀前進 `starts[i]` 幀（種子 i）：一組逐一跑、一組批次跑。"""
    d = model.cfg.llm_hidden

    def advanced(frames: int, seed: int) -> Streamer:
        st = Streamer(model, 2)
        g = torch.Generator().manual_seed(seed)
        for _ in range(frames):
            st.step(0.1 * torch.randn((1, 1, d), generator=g), prev_row(0, g))
        return st

    separate = [advanced(f, i) for i, f in enumerate(starts)]
    batched = [advanced(f, i) for i, f in enumerate(starts)]
    return separate, batched


def assert_batch_steps_equal(
    model: Any,
    separate: list[Streamer],
    batched: list[Streamer],
    prev_row: PrevRow,
    steps: int = 3,
) -> None:
    """再前進 `steps` 幀：批次的 logits（≤ 1e-4）、語音碼、快取大小與位置都與逐一前進相同。"""
    d = model.cfg.llm_hidden
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        users = [0.1 * torch.randn((1, 1, d), generator=gen) for _ in separate]
        prevs = [prev_row(r, gen) for r in range(len(separate))]
        ref = [st.step(u, p) for st, u, p in zip(separate, users, prevs, strict=True)]
        got = step_batch(
            batched,
            torch.cat(users),
            {key: torch.cat([p[key] for p in prevs]) for key in prevs[0]},
        )
        for r, one in enumerate(ref):
            torch.testing.assert_close(got["text"][r : r + 1], one["text"], atol=1e-4, rtol=0)
            torch.testing.assert_close(got["turn"][r : r + 1], one["turn"], atol=1e-4, rtol=0)
            assert torch.equal(got["code_ids"][r : r + 1], one["code_ids"])
            assert torch.equal(got["text_ids"][r : r + 1], one["text_ids"])
        assert [st.cache_sizes() for st in batched] == [st.cache_sizes() for st in separate]
        assert [st.position for st in batched] == [st.position for st in separate]
