"""所有訓練階段共用的預設值；各階段設定檔在此之上修改。"""

from __future__ import annotations

import ml_collections

from configs.models import PRESETS, model_config
from speakllm_jax.models.axis_rules import DEFAULT_RULES
from speakllm_jax.turn_policy import TurnRule


def parse_arg(arg: str | None, **defaults: str) -> ml_collections.ConfigDict:
    """`get_config` 的字串引數（`--config 檔案:引數`，big_vision 的寫法）→ 具名的值。

    引數為逗號分隔的 `鍵=值`；單獨一個預設名稱（`tiny`、`full`）等同 `preset=名稱`。未知的鍵
    拋出 ValueError 並列出可用的鍵。
    """
    out = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep and "preset" in defaults and item in PRESETS:
            key, value = "preset", item
        if key not in out:
            raise ValueError(f"設定檔引數 {item!r} 無法辨識；可用的鍵：{sorted(defaults)}")
        out[key] = value
    if "preset" in out and out.preset not in PRESETS:
        raise ValueError(f"未知的模型預設 {out.preset!r}；可用：{PRESETS}")
    return out


def base_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """回傳完整的預設設定；每個欄位都可在命令列以 `--config.a.b=值` 覆寫。"""
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.phase = "base"
    c.task = "asr_connector"
    c.seed = 0
    c.model = model_config(preset)

    c.data = ml_collections.ConfigDict(
        dict(
            # 空字串表示使用內建示範語料（必要時自動以 espeak-ng 生成）。
            # 訓練資料來源：jsonl（train_manifests 或示範語料的 JSONL+WAV）、shards:DIR（離線鏈的
            # ArrayRecord 分片）或 tfds:NAME[/SPLIT][@DATA_DIR]（tfds 建好的分片）。
            source="jsonl",
            train_manifests="",
            eval_manifests="",
            demo_dir="",
            demo_corpora="aishell1,commonvoice_zh,commonvoice_en",
            max_audio_seconds=8.0,
            # 長度分桶的邊界（梅爾框，100 Hz，4 的倍數）；空的話由 max_audio_seconds 推得。
            bucket_frames=(),
            max_text_tokens=48,
            n_mels=80,
            codeswitch_prob=0.0,
            workers=0,
            # 全雙工（第 1–3 階段）：補齊到的幀數（25 Hz）、示範資料集、語音碼資料夾（逗號分隔）。
            max_frames=768,
            # 只用清單的前 N 列（過擬合實驗）；0 為全部。
            subset=0,
            duplex_sets="dialogue",
            codes_dirs="",
            # 全雙工逐列處理的 op 組合（`speakllm_jax.data.ops`，例如 "load_audio|…|pad_frames"）；
            # 空字串為預設的 `data.duplex.DUPLEX_TRAIN_OPS`。
            ops="",
        )
    )
    # 研究模組的開關與參數（消融時關掉對應的 bool）。
    c.research = ml_collections.ConfigDict(
        dict(
            dual_scale=True,
            lead_frames=2,
            tone_aware=True,
            overlap_aware=True,
            reaction_frames=6,
            barge_in_weight=2.0,
            backchannel_weight=1.5,
            emotion_condition=False,
        )
    )
    # 全雙工損失各項的權重；pad_weight 是「無文字幀預測填充符號」的權重。
    c.loss = ml_collections.ConfigDict(
        dict(text=1.0, code=1.0, turn=1.0, tone=0.2, emotion=0.5, pad_weight=0.5)
    )
    # 輪替頭的決策規則（門檻、遲滯、最短說話幀數；`speakllm_jax.turn_policy.TurnRule`），
    # 匯出時寫進 heads_config.json，JAX 串流推論、PyTorch 孿生與伺服器的 policy=model 共用。
    c.turn_rule = ml_collections.ConfigDict(TurnRule().to_dict())
    c.train = ml_collections.ConfigDict(
        dict(
            steps=30,
            batch_size=8,
            grad_accum=1,
            log_every=1,
            # 每 eval_every 步在評估資料（示範語料的 test 切分或 data.eval_manifests）上算損失；0 為關閉。
            eval_every=0,
            eval_batches=4,
            max_bad_steps=10,
            # 測試用：在這些步把批次換成 NaN，以驗證壞步處理。
            inject_nan_steps=(),
            # JAX 持久編譯快取的資料夾（空字串：不改 JAX 的設定）；重跑或恢復時不必重新編譯。
            compilation_cache_dir="",
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=3e-3 if preset == "tiny" else 1e-4,
            warmup_steps=5 if preset == "tiny" else 500,
            final_lr_ratio=0.1,
            weight_decay=0.01,
            b1=0.9,
            b2=0.98,
            eps=1e-8,
            clip_norm=1.0,
        )
    )
    # 可訓練參數：路徑（以 "/" 連接）符合任一正規表示式者；其餘凍結，且沒有優化器狀態。
    c.trainable = ("connector/.*",)
    c.lora = ml_collections.ConfigDict(
        dict(enabled=False, rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    )
    c.checkpoint = ml_collections.ConfigDict(
        dict(
            every_steps=10,
            max_to_keep=3,
            keep_period=0,
            async_save=True,
            # 從前一階段的執行資料夾初始化（只取參數，依路徑與形狀對應）。
            init_from="",
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # 邏輯軸 → 網格軸的規則表（MaxText 的 logical_axis_rules）；參數、批次與模型內的活化約束都用它。
    c.logical_axis_rules = DEFAULT_RULES
    c.logging = ml_collections.ConfigDict(
        dict(tensorboard=True, wandb_project="voice-duplex-zh", wandb=False, plot=True)
    )
    c.distributed = ml_collections.ConfigDict(
        dict(coordinator_address="", num_processes=1, process_id=0, cpu_collectives="gloo")
    )
    return c
