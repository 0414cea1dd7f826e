"""CosyVoice2 token2wav 的 PyTorch 實作：流匹配（flow）模型、HiFT 聲碼器與串流包裝。

各子模組直接讀取官方 `flow.pt`、`hift.pt` 的參數鍵名；這裡刻意不匯入任何子模組，
以免只用到其中一部分時也載入 torch。
"""
