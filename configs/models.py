"""模型預設：`tiny`（測試與示範用，CPU 上數秒即可訓練）與 `full`（Whisper-medium + Qwen2.5-7B-Instruct）。

`speech_head="cosyvoice2"` 時說話頭為 CosyVoice2 的 talker（`talker` 區塊：tiny 為 2 層、寬 64；
full 為 Qwen2.5-0.5B），思考者的語音碼輸入嵌入改為 1 個碼本、6561 + 3 個碼（`speech` 區塊不用）。

欄位名稱與 `speakllm_jax.models.whisper.WhisperConfig`、`speakllm_jax.models.qwen2.Qwen2Config`
一致：full 預設由這些 dataclass 的官方預設以 `speakllm.preset_fields` 取得（不另寫欄位清單），
tiny 預設逐一寫出同一組欄位（`tests/test_config_source.py` 檢查兩者欄位相同），設定區塊 → dataclass
只在 `speakllm_jax.models.speakllm.build_speakllm_config` 一處；`whisper_path` / `qwen_path` 指向官方 Hugging Face 資料夾時，訓練開始前會載入其權重。
"""

from __future__ import annotations

import ml_collections

PRESETS = ("tiny", "full")


def _full(cfg: object) -> ml_collections.ConfigDict:
    """full 預設：取官方結構 dataclass 的預設區塊欄位（`speakllm.preset_fields`，不重抄數字與欄位）。"""
    # 延後匯入：models 會載入 JAX／Flax；只讀 tiny 設定（入口在匯入 JAX 之前先檢查設定）時不需要
    from speakllm_jax.models.speakllm import preset_fields

    return ml_collections.ConfigDict(preset_fields(cfg))


def whisper_preset(name: str) -> ml_collections.ConfigDict:
    """Whisper 編碼器（及解碼器）的尺寸。"""
    if name == "tiny":
        return ml_collections.ConfigDict(
            dict(
                num_mel_bins=80,
                d_model=64,
                encoder_layers=2,
                encoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_layers=1,
                decoder_attention_heads=4,
                decoder_ffn_dim=128,
                max_source_positions=1500,
                max_target_positions=64,
                vocab_size=512,
            )
        )
    if name == "full":
        # 延後匯入：models 會載入 JAX／Flax；只讀 tiny 設定（入口在匯入 JAX 之前先檢查設定）時不需要
        from speakllm_jax.models.whisper import whisper_medium

        return _full(whisper_medium())
    raise ValueError(f"未知的模型預設 {name!r}；可用：{PRESETS}")


def qwen_preset(name: str) -> ml_collections.ConfigDict:
    """Qwen2.5 語言模型的尺寸。tiny 的詞表容納真實 Qwen 詞表外加專案特殊符號。"""
    if name == "tiny":
        return ml_collections.ConfigDict(
            dict(
                vocab_size=151_936,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_theta=1_000_000.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                max_position_embeddings=4096,
            )
        )
    if name == "full":
        # 延後匯入：models 會載入 JAX／Flax；只讀 tiny 設定（入口在匯入 JAX 之前先檢查設定）時不需要
        from speakllm_jax.models.qwen2 import Qwen2Config

        return _full(Qwen2Config.qwen2_5_7b())
    raise ValueError(f"未知的模型預設 {name!r}；可用：{PRESETS}")


def model_config(preset: str) -> ml_collections.ConfigDict:
    """完整的模型設定區塊（`config.model`）。"""
    return ml_collections.ConfigDict(
        dict(
            preset=preset,
            whisper=whisper_preset(preset),
            qwen=qwen_preset(preset),
            whisper_path="",
            qwen_path="",
            tokenizer_path="",
            dtype="float32" if preset == "tiny" else "bfloat16",
            param_dtype="float32",
            remat="none" if preset == "tiny" else "dots_no_batch",
            scan_layers=True,
            connector=dict(stack=2, hidden=0),
            # 第 0 階段不需要語音頭；第 1–3 階段設為 "voila"（Voila-Tokenizer 4×2048 碼）
            # 或 "cosyvoice2"（CosyVoice2 talker，使用下面的 talker 區塊）。
            speech_head="none",
            speech=speech_preset(preset),
            talker=talker_preset(preset),
            # 官方 CosyVoice2 `llm.pt` 轉成的同鍵 safetensors（`python -m export.convert_llm_pt`）；
            # 給定時載入 talker 權重。
            talker_path="",
            max_chars_per_token=4,
            num_emotions=0,
            # 長對話的串流方案（訓練遮罩、JAX 串流、PyTorch 孿生共用；docs/inference_system.md）：
            # 編碼器區塊 = chunk_frames 個 LLM 幀（服務端 chunk_frames 應相同），左方脈絡
            # encoder_left_chunks 個區塊（2 幀區塊時 100 塊 = 8 秒）；LLM 看最前面
            # llm_sink_frames 幀（注意力槽）與最近 llm_window_frames 幀（3000 幀 = 2 分鐘）。
            streaming=dict(
                chunk_frames=2, encoder_left_chunks=100, llm_sink_frames=4, llm_window_frames=3000
            ),
        )
    )


def speech_preset(name: str) -> ml_collections.ConfigDict:
    """語音頭（Voila 深度 Transformer）的尺寸；full 為 Voila 的 4 層、寬 1024。"""
    if name == "tiny":
        return ml_collections.ConfigDict(
            dict(
                num_codebooks=4,
                codebook_size=2048,
                depth_layers=2,
                depth_hidden=64,
                depth_heads=4,
                depth_kv_heads=2,
                depth_intermediate=128,
            )
        )
    if name == "full":
        # 延後匯入：models 會載入 JAX／Flax；只讀 tiny 設定（入口在匯入 JAX 之前先檢查設定）時不需要
        from speakllm_jax.models.speech_heads import SpeechHeadConfig

        return _full(SpeechHeadConfig())  # 預設值即 Voila 的實際值
    raise ValueError(f"未知的模型預設 {name!r}；可用：{PRESETS}")


def talker_preset(name: str) -> ml_collections.ConfigDict:
    """CosyVoice2 talker 的尺寸（`speech_head="cosyvoice2"` 時使用）；full 為 Qwen2.5-0.5B。

    欄位對應 `speakllm_jax.models.cosyvoice2_talker.TalkerConfig`（`thinker_hidden` 由思考者
    的寬度決定，不在這裡設定）；`qwen` 子區塊為主幹結構。
    """
    if name == "tiny":
        # tiny 的 talker 主幹與 tiny 的思考者 Qwen 同尺寸（同一個真實 Qwen 詞表）。
        return ml_collections.ConfigDict(
            dict(
                speech_token_size=6561,
                fusion="residual",
                fusion_hidden=0,
                qwen=qwen_preset("tiny").to_dict(),
            )
        )
    if name == "full":
        # 延後匯入：models 會載入 JAX／Flax；只讀 tiny 設定（入口在匯入 JAX 之前先檢查設定）時不需要
        from speakllm_jax.models.cosyvoice2_talker import TalkerConfig

        official = TalkerConfig.cosyvoice2()  # 主幹 Qwen2.5-0.5B、6561 個語音碼
        out = _full(official)
        out.qwen = _full(official.qwen)
        return out
    raise ValueError(f"未知的模型預設 {name!r}；可用：{PRESETS}")
