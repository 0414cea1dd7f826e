"""網格軸與邏輯軸的名稱（純常數，不匯入 JAX，所以規劃工具在設定裝置數之前也能用）。"""

# 裝置網格的軸：資料平行、FSDP、張量平行。
MESH_AXES = ("data", "fsdp", "tensor")

# 專案使用的邏輯軸名稱。新增名稱時也要在 sharding 規則表中補上。
AXES = (
    "batch",
    "length",
    "vocab",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "layers",
    "norm",
    "conv_in",
    "conv_out",
    "kernel",
    "codebook",
)
