"""全雙工語音對話服務（gRPC）：協定 `duplex.proto`、伺服器、會話狀態機與客戶端。

`duplex_pb2.py`／`duplex_pb2_grpc.py` 由 `python -m grpc_tools.protoc -I. --python_out=.
--grpc_python_out=. export/serving/duplex.proto` 在專案根目錄產生（修改協定後重新產生）。
"""
