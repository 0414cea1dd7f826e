"""模型：Whisper、Qwen2、連接器與語音頭，皆以 Flax NNX 撰寫。"""
