"""Orbax 檢查點 → PyTorch／Hugging Face 資料夾。

用法：`python -m export.to_torch --checkpoint RUN_DIR [--step N] --out DIR [--seed S]`

寫出：

- `DIR/llm/`：Qwen2（LoRA 已合併），`transformers.AutoModelForCausalLM.from_pretrained` 可讀。
- `DIR/whisper_encoder/`：僅編碼器的 Whisper 資料夾（無前綴的 `WhisperEncoder` 佈局，
  `architectures=["WhisperEncoder"]`），以 `transformers.models.whisper.modeling_whisper.WhisperEncoder
  .from_pretrained` 讀取。語音大模型沒有 Whisper 解碼器的權重，所以不寫 `WhisperModel` 資料夾
  （那需要假造一個隨機解碼器）。
- `DIR/depth/`：（`speech_head="voila"`）Voila 式深度 Transformer，本身就是一個 `Qwen2ForCausalLM`。
- `DIR/talker/`：（`speech_head="cosyvoice2"`）CosyVoice2 的 talker：
  `llm.safetensors` 的鍵與官方 `llm.pt`（`Qwen2LM.state_dict()`）相同——`llm.model.model.*`、
  `llm.model.lm_head.weight`、`llm_embedding.weight`、`speech_embedding.weight`、
  `llm_decoder.{weight,bias}`——另加本專案的融合模組 `fusion.{proj_in,proj_out,gate}.{weight,bias}`；
  `talker_config.json` 為主幹的 HF `config.json` 內容（`qwen`）與 `speech_token_size`、
  `thinker_hidden`、`fusion`、`fusion_hidden`。選 safetensors 而不是 `torch.save` 的 `.pt`：
  不經 pickle、可記憶體映射，JAX 端 `load_cosyvoice2_llm` 與 PyTorch 端都能直接讀；需要官方格式時
  `python -m export.convert_llm_pt --reverse --input talker/llm.safetensors` 即得同鍵的
  `llm.pt`（官方程式以 `strict=False` 載入時忽略 `fusion.*`）。
- `DIR/heads.safetensors` + `DIR/heads_config.json`：連接器、思考者的語音碼嵌入、深度輸入投影與
  碼本位置（voila）、輪替／聲調／情緒頭與聲調嵌入（PyTorch `state_dict` 的鍵與佈局），以及重建
  所需的設定值。
- `DIR/tokenizer/`：含專案特殊符號的分詞器（`save_pretrained`）。
- `DIR/parity.json`：匯出當下以隨機輸入（fp32）量測的 JAX 與 PyTorch 孿生的最大絕對差。
- `DIR/export_info.json`：來源執行資料夾、步數、階段。
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from export.torch_model import (
    HEADS_CONFIG,
    HEADS_FILE,
    TALKER_CONFIG,
    TALKER_DIR,
    TALKER_WEIGHTS,
    HeadsConfig,
    load_exported,
)
from speakllm_jax.cli import ArgumentParser, print_summary, run_cli
from speakllm_jax.cpu_simulation import configure_cpu_simulation
from speakllm_jax.data.demo_data import duplex_paths
from speakllm_jax.training.config_io import require_run_dir
from speakllm_jax.turn_policy import TurnRule


def heads_config_from(model: Any, pad_id: int, turn_rule: Any = None) -> HeadsConfig:
    """由 JAX `SpeakLLM` 的設定取出重建小模組所需的欄位（見 `HeadsConfig.from_model_config`）；
    `turn_rule`（訓練設定的 `turn_rule` 或 `TurnRule`）缺省為 `TurnRule()`。"""
    rule = turn_rule if isinstance(turn_rule, TurnRule) else TurnRule.from_dict(turn_rule)
    return HeadsConfig.from_model_config(model.cfg, pad_id, turn_rule=rule.to_dict())


def _np(x: Any) -> np.ndarray:
    return np.asarray(x[...], dtype=np.float32)


def heads_state_dict(model: Any, cfg: HeadsConfig) -> dict[str, Any]:
    """JAX 小模組參數 → `SpeechHeads` 的 state_dict（torch 張量；線性層權重轉成 `[out, in]`）。"""

    def lin(prefix: str, layer: Any, bias: bool = True) -> dict[str, np.ndarray]:
        out = {f"{prefix}.weight": _np(layer.kernel).T}
        if bias:
            out[f"{prefix}.bias"] = _np(layer.bias)
        return out

    conn = model.connector
    sd: dict[str, np.ndarray] = {
        "connector.norm.weight": _np(conn.norm.weight),
        "connector.norm.bias": _np(conn.norm.bias),
        **lin("connector.fc1", conn.fc1),
        **lin("connector.fc2", conn.fc2),
    }
    if cfg.has_speech:
        sd["audio_embed"] = _np(model.audio_embed.table)
        if cfg.speech_head == "voila":
            sd.update(lin("depth_in_proj", model.speech_head.in_proj, bias=False))
            sd["codebook_pos"] = _np(model.speech_head.codebook_pos)
        sd.update(lin("turn_head", model.turn_head))
        sd["tone_embed.weight"] = _np(model.tone_embed.embedding)
        sd.update(lin("tone_head", model.tone_head))
        if model.emotion_head is not None:
            sd.update(lin("emotion_head", model.emotion_head))
    return {
        k: torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True))
        for k, v in sd.items()
    }


def talker_config_dict(talker: Any) -> dict[str, Any]:
    """JAX `CosyVoice2Talker` 的設定 → `talker_config.json` 的內容。"""
    # 延後匯入：入口先設定 CPU 模擬再載入 JAX
    from speakllm_jax.checkpoints.qwen2_hf import qwen2_config_to_hf

    t = talker.cfg
    return {
        "format": "cosyvoice2_llm",
        "qwen": qwen2_config_to_hf(t.qwen),
        "speech_token_size": int(t.speech_token_size),
        "thinker_hidden": int(t.thinker_hidden),
        "fusion": str(t.fusion),
        "fusion_hidden": int(t.fusion_hidden),
    }


def save_talker(talker: Any, directory: str | Path) -> Path:
    """寫出 `talker/`：`llm.safetensors`（官方 `llm.pt` 鍵佈局 + `fusion.*`）與 `talker_config.json`。"""
    # 延後匯入：入口先設定 CPU 模擬再載入 JAX
    from speakllm_jax.checkpoints.cosyvoice2_llm import save_cosyvoice2_llm

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_cosyvoice2_llm(talker, d / TALKER_WEIGHTS, include_fusion=True)
    (d / TALKER_CONFIG).write_text(
        json.dumps(talker_config_dict(talker), indent=2) + "\n", encoding="utf-8"
    )
    return d


def export_model(
    model: Any,
    out: str | Path,
    tokenizer: Any = None,
    pad_id: int = 0,
    parity_seed: int | None = 0,
    info: dict[str, Any] | None = None,
    turn_rule: Any = None,
) -> dict[str, Any]:
    """把 JAX `SpeakLLM` 寫成 PyTorch 可讀的資料夾；`parity_seed` 不為 None 時做一致性檢查。

    `turn_rule`：輪替決策規則（寫進 `heads_config.json`；缺省 `TurnRule()`）。

    回傳一致性檢查的結果（未檢查時為空字典）。
    """
    # 延後匯入：入口先設定 CPU 模擬再載入 JAX
    from speakllm_jax.checkpoints.hf import save_qwen2, save_whisper

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = heads_config_from(model, pad_id, turn_rule)
    save_qwen2(model.llm, out / "llm")
    save_whisper(model.encoder, out / "whisper_encoder")
    if cfg.speech_head == "voila":
        save_qwen2(model.speech_head.depth, out / "depth")
    elif (out / "depth").exists():
        shutil.rmtree(out / "depth")
    if cfg.speech_head == "cosyvoice2":
        save_talker(model.speech_head, out / TALKER_DIR)
    elif (out / TALKER_DIR).exists():
        shutil.rmtree(out / TALKER_DIR)
    save_file(heads_state_dict(model, cfg), str(out / HEADS_FILE), metadata={"format": "pt"})
    (out / HEADS_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tok = getattr(tokenizer, "tok", tokenizer)
        tok.save_pretrained(str(out / "tokenizer"))
    if info is not None:
        (out / "export_info.json").write_text(
            json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
    report: dict[str, Any] = {}
    if parity_seed is None:
        # 不留下舊的檢查結果，以免誤以為這次的匯出檢查過。
        (out / "parity.json").unlink(missing_ok=True)
    else:
        # 延後匯入：入口先設定 CPU 模擬再載入 JAX
        from export.parity import check_parity

        torch_model = load_exported(out)
        report = check_parity(model, torch_model, seed=int(parity_seed))
        (out / "parity.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def export_run(
    checkpoint: str | Path,
    out: str | Path,
    step: int | None = None,
    parity_seed: int | None = 0,
) -> dict[str, Any]:
    """由訓練執行資料夾（`config.json` + Orbax 檢查點）匯出；回傳一致性檢查結果。"""
    # 延後匯入：入口先設定 CPU 模擬再載入 JAX
    from speakllm_jax.training.runs import load_run

    cfg, task, model, step = load_run(checkpoint, step)
    pad_id = int(getattr(task, "pad_id", task.tokenizer.eos_id))
    info = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "step": int(step),
        "phase": str(cfg.get("phase", "")),
        "task": str(cfg.get("task", "")),
    }
    rule = cfg.get("turn_rule")
    return export_model(model, out, task.tokenizer, pad_id, parity_seed, info, turn_rule=rule)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m export.to_torch",
        description="把訓練執行資料夾的 Orbax 檢查點匯出成 PyTorch／Hugging Face 資料夾",
    )
    p.add_argument(
        "--checkpoint", required=True, help="訓練執行資料夾（含 config.json 與 checkpoints/）"
    )
    p.add_argument("--step", type=int, default=None, help="步數（預設最新）")
    p.add_argument("--out", required=True, help="輸出資料夾")
    p.add_argument("--seed", type=int, default=0, help="一致性檢查的隨機種子")
    p.add_argument("--skip-parity", action="store_true", help="不做一致性檢查（不寫 parity.json）")
    args = p.parse_args(argv)
    configure_cpu_simulation()
    require_run_dir(args.checkpoint, args.step, flag="--checkpoint")
    report = export_run(
        args.checkpoint, args.out, args.step, None if args.skip_parity else args.seed
    )
    if report:
        print(json.dumps({"max_abs_diff": report.get("max_abs_diff")}, indent=2))
    out = Path(args.out)
    info = json.loads((out / "export_info.json").read_text(encoding="utf-8"))
    written = [("匯出資料夾", out)]
    if report:
        written.append(("一致性檢查", out / "parity.json"))
    print_summary(
        f"已匯出：第 {info['step']} 步",
        written,
        [serve_command(out, info["checkpoint"])],
    )
    return 0


def serve_command(model_dir: Path, run_dir: str | Path) -> str:
    """匯出後啟動服務的指令：依語音頭選 Voila-Tokenizer 或 token2wav；示範資料的執行用示範解碼器。"""
    head = json.loads((model_dir / HEADS_CONFIG).read_text(encoding="utf-8"))["speech_head"]
    cmd = f"python -m export.serving.server --config serving --config.model_dir={shlex.quote(str(model_dir))}"
    if head == "cosyvoice2":
        return cmd + " --config.token2wav_dir=<CosyVoice2 token2wav 資料夾（flow.pt、hift.pt）>"
    if head != "voila":
        return (
            f"（speech_head={head!r} 的模型沒有語音頭，不能啟動語音服務；請匯出第 1–3 階段的執行）"
        )
    run_cfg = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    data = run_cfg.get("data", {})
    demo = duplex_paths(data.get("demo_dir") or None)["tokenizer"]
    if not data.get("codes_dirs") and demo.is_dir():
        return cmd + f" --config.voila_dir={shlex.quote(str(demo))}  # 示範 Voila-Tokenizer"
    return cmd + " --config.voila_dir=<Voila-Tokenizer 資料夾>"


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
