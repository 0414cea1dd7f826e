"""資料設定：每個檔案的 `get_config()` 列出要下載（download）與轉成清單（corpora）的語料。"""
