"""服務端不載入 JAX：匯入 gRPC 伺服器、客戶端與網頁橋接之後 `sys.modules` 裡沒有 jax／flax。"""

from __future__ import annotations

import subprocess
import sys


def test_server_import_loads_no_jax() -> None:
    code = (
        "import sys, export.serving.server, export.serving.client, export.serving.web\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "", out.stdout


def test_freeze_loaded_objects_takes_them_out_of_gc() -> None:
    """伺服器進入點在載入之後凍結現有物件：之後循環 GC 追蹤的物件只剩新建的（完整回收不再掃過
    載入時的幾十萬個物件），凍結的物件數就是原本追蹤的那些。"""
    code = (
        "import gc, export.serving.server as s\n"
        "before = len(gc.get_objects())\n"
        "n = s.freeze_loaded_objects()\n"
        "print(before, n, len(gc.get_objects()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    before, frozen, after = map(int, out.stdout.split())
    assert before > 10_000 and frozen >= 0.5 * before and after < 0.01 * before, out.stdout
