"""Voila 解碼的參考（測試共用）：transformers 整段解碼，以及逐幀串流開頭對應的整段解碼。"""

from __future__ import annotations

import copy

import numpy as np
import torch
from transformers import EncodecModel
from transformers.models.encodec.modeling_encodec import EncodecConv1d, EncodecConvTranspose1d


def full_decode(model: EncodecModel, codes: np.ndarray) -> np.ndarray:
    """transformers 整段解碼 `[Q, T]` → 波形。"""
    with torch.no_grad():
        out = model.decode(torch.as_tensor(codes, dtype=torch.long)[None, None], [None])
    return out.audio_values[0, 0].numpy()


def frame_rate_constant(model: EncodecModel) -> EncodecModel:
    """同一份權重、幀率上的卷積（第一個轉置卷積之前）改為補零的模型：它的整段解碼就是從第一幀起
    逐幀串流的波形（反射補邊要讀未來的幀，逐幀時讀不到）。"""
    m = copy.deepcopy(model)
    for layer in m.decoder.layers:
        if isinstance(layer, EncodecConvTranspose1d):
            break
        if isinstance(layer, EncodecConv1d):
            layer.pad_mode = "constant"
    return m
