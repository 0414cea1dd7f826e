"""服務端不載入 JAX：`import export.serving.server` 之後 `sys.modules` 裡沒有 jax／flax。"""

from __future__ import annotations

import subprocess
import sys


def test_server_import_loads_no_jax() -> None:
    code = (
        "import sys, export.serving.server, export.serving.client\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "", out.stdout
