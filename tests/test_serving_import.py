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
