"""全雙工語音服務（`python -m export.serving.server --config serving`）的設定。

每個欄位都可在命令列以 `--config.欄位=值` 覆寫，例如
`--config.model_dir=/path/export --config.voila_dir=/path/Voila-Tokenizer --config.device=cuda`；
CosyVoice2 頭改給 `--config.token2wav_dir=/path/CosyVoice2-0.5B`。
"""

from __future__ import annotations

import ml_collections

from speakllm_jax.audio.constants import SAMPLE_RATE


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # 模型：`export.to_torch` 匯出的資料夾，以及語音頭對應的解碼器：Voila 頭用 Voila-Tokenizer
    # （EncodecModel）資料夾，CosyVoice2 頭用 token2wav 資料夾（flow.pt、hift.pt、token2wav.json）。
    c.model_dir = ""
    c.voila_dir = ""
    c.token2wav_dir = ""
    c.device = "cpu"
    c.dtype = "float32"
    c.attn_implementation = "sdpa"
    # 排程："batched"（預設）：一個迴圈每 40 ms 一個 tick，把所有會話到期的幀合成一批
    # （模型計算只在一個執行緒）；"per_session"：每個會話自己的計算工作，在 compute_workers 個
    # 執行緒裡輪流跑（舊的路徑，基準比較用）。
    c.scheduler = "batched"
    # 每個工作執行緒的 torch 執行緒數與（per_session 排程）同時計算的工作執行緒數。
    c.torch_threads = 1
    c.compute_workers = 2

    # 網路。
    c.host = "127.0.0.1"
    c.port = 50051
    c.auth_token = ""  # 非空時要求 metadata `authorization: Bearer <token>`
    c.max_sessions = 32
    # 開服前以 max_sessions 個靜音會話先跑一次批次路徑：常駐 KV 快取先長到這麼多列（服務中不必
    # 倍增複製），第一批會話也不付第一次配置的成本。只在命令列入口（伺服器、網頁橋接）做。
    c.warmup = True
    c.max_message_bytes = 256 * 1024
    c.max_session_seconds = 0.0  # 使用者音訊總長上限（秒）；0 表示不限
    c.idle_timeout_s = 10.0  # 這麼久沒有音訊（空片段不算）就結束會話
    # 比即時快的客戶端被節流到即時：每一幀不早於它的即時到期時間才算。
    c.pace_realtime = True
    # 准入控制：依量到的每幀計算時間（批次排程：最近 256 個 tick 的計算秒數 ÷ 會話幀數；
    # per_session：最近 256 次處理，含排隊），會話數超過
    # headroom × 計算執行緒數 × 40 ms ÷ 每幀時間（再多就跟不上即時）時拒絕新會話
    # （RESOURCE_EXHAUSTED）。0 表示只看 max_sessions（預設：共用的 CPU 上量到的時間雜訊大）；
    # 專用機器建議 0.9。
    c.admission_headroom = 0.0
    c.shutdown_grace_s = 5.0

    # 音訊：16 kHz、一幀 40 ms（640 樣本）；取樣率不符時 "resample" 或 "reject"。
    c.sample_rate = SAMPLE_RATE
    c.sample_rate_policy = "resample"
    c.chunk_frames = 2  # 每幾幀跑一次串流 Whisper 編碼（區塊因果遮罩的區塊大小）
    # 區塊的模型步攤開：每收到一幀跑一個模型步（落後超過 chunk_frames − 1 步才補跑），而不是區塊
    # 湊滿時把它的幀一次跑完。批次排程每 tick 一輪、所有會話一起，而不是區塊 tick 兩輪、下一個 tick
    # 沒有；代價是區塊裡後面的幀晚至多 (chunk_frames − 1) × 40 ms。False 為舊的一次跑完。
    c.spread_steps = True
    # Voila 的逐幀解碼："stream"（預設）：有狀態的串流解碼器，每個說話幀只解這一幀、保留卷積與
    # LSTM 的狀態（`export.tokenizers.voila_stream`）；"window"：每幀重解最近 decode_window_frames
    # 幀的語音碼、取最後一幀（舊的近似，基準比較用）。
    c.decode_mode = "stream"
    c.decode_window_frames = 8

    # 輪替策略："vad"（規則決定何時說話，模型產生內容）或 "model"（輪替頭決定）。
    c.policy = "vad"
    c.vad_aggressiveness = 2
    c.onset_frames = 2  # 連續幾幀語音才算使用者開始說話
    c.end_silence_ms = 320  # 使用者靜音多久算說完（vad 策略：接著回應）
    c.max_reply_seconds = 3.0  # vad 策略：每輪最多說多久
    c.backchannel_max_seconds = 0.4  # 助理說話時，短於此的使用者語音視為附和，不打斷
    # model 策略：附和與打斷由輪替頭分辨（yield 即打斷）；使用者語音長到這個秒數仍未讓出時才
    # 以長度判定為打斷（附和最長約 0.6 秒）。停住仍在開口後 onset_frames 幀，停止延遲不變。
    c.model_barge_in_seconds = 0.8
    c.reaction_window_frames = 15  # 打斷反應的上限（自使用者語音起點起算的幀數）
    # model 策略：覆寫匯出資料夾 `heads_config.json` 的 `turn_rule`（`speakllm_jax.turn_policy.TurnRule`
    # 的欄位），格式 "KEY=VALUE,KEY=VALUE"；空字串表示照匯出的規則。調規則時不必重新匯出。
    c.turn_rule = ""
    c.condition = ""  # 預設條件符號（例如 "<|emo_neutral|>"）

    # 瀏覽器頁面（`python -m export.serving.web`）：網頁與 WebSocket 的埠（位址同 `host`）；
    # `web_grpc_target` 非空（HOST:PORT）時接到那台 gRPC 伺服器，不在本程序啟動伺服器與載入模型。
    c.web_port = 8080
    c.web_grpc_target = ""
    return c
