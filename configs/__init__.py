"""訓練階段與模型預設的 ml_collections 設定。"""
