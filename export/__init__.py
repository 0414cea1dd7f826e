"""JAX → PyTorch 匯出橋：Orbax 檢查點轉成 Hugging Face 資料夾，加上 PyTorch 孿生模型與一致性檢查。

PyTorch 只在本套件（與測試）中匯入；JAX 訓練路徑不依賴這裡。
"""
