"""CosyVoice2 `llm.pt` → safetensors（一次性轉換，PyTorch 端）。

用法：`python -m export.convert_llm_pt --input CosyVoice2-0.5B/llm.pt [--output llm.safetensors]`

官方 `llm.pt` 是 `torch.save(Qwen2LM.state_dict())` 的 pickle；JAX 訓練路徑不匯入 torch，所以
先在這裡轉成同鍵的 safetensors，再以 `--config.model.talker_path=…/llm.safetensors` 給訓練。
鍵、形狀與型別（含 bfloat16）原樣保留；綁定詞嵌入時 state_dict 中共用記憶體的
`llm.model.lm_head.weight` 各自寫出一份。`--reverse` 把 safetensors 轉回 `.pt`（官方程式讀取用）。
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from speakllm_jax.cli import ArgumentParser, UserValueError, print_summary, require_file, run_cli


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """讀取 `llm.pt`（`torch.load(weights_only=True)`）；內容不是「鍵 → 張量」時指名報錯。"""
    p = require_file(path, "--input", "需要 CosyVoice2 的 llm.pt")
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise UserValueError(f"{p} 的內容是 {type(obj).__name__}，預期 state_dict（鍵 → 張量）")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise UserValueError(f"{p} 的鍵 {k} 不是張量（{type(v).__name__}）")
        # 綁定的權重共用記憶體，safetensors 不收共用的張量：各自複製一份。
        out[str(k)] = v.detach().contiguous().clone()
    return out


def convert_llm_pt(src: str | Path, dst: str | Path | None = None) -> Path:
    """`llm.pt` → 同鍵的 safetensors（預設寫在旁邊，副檔名改為 .safetensors），回傳輸出路徑。"""
    src = Path(src)
    out = Path(dst) if dst else src.with_suffix(".safetensors")
    tensors = read_state_dict(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt", "source": src.name})
    return out


def safetensors_to_pt(src: str | Path, dst: str | Path | None = None) -> Path:
    """反方向：safetensors → `torch.save` 的 state_dict（官方 CosyVoice2 程式讀 `.pt`）。"""
    src = require_file(src, "--input", "需要 llm.safetensors")
    out = Path(dst) if dst else src.with_suffix(".pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(load_file(str(src)), out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m export.convert_llm_pt", description=__doc__.splitlines()[0])
    p.add_argument(
        "--input", required=True, help="CosyVoice2 的 llm.pt（--reverse 時為 safetensors）"
    )
    p.add_argument("--output", default="", help="輸出檔（預設與輸入同名，換副檔名）")
    p.add_argument("--reverse", action="store_true", help="safetensors → .pt")
    a = p.parse_args(argv)
    if a.reverse:
        out = safetensors_to_pt(a.input, a.output or None)
        print_summary("完成：safetensors → .pt", [("輸出", out)])
        return 0
    out = convert_llm_pt(a.input, a.output or None)
    print_summary(
        "完成：llm.pt → safetensors",
        [("輸出", out)],
        [
            f"python launch/train.py --config phase2:preset=full --config.model.speech_head=cosyvoice2 "
            f"--config.model.talker_path={out}"
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
