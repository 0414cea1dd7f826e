// 對話頁的兩個 AudioWorklet：麥克風切幀（PCM16）與播放端的有聲量測。

// 麥克風：把輸入切成固定長度的幀（40 ms），轉成 PCM16，連同幀起點的 AudioContext 時間與 RMS 送回主執行緒。
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.size = options.processorOptions.frameSamples;
    this.buf = new Int16Array(this.size);
    this.fill = 0;
    this.t0 = 0;
    this.sq = 0;
  }

  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (!ch) return true;
    for (let i = 0; i < ch.length; i++) {
      if (this.fill === 0) {
        this.t0 = currentTime + i / sampleRate;
        this.sq = 0;
      }
      const v = Math.max(-1, Math.min(1, ch[i]));
      this.buf[this.fill++] = v < 0 ? v * 32768 : v * 32767;
      this.sq += v * v;
      if (this.fill === this.size) {
        const pcm = this.buf.buffer;
        this.port.postMessage({ pcm, t: this.t0, rms: Math.sqrt(this.sq / this.size) }, [pcm]);
        this.buf = new Int16Array(this.size);
        this.fill = 0;
      }
    }
    return true;
  }
}

// 播放端：量測混音後的助理音訊何時真的有聲（每個渲染量子一次），狀態改變時回報時間。
class MeterProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.on = false;
  }

  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    let peak = 0;
    if (ch) for (let i = 0; i < ch.length; i++) peak = Math.max(peak, Math.abs(ch[i]));
    const loud = peak > 1e-4;
    if (loud !== this.on) {
      this.on = loud;
      this.port.postMessage({ on: loud, t: currentTime });
    }
    return true;
  }
}

registerProcessor('capture', CaptureProcessor);
registerProcessor('meter', MeterProcessor);
