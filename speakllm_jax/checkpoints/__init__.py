"""檢查點：Hugging Face safetensors 與 Orbax 的讀寫。"""
