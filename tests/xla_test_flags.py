"""測試的 XLA 旗標（conftest 在匯入 JAX 之前設定；個別測試的子程序需要時由此取用）。"""

# 關掉 XLA CPU 的並行最佳化排程：開著時各模擬裝置執行集體通訊的順序可能不同，
# 複雜的分片程式（例如第 3 階段在 2×2×2 網格上）會在 rendezvous 卡住 40 秒後中止。
# 2 核機器負載高時，8 個模擬裝置的執行緒可能等超過預設的 40 秒：把中止門檻放寬到 300 秒。
CPU_MESH_FLAGS = (
    "--xla_force_host_platform_device_count=8 "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false "
    "--xla_cpu_collective_call_terminate_timeout_seconds=300"
)
# 測試的 tiny 模型執行很快、編譯很慢：後端（LLVM）最佳化等級降到 0，編譯時間約減半。數值只在
# 最後一位附近不同（約 1e-6）；測試中的比較都在同一組旗標下，parity 容差 1e-4。
TEST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"
