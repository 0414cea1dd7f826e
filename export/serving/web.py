"""瀏覽器對話頁：靜態網頁與 WebSocket 橋接，接到與 gRPC 伺服器同一個會話引擎。

用法：`python -m export.serving.web --config serving --demo-assets demo_assets`，或
`--config.model_dir=DIR --config.voila_dir=DIR`（與 `export.serving.server` 相同的設定與檢查），
瀏覽器開 `http://127.0.0.1:8080/`（`--config.web_port`；`--config.host` 同時是網頁與 gRPC 的位址）。
`--config.web_grpc_target=HOST:PORT` 改為接到已在執行的 gRPC 伺服器，不在本程序載入模型。

橋接很薄：本程序在同一個事件迴圈裡啟動專案的 `DuplexServer`（gRPC，`--config.port`，0 為隨機埠），
每條 WebSocket 連線轉成一條經 loopback 的 gRPC `Converse` 串流。會話邏輯、驗證、限制與錯誤狀態
都只在 gRPC 伺服器裡；這裡只轉換訊息格式：

- 客戶端 → 伺服器：第一則文字訊息 `{"type": "start", "token", "policy", "condition", "session_id",
  "sample_rate"}` → `Control{START}`（`token` 或連線網址的 `?token=` → metadata
  `authorization: Bearer …`）；二進位訊息 = PCM16 小端單聲道一段（`seq` 由橋接依序編號，取樣率為
  start 的 `sample_rate`，預設 16000）；`{"type": "interrupt"}`、`{"type": "end"}` → 對應的 Control。
- 伺服器 → 客戶端：音訊為二進位訊息，前 8 位元組是小端 int32 `seq` 與 uint32 `sample_rate`，其後
  PCM16；事件、文字、每輪量測為 JSON（`type` 為 `event`／`text`／`metrics`，欄位名與 proto 相同，
  列舉以名稱表示）。
- 串流結束：OK → 關閉碼 1000；錯誤 → 先送 `{"type": "status", "code", "status", "detail"}`
  （完整說明），再以關閉碼 4000 + gRPC 狀態碼關閉（例如 UNAUTHENTICATED 16 → 4016），關閉原因是
  同一段說明（WebSocket 限 123 位元組，超過時截斷）。無法解析的文字訊息由橋接以 4003
  （INVALID_ARGUMENT）關閉。
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from aiohttp import WSMsgType, web

from export.serving import duplex_pb2 as pb
from export.serving import duplex_pb2_grpc as pb_grpc
from export.serving.server import (
    DuplexServer,
    LoopThread,
    check_model_paths,
    freeze_loaded_objects,
    serving_args,
    use_demo_assets,
    wait_for_stop_signal,
)
from export.serving.session import FRAME_SECONDS, POLICIES, SAMPLE_RATE
from speakllm_jax.cli import UserValueError
from speakllm_jax.labels import EMOTIONS, emotion_token

STATIC_DIR = Path(__file__).with_name("static")
CLOSE_OK = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_STATUS_BASE = 4000  # 關閉碼 = 4000 + gRPC 狀態碼
_STATUS_WAIT_S = 5.0  # 讀取迴圈出錯後等伺服器最終狀態的上限（秒）
# 關機時等還在執行的連線處理常式的上限（秒；aiohttp 預設 60），之後取消它們。
_SHUTDOWN_S = 10.0
MAX_CLOSE_REASON_BYTES = 123  # WebSocket 關閉原因的上限（RFC 6455）
AUDIO_HEADER = struct.Struct("<iI")  # 送給瀏覽器的音訊：seq、sample_rate，其後 PCM16


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def close_code(code: grpc.StatusCode) -> int:
    """gRPC 狀態 → WebSocket 關閉碼：OK 為 1000，其餘 4000 + 狀態碼。"""
    return CLOSE_OK if code == grpc.StatusCode.OK else CLOSE_STATUS_BASE + int(code.value[0])


def close_reason(detail: str) -> bytes:
    """說明文字以 UTF-8 截到 WebSocket 關閉原因的上限（不切斷多位元組字元）。"""
    raw = detail.encode("utf-8")[:MAX_CLOSE_REASON_BYTES]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")


def _fields(msg: Any) -> dict[str, Any]:
    """proto 訊息 → JSON 欄位（名稱與 proto 相同，列舉以名稱表示，int64 保持數字）。"""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.enum_type is not None:
            value = f.enum_type.values_by_number[value].name
        elif not isinstance(value, str | bytes | bool | int | float):
            value = list(value)
        out[f.name] = value
    return out


def encode_server_message(msg: pb.ServerMessage) -> bytes | dict[str, Any]:
    """伺服器訊息 → WebSocket 訊息：音訊為二進位（標頭 + PCM16），其餘為 JSON 物件。"""
    kind = msg.WhichOneof("payload")
    if kind == "audio":
        a = msg.audio
        return AUDIO_HEADER.pack(int(a.seq), int(a.sample_rate)) + a.pcm16
    return {"type": kind, **_fields(getattr(msg, kind))}


class BridgeError(Exception):
    """橋接本身拒絕的客戶端訊息（無法解析的文字訊息），帶 gRPC 狀態。"""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class _Inbound:
    """把瀏覽器的 WebSocket 訊息轉成 `ClientMessage`（依序編 `seq`）。"""

    def __init__(self) -> None:
        self.seq = 0
        self.rate = SAMPLE_RATE
        self.token = ""

    def convert(self, msg: Any) -> pb.ClientMessage:
        if msg.type == WSMsgType.BINARY:
            chunk = pb.AudioChunk(pcm16=bytes(msg.data), sample_rate=self.rate, seq=self.seq)
            self.seq += 1
            return pb.ClientMessage(audio=chunk)
        try:
            obj = json.loads(msg.data)
            kind = obj["type"]
        except (ValueError, TypeError, KeyError) as e:
            raise BridgeError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"無法解析的 WebSocket 文字訊息（需要帶 type 的 JSON 物件）：{e}",
            ) from e
        if kind == "start":
            try:
                self.rate = int(obj.get("sample_rate") or SAMPLE_RATE)
            except (TypeError, ValueError) as e:
                raise BridgeError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"start.sample_rate 不是整數：{e}"
                ) from e
            self.token = str(obj.get("token") or self.token)
            options = pb.SessionOptions(
                session_id=str(obj.get("session_id") or ""),
                policy=str(obj.get("policy") or ""),
                condition=str(obj.get("condition") or ""),
            )
            return pb.ClientMessage(control=pb.Control(kind=pb.Control.START, options=options))
        if kind == "interrupt":
            return pb.ClientMessage(control=pb.Control(kind=pb.Control.INTERRUPT))
        if kind == "end":
            return pb.ClientMessage(control=pb.Control(kind=pb.Control.END))
        raise BridgeError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"WebSocket 訊息 type={kind!r} 不支援（可用 start、interrupt、end 或二進位音訊）",
        )


_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


class WebBridge:
    """aiohttp 應用：`/` 網頁、`/static/` 靜態檔、`/config.json` 頁面選項、`/ws` 會話橋接。"""

    def __init__(self, cfg: Any, target: str) -> None:
        self.cfg = cfg
        self.target = target
        n = int(cfg.max_message_bytes)
        # 比 gRPC 的上限寬：介於兩者之間的訊息照轉，由 gRPC 伺服器以它自己的狀態拒絕。
        self.max_ws_message = 2 * n + 64 * 1024
        self.channel: grpc.aio.Channel | None = None
        self.runner: web.AppRunner | None = None
        self.sockets: set[web.WebSocketResponse] = set()
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/config.json", self._page_config)
        app.router.add_get("/ws", self._converse)
        app.router.add_static("/static/", STATIC_DIR)
        app.on_shutdown.append(self._close_sockets)
        return app

    async def start(self) -> int:
        n = int(self.cfg.max_message_bytes)
        self.channel = grpc.aio.insecure_channel(
            self.target,
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", max(n, 4 * 1024 * 1024)),
            ],
        )
        self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=_SHUTDOWN_S)
        await self.runner.setup()
        site = web.TCPSite(self.runner, str(self.cfg.host), int(self.cfg.web_port))
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self.port

    async def stop(self, drain_s: float = 0.0) -> None:
        """停止網頁伺服器；`drain_s` 秒內先等還在轉送的連線自己收尾（gRPC 串流已結束時，
        伺服器的最終狀態與原因才會先送到頁面），之後仍開著的以「網頁伺服器關機」關閉。"""
        deadline = time.monotonic() + drain_s
        while self.sockets and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.runner is not None:
            await self.runner.cleanup()
        if self.channel is not None:
            await self.channel.close()

    async def _close_sockets(self, app: web.Application) -> None:
        for ws in list(self.sockets):
            await ws.close(code=CLOSE_GOING_AWAY, message=close_reason("網頁伺服器關機"))

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def _page_config(self, request: web.Request) -> web.Response:
        conditions = [""] + [emotion_token(e) for e in EMOTIONS]
        return web.json_response(
            {
                "policies": list(POLICIES),
                "policy": str(self.cfg.policy),
                "conditions": conditions,
                "condition": str(self.cfg.condition),
                "sample_rate": SAMPLE_RATE,
                "frame_ms": round(FRAME_SECONDS * 1000),
                "token_required": bool(str(self.cfg.auth_token)),
                "idle_timeout_s": float(self.cfg.idle_timeout_s),
            }
        )

    async def _converse(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self.max_ws_message)
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            await self._bridge(ws, request.query.get("token", ""))
        finally:
            self.sockets.discard(ws)
        return ws

    async def _bridge(self, ws: web.WebSocketResponse, token: str) -> None:
        """第一則訊息（帶 token 的 start）之後才開 gRPC 串流；之後雙向轉送到任一邊結束。"""
        inbound = _Inbound()
        inbound.token = token
        try:
            first = await asyncio.wait_for(ws.receive(), float(self.cfg.idle_timeout_s))
        except TimeoutError:
            first = None  # 讓 gRPC 伺服器依它自己的閒置規則結束
        if first is not None and first.type in _CLOSED:
            return
        try:
            head = inbound.convert(first) if first is not None else None
        except BridgeError as e:
            await self._close(ws, e.code, e.detail)
            return
        meta = (("authorization", f"Bearer {inbound.token}"),) if inbound.token else None
        assert self.channel is not None
        call = pb_grpc.DuplexSpeechStub(self.channel).Converse(metadata=meta)
        out_task = asyncio.ensure_future(self._pump_out(ws, call))
        in_task = asyncio.ensure_future(self._pump_in(ws, call, inbound, head))
        await asyncio.wait({in_task, out_task}, return_when=asyncio.FIRST_COMPLETED)
        bad: BridgeError | None = None
        if in_task.done():
            exc = in_task.exception()
            if exc is None:
                # 讀取迴圈只在客戶端離開或送了無法轉換的訊息時結束：結束 gRPC 串流。
                call.cancel()
                bad = in_task.result()
            else:
                # 寫入失敗多半是伺服器剛以自己的狀態結束串流（例如權杖被拒）：先等那個狀態。
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(out_task), _STATUS_WAIT_S)
                if not out_task.done():
                    call.cancel()
                    bad = BridgeError(grpc.StatusCode.INTERNAL, repr(exc))
        code, detail = await out_task
        if not in_task.done():
            in_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await in_task
        if bad is not None:
            code, detail = bad.code, bad.detail
        await self._close(ws, code, detail)

    async def _pump_in(
        self,
        ws: web.WebSocketResponse,
        call: Any,
        inbound: _Inbound,
        head: pb.ClientMessage | None,
    ) -> BridgeError | None:
        """瀏覽器 → gRPC。只在客戶端離開（None）或送了無法轉換的訊息（該錯誤）時回傳；送完 END 後等著被取消。"""
        try:
            # 伺服器接受（送出初始中繼資料）或拒絕之後才寫：在拒絕的串流上寫入會讓 gRPC 把
            # 最終狀態換成 INTERNAL，瀏覽器就看不到真正的原因（例如權杖被拒）。
            await call.initial_metadata()
            if call.done():
                await asyncio.Event().wait()  # 已被拒絕：狀態由送出迴圈讀
            if head is not None:
                await call.write(head)
            while True:
                msg = await ws.receive()
                if msg.type in _CLOSED:
                    return None
                try:
                    out = inbound.convert(msg)
                except BridgeError as e:
                    return e
                await call.write(out)
                if out.WhichOneof("payload") == "control" and out.control.kind == pb.Control.END:
                    await call.done_writing()
                    await asyncio.Event().wait()  # 等伺服器結束串流（送出迴圈負責收尾）
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await asyncio.Event().wait()  # 串流已被伺服器結束：狀態由送出迴圈讀

    async def _pump_out(self, ws: web.WebSocketResponse, call: Any) -> tuple[grpc.StatusCode, str]:
        """gRPC → 瀏覽器；回傳串流的最終狀態。"""
        try:
            async for msg in call:
                data = encode_server_message(msg)
                if ws.closed:
                    call.cancel()
                    break
                if isinstance(data, bytes):
                    await ws.send_bytes(data)
                else:
                    await ws.send_json(data, dumps=_dumps)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
        except (ConnectionError, RuntimeError):
            call.cancel()  # 瀏覽器已離開
            return grpc.StatusCode.CANCELLED, "WebSocket 連線已關閉"
        except asyncio.CancelledError:
            call.cancel()
            raise
        code = await call.code()
        return code, (await call.details()) or ""

    async def _close(self, ws: web.WebSocketResponse, code: grpc.StatusCode, detail: str) -> None:
        if ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            if code != grpc.StatusCode.OK:
                await ws.send_json(
                    {
                        "type": "status",
                        "code": code.name,
                        "status": int(code.value[0]),
                        "detail": detail,
                    },
                    dumps=_dumps,
                )
            await ws.close(code=close_code(code), message=close_reason(detail or "session ended"))


class WebServer:
    """網頁橋接加上同一事件迴圈裡的 `DuplexServer`（`web_grpc_target` 非空時只接到那台）。"""

    def __init__(self, cfg: Any, engine: Any = None) -> None:
        self.cfg = cfg
        self.grpc_server: Any = None
        target = str(cfg.get("web_grpc_target", ""))
        if not target:
            self.grpc_server = DuplexServer(cfg, engine)
        self.target = target
        self.bridge: WebBridge | None = None
        self.grpc_port = 0
        self.port = 0

    async def start(self) -> int:
        if self.grpc_server is not None:
            self.grpc_port = await self.grpc_server.start()
            host = str(self.cfg.host)
            loopback = "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host
            self.target = f"{loopback}:{self.grpc_port}"
        self.bridge = WebBridge(self.cfg, self.target)
        self.port = await self.bridge.start()
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}/"

    async def stop(self, grace: float | None = None) -> None:
        """先停 gRPC（進行中的會話照伺服器的規則收尾，經橋接送到頁面），再停網頁。"""
        drain = 0.0
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace)
            drain = _STATUS_WAIT_S  # 本行程的串流都已結束：等橋接把結束原因轉給頁面
        if self.bridge is not None:
            await self.bridge.stop(drain)


class WebThread(LoopThread):
    """在背景執行緒的事件迴圈裡跑 `WebServer`（測試用）。"""

    def __init__(self, cfg: Any, engine: Any = None) -> None:
        super().__init__(WebServer(cfg, engine))

    def __enter__(self) -> WebThread:
        self._start()
        return self

    @property
    def url(self) -> str:
        return self.server.url


async def _serve(cfg: Any) -> None:
    server = WebServer(cfg)
    if server.grpc_server is not None:
        server.grpc_server.warm_up()
    freeze_loaded_objects()
    try:
        await server.start()
    except OSError as e:
        await server.stop(0)
        raise UserValueError(
            f"--config.web_port={cfg.web_port}：無法在 {cfg.host} 上監聽（{e.strerror or e}）"
        ) from e
    if server.grpc_server is not None:
        print(f"grpc listening on {server.target}", flush=True)
    else:
        print(f"bridging to grpc at {server.target}", flush=True)
    print(f"web page on {server.url}", flush=True)
    await wait_for_stop_signal()
    await server.stop()
    print("stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    args, cfg = serving_args(
        "python -m export.serving.web", "全雙工語音對話的瀏覽器頁面與 WebSocket 橋接", argv
    )
    if not str(cfg.get("web_grpc_target", "")):
        if args.demo_assets:
            use_demo_assets(cfg, args.demo_assets, args.demo_head)
        check_model_paths(cfg)
    asyncio.run(_serve(cfg))
    return 0


if __name__ == "__main__":
    from speakllm_jax.cli import run_cli

    sys.exit(run_cli(main))
