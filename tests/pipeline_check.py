"""Grain 輸入管線測試共用的設定與檢查（`test_pipeline` 的 JSONL+WAV 與 `test_shards` 的分片各用一份）。"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from speakllm_jax.data.pipeline import PipelineConfig, make_iterator

BOUNDARIES = (160, 320, 480, 800)


def pipeline_cfg(**kw: Any) -> PipelineConfig:
    """測試用的小管線設定：批次 2、四個桶、每句最長 8 秒、文字 48 個 token，其餘由 `kw` 覆寫。"""
    base = dict(
        batch_size=2,
        bucket_boundaries=BOUNDARIES,
        max_seconds=8.0,
        max_text_tokens=48,
        drop_remainder=False,
        num_epochs=1,
        read_threads=2,
    )
    base.update(kw)
    return PipelineConfig(**base)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    """兩串批次逐欄位逐位元相同（`skipped` 計數比較字典）。"""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k == "skipped":
                assert x[k] == y[k]
            else:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def check_restore_mid_epoch(source: Any, cfg: PipelineConfig, tok: Any, n: int) -> None:
    """行程 1／2 讀到分桶緩衝裡還有樣本時存下狀態（必須能存成 JSON），由狀態恢復的迭代器
    接下來 `n` 批與原迭代器逐位元相同。"""
    it = make_iterator(source, cfg, tok, process_index=1, process_count=2)
    state = None
    for step in range(12):
        next(it)
        s = it.get_state()
        if step >= 1 and (cfg.sync_buckets or any(s["buffers"].values())):
            state = json.loads(json.dumps(s))
            break
    assert state is not None, "檢查點時應有樣本留在分桶緩衝中，才測得到恢復緩衝"
    reference = [next(it) for _ in range(n)]
    restored = make_iterator(source, cfg, tok, process_index=1, process_count=2, state=state)
    assert_same_batches(reference, [next(restored) for _ in range(n)])
