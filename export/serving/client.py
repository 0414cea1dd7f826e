"""全雙工語音服務的客戶端：把音檔以 40 ms 片段串流給伺服器（即時或更快），存下回覆。

用法：`python -m export.serving.client stream --audio x.wav --out reply.wav [--fast]
[--target 127.0.0.1:50051] [--token T] [--tail-seconds 2.0] [--policy vad|model]`

輸出的 reply.wav 與輸入同一時間軸：助理的每個音訊片段放在它的幀位置，其餘為靜音；取樣率為伺服器
送來的音訊片段的取樣率（voila 16 kHz、cosyvoice2 24 kHz，每片段都是 40 ms）。
印出（客戶端量測）：

- 首包延遲：每輪第一個助理音訊片段的幀是 f，從送出使用者第 f 幀的片段到收到該音訊片段的牆鐘時間
  （這一幀的輸入 → 這一幀的輸出）；另列出伺服器量的觸發幀 → 首包延遲。
- 打斷反應：`YIELDED` 事件的幀減去使用者語音起點幀（幀數與毫秒）。
- 即時率：整段串流的牆鐘時間 ÷ 送出的音訊長度（即時模式約為 1；`--fast` 時為處理速度），
  以及伺服器每輪的計算時間 ÷ 產生的音訊長度。
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import soundfile as sf

from export.serving import duplex_pb2 as pb
from export.serving import duplex_pb2_grpc as pb_grpc
from speakllm_jax.audio.constants import FRAME_SECONDS, SAMPLE_RATE
from speakllm_jax.audio.io import AudioError, load_audio
from speakllm_jax.cli import ArgumentParser, UserError, require_file


@dataclass
class StreamResult:
    """一次串流收到的所有東西（依收到的順序）與客戶端量測。"""

    messages: list[pb.ServerMessage] = field(default_factory=list)
    recv_times: list[float] = field(default_factory=list)
    send_times: dict[int, float] = field(default_factory=dict)
    frames_sent: int = 0
    wall_seconds: float = 0.0
    status: grpc.StatusCode = grpc.StatusCode.OK
    detail: str = ""

    def of(self, kind: str) -> list[Any]:
        return [getattr(m, kind) for m in self.messages if m.WhichOneof("payload") == kind]

    def events(self, kind: int | None = None) -> list[pb.Event]:
        return [e for e in self.of("event") if kind is None or e.kind == kind]

    @property
    def output_rate(self) -> int:
        """助理音訊的取樣率（第一個音訊片段的 `sample_rate`；沒有音訊時 16 kHz）。"""
        chunks = self.of("audio")
        return int(chunks[0].sample_rate) if chunks else SAMPLE_RATE

    def reply_wave(self, num_frames: int | None = None) -> np.ndarray:
        """助理音訊放回輸入時間軸（float32，取樣率為 `output_rate`，每幀 40 ms）。"""
        chunks = self.of("audio")
        rates = {int(c.sample_rate) for c in chunks}
        if len(rates) > 1:
            raise ValueError(f"助理音訊片段的 sample_rate 不一致：{sorted(rates)}")
        per = round(self.output_rate * FRAME_SECONDS)
        n = max([num_frames or self.frames_sent] + [c.seq + 1 for c in chunks])
        out = np.zeros(n * per, np.float32)
        for c in chunks:
            x = np.frombuffer(c.pcm16, dtype="<i2").astype(np.float32) / 32768.0
            out[c.seq * per : c.seq * per + len(x)] = x[: max(0, len(out) - c.seq * per)]
        return out

    def first_packet_latencies_ms(self) -> list[float]:
        """每輪：送出第 f 幀輸入 → 收到第 f 幀助理音訊（f 為該輪第一個音訊幀）。"""
        out: list[float] = []
        seen_turn = False
        for m, t in zip(self.messages, self.recv_times, strict=True):
            kind = m.WhichOneof("payload")
            if kind == "event" and m.event.kind == pb.Event.SPEAKING:
                seen_turn = True
            elif kind == "audio" and seen_turn:
                seen_turn = False
                sent = self.send_times.get(int(m.audio.seq))
                if sent is not None:
                    out.append((t - sent) * 1000.0)
        return out

    def summary(self) -> dict[str, Any]:
        metrics = self.of("metrics")
        yields = self.events(pb.Event.YIELDED)
        audio_s = self.frames_sent * FRAME_SECONDS
        return {
            "status": self.status.name,
            "turns": len(metrics),
            "assistant_audio_frames": len(self.of("audio")),
            "output_sample_rate": self.output_rate,
            "text": "".join(t.text for t in self.of("text")),
            "first_packet_latency_ms": self.first_packet_latencies_ms(),
            "server_first_packet_latency_ms": [m.first_packet_latency_ms for m in metrics],
            "barge_in_reaction_frames": [e.frame - e.user_onset_frame for e in yields],
            "barge_in_reaction_ms": [
                (e.frame - e.user_onset_frame) * FRAME_SECONDS * 1000 for e in yields
            ],
            "backchannels": len(self.events(pb.Event.BACKCHANNEL)),
            "stream_rtf": self.wall_seconds / audio_s if audio_s else 0.0,
            "server_rtf": [m.rtf for m in metrics],
        }


def to_pcm16(wave: np.ndarray) -> bytes:
    return (np.clip(np.asarray(wave, np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def stream_audio(
    target: str,
    wave: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    fast: bool = True,
    token: str = "",
    tail_seconds: float = 0.0,
    policy: str = "",
    condition: str = "",
    chunk_ms: int = 40,
    interrupt_at: int | None = None,
    send_end: bool = True,
    timeout: float | None = 120.0,
) -> StreamResult:
    """串流一段波形（float32，`sample_rate`），回傳收到的訊息與量測。

    `fast=False` 時依音訊時間送（即時）；`tail_seconds` 在音檔後補靜音，讓助理有時間回覆；
    `interrupt_at` 在送出第幾個片段後送 `Control{INTERRUPT}`。
    """
    wave = np.asarray(wave, np.float32)
    if tail_seconds > 0:
        wave = np.concatenate([wave, np.zeros(int(tail_seconds * sample_rate), np.float32)])
    step = max(1, sample_rate * chunk_ms // 1000)
    res = StreamResult()
    res.frames_sent = int(np.ceil(len(wave) / sample_rate / FRAME_SECONDS))
    t0 = time.perf_counter()
    done = threading.Event()

    def requests() -> Iterator[pb.ClientMessage]:
        opts = pb.SessionOptions(policy=policy, condition=condition)
        yield pb.ClientMessage(control=pb.Control(kind=pb.Control.START, options=opts))
        for seq, start in enumerate(range(0, len(wave), step)):
            if not fast:
                wait = t0 + start / sample_rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            if done.is_set():
                return
            piece = wave[start : start + step]
            frame = int((start + len(piece)) / sample_rate / FRAME_SECONDS + 1e-6) - 1
            res.send_times.setdefault(frame, time.perf_counter())
            yield pb.ClientMessage(
                audio=pb.AudioChunk(pcm16=to_pcm16(piece), sample_rate=sample_rate, seq=seq)
            )
            if interrupt_at is not None and seq == interrupt_at:
                yield pb.ClientMessage(control=pb.Control(kind=pb.Control.INTERRUPT))
        if send_end:
            yield pb.ClientMessage(control=pb.Control(kind=pb.Control.END))

    md = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DuplexSpeechStub(channel)
        call = stub.Converse(requests(), metadata=md, timeout=timeout)
        try:
            for m in call:
                res.messages.append(m)
                res.recv_times.append(time.perf_counter())
        except grpc.RpcError as e:
            res.status = e.code()
            res.detail = e.details() or ""
        finally:
            done.set()
    res.wall_seconds = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m export.serving.client", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stream", help="串流一個音檔並存下回覆")
    s.add_argument("--audio", required=True, help="輸入音檔（任何取樣率，轉單聲道 16 kHz）")
    s.add_argument("--out", required=True, help="回覆 wav（與輸入同一時間軸）")
    s.add_argument("--target", default="127.0.0.1:50051")
    s.add_argument("--token", default="", help="bearer token（伺服器設定 auth_token 時）")
    s.add_argument("--fast", action="store_true", help="不等即時，盡快送出")
    s.add_argument("--tail-seconds", type=float, default=2.0, help="音檔後補的靜音秒數")
    s.add_argument("--policy", default="", help="vad 或 model（空白：伺服器預設）")
    s.add_argument("--json", default="", help="另把量測寫成 JSON")
    args = p.parse_args(argv)
    require_file(args.audio, "--audio")
    try:
        wave = load_audio(args.audio, SAMPLE_RATE)
    except (
        AudioError,
        RuntimeError,
    ) as err:  # soundfile 讀不了的格式是 LibsndfileError（RuntimeError）
        raise UserError(f"--audio {args.audio}：無法讀取音檔（{err}）") from err
    res = stream_audio(
        args.target,
        wave,
        SAMPLE_RATE,
        fast=args.fast,
        token=args.token,
        tail_seconds=args.tail_seconds,
        policy=args.policy,
    )
    if res.status == grpc.StatusCode.UNAVAILABLE and not res.messages:
        raise UserError(f"--target {args.target}：連不上伺服器（{res.detail}）；伺服器啟動了嗎？")
    if res.status != grpc.StatusCode.OK:
        # 串流以錯誤結束：不寫回覆檔，一行印出狀態與說明。
        raise UserError(f"串流以 {res.status.name} 結束：{res.detail}；未寫出 {args.out}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sf.write(args.out, res.reply_wave(), res.output_rate, subtype="PCM_16")
    summ = res.summary()
    fpl = summ["first_packet_latency_ms"]
    print(f"status: {summ['status']} {res.detail}".rstrip())
    print(
        f"turns: {summ['turns']}, assistant audio frames: {summ['assistant_audio_frames']} "
        f"({summ['output_sample_rate']} Hz)"
    )
    print(
        "first-packet latency (ms): "
        + (", ".join(f"{x:.1f}" for x in fpl) if fpl else "n/a")
        + " | server trigger→first packet: "
        + ", ".join(f"{x:.1f}" for x in summ["server_first_packet_latency_ms"])
    )
    br = summ["barge_in_reaction_frames"]
    print(
        "barge-in reaction: "
        + (", ".join(f"{f} frames ({f * 40} ms)" for f in br) if br else "no barge-in")
    )
    print(
        f"real-time factor: stream {summ['stream_rtf']:.3f}, server per turn "
        + ", ".join(f"{x:.3f}" for x in summ["server_rtf"])
    )
    print(f"reply written to {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(summ, ensure_ascii=False, indent=2) + "\n")
        print(f"metrics written to {args.json}")
    return 0


if __name__ == "__main__":
    from speakllm_jax.cli import run_cli

    raise SystemExit(run_cli(main))
