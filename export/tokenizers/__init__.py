"""PyTorch 端的語音符號抽取器（Voila-Tokenizer、CosyVoice2 S3Tokenizer v2）與離線抽取。"""
