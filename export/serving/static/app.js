// SpeakLLM 全雙工對話頁：麥克風（AudioWorklet）→ 16 kHz 單聲道 PCM16、每 40 ms 一幀 → WebSocket；
// 助理音訊經小的抖動緩衝播放，伺服器說 YIELDED 時在一個音訊幀內清空。
// 頁面狀態都在 window.speakllm（測試與除錯用）：所有時間都是這個頁面的 AudioContext 時鐘（秒）。
'use strict';

const FRAME_S = 0.04; // 一幀 40 ms（使用者與助理共用的時間軸）
const LEAD_S = 0.1; // 抖動緩衝的預設：一輪開頭或排空後，第一個片段排在現在之後這麼久
let leadS = LEAD_S; // 網址參數 lead=秒（0.02–2）可調：網路抖動大時加深
const STARVED_S = 0.01; // 排程尾端離現在不到這麼久就算排空
const AUDIO_HEADER = 8; // 伺服器音訊訊息：int32 seq、uint32 sample_rate，其後 PCM16
const TIMELINE_S = 12; // 時間軸顯示最近幾秒
const VOICE_RMS = 0.01; // 時間軸上把麥克風幀畫成「使用者有聲」的門檻（只用於顯示）

const S = (window.speakllm = {
  config: null,
  started: false, // WebSocket 已開並送出 start
  sessionStarted: false, // 收到 SESSION_STARTED
  ended: false,
  sampleRate: null,
  captureStart: null,
  frameTimes: [], // 第 i 個送出的使用者幀的起點（AudioContext 時間）
  levels: [], // 最近的麥克風幀 [時間, RMS]（時間軸用）
  events: [], // 伺服器事件，加上收到的時間 at
  chunks: [], // 排進播放的助理音訊：seq、turn、start、end、receivedAt、stoppedAt
  flushes: [], // 清空播放佇列：reason、turn、receivedAt（事件收到）、at（清空時間）、cutSeconds
  audible: [], // 播放端量到的有聲區間 [開始, 結束]（結束為 null 表示仍在發聲）
  rebuffers: [], // 一輪中途排空後重新起播（伺服器停住或落後）
  seqProblems: [], // 同一輪的 seq 不連續或重複
  droppedAfterYield: 0,
  turns: {}, // 輪次 → 開口幀、第一個片段、延遲、量測
  texts: {}, // 輪次 → 助理文字
  status: null, // 錯誤結束時橋接送來的 {code, status, detail}
  close: null, // WebSocket 關閉碼與原因
  messages: [], // 顯示給使用者的訊息 {kind, text}
  consoleErrors: [],
  muted: false,
});

// 播放佇列裡還沒播的秒數（測試用）。
window.speakllmQueued = () => (ctx ? Math.max(0, nextStart - ctx.currentTime) : 0);

const origError = console.error.bind(console);
console.error = (...args) => {
  S.consoleErrors.push(args.map(String).join(' '));
  origError(...args);
};
window.addEventListener('error', (e) => S.consoleErrors.push(String(e.message || e)));
window.addEventListener('unhandledrejection', (e) =>
  S.consoleErrors.push('unhandled rejection: ' + String(e.reason)),
);

const $ = (id) => document.getElementById(id);
let ctx = null;
let ws = null;
let mic = null;
let capture = null;
let master = null;
let currentTurn = -1;
let yieldedTurn = -1;
let nextStart = 0;
let opened = false;
let userEnded = false;
const live = new Set(); // 還在排程或播放中的 {src, chunk}

function now() {
  return ctx ? ctx.currentTime : 0;
}

function showMessage(kind, text) {
  const el = $('message');
  el.hidden = false;
  el.dataset.kind = kind;
  el.textContent = text;
  S.messages.push({ kind, text, at: now() });
}

function clearMessage() {
  const el = $('message');
  el.hidden = true;
  el.textContent = '';
  delete el.dataset.kind;
}

function setText(id, text) {
  $(id).textContent = text;
}

function setRunning(running) {
  $('start').disabled = running;
  for (const id of ['stop', 'interrupt', 'mute']) $(id).disabled = !running;
  for (const id of ['policy', 'condition', 'token', 'aec']) $(id).disabled = running;
  $('mute').textContent = '暫停麥克風';
}

async function loadConfig() {
  const res = await fetch('/config.json');
  const cfg = await res.json();
  S.config = cfg;
  const policy = $('policy');
  for (const p of cfg.policies) policy.add(new Option(p, p, false, p === cfg.policy));
  const cond = $('condition');
  for (const c of cfg.conditions) cond.add(new Option(c || '（無）', c, false, c === cfg.condition));
  const params = new URLSearchParams(location.search);
  if (params.has('token')) $('token').value = params.get('token');
  if (params.has('policy')) policy.value = params.get('policy');
  if (params.get('aec') === '0') $('aec').checked = false;
  const lead = parseFloat(params.get('lead'));
  if (lead >= 0.02 && lead <= 2) leadS = lead;
}

function resetSession() {
  Object.assign(S, {
    started: false,
    sessionStarted: false,
    ended: false,
    captureStart: null,
    frameTimes: [],
    levels: [],
    events: [],
    chunks: [],
    flushes: [],
    audible: [],
    rebuffers: [],
    seqProblems: [],
    droppedAfterYield: 0,
    turns: {},
    texts: {},
    status: null,
    close: null,
    muted: false,
  });
  currentTurn = -1;
  yieldedTurn = -1;
  nextStart = 0;
  opened = false;
  userEnded = false;
  $('events').replaceChildren();
  $('transcript').replaceChildren();
  $('turns').tBodies[0].replaceChildren();
}

async function openAudio(aec) {
  const constraints = {
    audio: { channelCount: 1, echoCancellation: aec, noiseSuppression: aec, autoGainControl: aec },
  };
  try {
    mic = await navigator.mediaDevices.getUserMedia(constraints);
  } catch (e) {
    let text = `無法使用麥克風（${e.name}）：${e.message}`;
    if (e.name === 'NotAllowedError' || e.name === 'SecurityError') {
      text = '麥克風被拒絕：請在瀏覽器允許本頁使用麥克風後再按「開始」。';
    } else if (e.name === 'NotFoundError') {
      text = '找不到麥克風：請接上麥克風後再按「開始」。';
    }
    showMessage('mic', text);
    return false;
  }
  let source;
  try {
    source = ctx.createMediaStreamSource(mic);
  } catch (e) {
    // 不能在 16 kHz 的 AudioContext 接麥克風的瀏覽器：改用裝置的取樣率，由伺服器重取樣。
    await ctx.close();
    ctx = new AudioContext({ latencyHint: 'interactive' });
    source = ctx.createMediaStreamSource(mic);
  }
  await ctx.audioWorklet.addModule('/static/worklets.js');
  S.sampleRate = ctx.sampleRate;
  capture = new AudioWorkletNode(ctx, 'capture', {
    processorOptions: { frameSamples: Math.round(ctx.sampleRate * FRAME_S) },
  });
  capture.port.onmessage = (e) => onFrame(e.data);
  source.connect(capture);
  capture.connect(ctx.destination); // 輸出是靜音；接上讓它持續被處理
  if (!master || master.context !== ctx) {
    master = ctx.createGain();
    master.connect(ctx.destination);
    const meter = new AudioWorkletNode(ctx, 'meter');
    meter.port.onmessage = (e) => onMeter(e.data);
    master.connect(meter);
    meter.connect(ctx.destination);
  }
  return true;
}

async function start() {
  clearMessage();
  resetSession();
  setRunning(true);
  setText('conn', '連線中…');
  if (!ctx) ctx = new AudioContext({ sampleRate: S.config.sample_rate, latencyHint: 'interactive' });
  await ctx.resume();
  if (!(await openAudio($('aec').checked))) {
    teardown();
    return;
  }
  const url = new URL('/ws', location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => {
    opened = true;
    ws.send(
      JSON.stringify({
        type: 'start',
        token: $('token').value,
        policy: $('policy').value,
        condition: $('condition').value,
        session_id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now()),
        sample_rate: ctx.sampleRate,
      }),
    );
    S.started = true;
    setText('conn', '已連線');
  };
  ws.onmessage = (e) => {
    if (typeof e.data === 'string') onJson(JSON.parse(e.data));
    else onAudio(e.data);
  };
  ws.onclose = (e) => onClose(e);
}

function teardown() {
  if (mic) for (const t of mic.getTracks()) t.stop();
  mic = null;
  if (capture) capture.disconnect();
  capture = null;
  ws = null;
  setRunning(false);
}

function onFrame({ pcm, t, rms }) {
  S.levels.push([t, rms]);
  if (S.levels.length > 1000) S.levels.splice(0, S.levels.length - 1000);
  if (!ws || ws.readyState !== WebSocket.OPEN || !S.started || S.muted) return;
  if (S.captureStart === null) S.captureStart = t;
  S.frameTimes.push(t);
  ws.send(pcm);
}

function onMeter({ on, t }) {
  if (on) S.audible.push([t, null]);
  else if (S.audible.length && S.audible[S.audible.length - 1][1] === null) {
    S.audible[S.audible.length - 1][1] = t;
  }
}

function onJson(m) {
  if (m.type === 'event') onEvent(m);
  else if (m.type === 'text') onText(m);
  else if (m.type === 'metrics') onMetrics(m);
  else if (m.type === 'status') S.status = m;
}

function turnOf(i) {
  if (!S.turns[i]) {
    S.turns[i] = { turn: i, frame: null, firstAudio: null, lastSeq: null, latencyMs: null };
  }
  return S.turns[i];
}

function onEvent(ev) {
  ev.at = now();
  S.events.push(ev);
  logEvent(ev);
  switch (ev.kind) {
    case 'SESSION_STARTED':
      S.sessionStarted = true;
      setText('state', '聆聽中');
      break;
    case 'SPEAKING':
      currentTurn = ev.turn;
      nextStart = 0; // 新的一輪：重新起播
      turnOf(ev.turn).frame = ev.frame;
      setText('state', '助理說話中');
      renderTurns();
      break;
    case 'YIELDED':
      yieldedTurn = ev.turn;
      flush('yielded', ev);
      setText('state', ev.detail === 'interrupt' ? '已打斷' : '使用者插話：助理讓出');
      break;
    case 'BACKCHANNEL':
      setText('state', '附和：助理繼續');
      break;
    case 'LISTENING':
      setText('state', '聆聽中');
      break;
    case 'SESSION_ENDED':
      S.ended = true;
      if (!userEnded) showMessage('ended', `伺服器結束了會話：${ev.detail}`);
      break;
    default:
      break;
  }
}

function onText(m) {
  S.texts[m.turn] = (S.texts[m.turn] || '') + m.text;
  let p = document.querySelector(`#transcript p[data-turn="${m.turn}"]`);
  if (!p) {
    p = document.createElement('p');
    p.dataset.turn = m.turn;
    $('transcript').append(p);
  }
  p.textContent = `第 ${m.turn} 輪：${S.texts[m.turn]}`;
}

function onMetrics(m) {
  turnOf(m.turn).metrics = m;
  if (m.yielded) {
    const p = document.querySelector(`#transcript p[data-turn="${m.turn}"]`);
    if (p) p.classList.add('yielded');
  }
  renderTurns();
}

function onAudio(buf) {
  const view = new DataView(buf);
  const seq = view.getInt32(0, true);
  const rate = view.getUint32(4, true);
  if (currentTurn < 0 || currentTurn === yieldedTurn) {
    S.droppedAfterYield += 1; // 讓出之後到下一輪之前的音訊不播
    return;
  }
  const turn = turnOf(currentTurn);
  if (turn.lastSeq !== null && seq !== turn.lastSeq + 1) {
    S.seqProblems.push({ turn: currentTurn, prev: turn.lastSeq, seq });
  }
  turn.lastSeq = seq;
  const pcm = new Int16Array(buf, AUDIO_HEADER);
  const audio = ctx.createBuffer(1, pcm.length, rate);
  const data = audio.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) data[i] = pcm[i] / 32768;
  const t = now();
  let start = nextStart;
  if (start < t + STARVED_S) {
    // 排空了（一輪開頭、伺服器停住後恢復、或伺服器落後）：重新緩衝，不丟任何片段。
    if (turn.firstAudio !== null) S.rebuffers.push({ turn: currentTurn, seq, at: t });
    start = t + leadS;
  }
  const src = ctx.createBufferSource();
  src.buffer = audio;
  src.connect(master);
  src.start(start);
  const chunk = {
    seq,
    turn: currentTurn,
    rate,
    start,
    end: start + audio.duration,
    receivedAt: t,
    stoppedAt: null,
  };
  nextStart = chunk.end;
  S.chunks.push(chunk);
  const item = { src, chunk };
  live.add(item);
  src.onended = () => live.delete(item);
  if (turn.firstAudio === null) {
    turn.firstAudio = start;
    const i = turn.frame;
    if (i !== null && i < S.frameTimes.length) {
      turn.latencyMs = (start - (S.frameTimes[i] + FRAME_S)) * 1000;
    }
    renderTurns();
  }
}

// 清空播放佇列：已排程或正在播的片段全部立刻停止（在下一個渲染量子生效，遠小於一幀）。
function flush(reason, ev) {
  const t = now();
  let cut = 0;
  for (const { src, chunk } of live) {
    if (chunk.end > t) {
      cut += chunk.end - Math.max(chunk.start, t);
      chunk.stoppedAt = Math.max(chunk.start, t);
      src.stop();
    }
  }
  live.clear();
  nextStart = 0;
  S.flushes.push({
    reason,
    turn: ev ? ev.turn : currentTurn,
    frame: ev ? ev.frame : null,
    onset: ev ? ev.user_onset_frame : null,
    receivedAt: ev ? ev.at : t,
    at: now(),
    cutSeconds: cut,
  });
}

function onClose(e) {
  S.close = { code: e.code, reason: e.reason, at: now(), opened };
  const st = S.status;
  const detail = (st && st.detail) || e.reason;
  const wasRunning = S.started;
  if (e.code !== 1000) flush('closed');
  if (e.code === 1000) {
    if (userEnded) showMessage('ended', '會話已結束。');
  } else if (e.code === 4016) {
    showMessage('token', `權杖被拒絕（UNAUTHENTICATED）：${detail}`);
  } else if (e.code === 4004) {
    showMessage('idle', `閒置逾時，會話已結束（DEADLINE_EXCEEDED）：${detail}`);
  } else if (e.code === 4014) {
    showMessage('unavailable', `語音伺服器無法使用（UNAVAILABLE）：${detail}`);
  } else if (e.code === 4008) {
    showMessage('busy', `伺服器忙碌或訊息過大（RESOURCE_EXHAUSTED）：${detail}`);
  } else if (e.code >= 4000 && e.code < 4100) {
    showMessage('error', `會話錯誤（${st ? st.code : e.code - 4000}）：${detail}`);
  } else if (!opened) {
    showMessage('connect', '無法連線到網頁伺服器：請確認 python -m export.serving.web 正在執行。');
  } else if (e.code === 1001) {
    showMessage('lost', `伺服器關閉了連線：${detail}`);
  } else {
    showMessage('lost', `與伺服器的連線中斷（關閉碼 ${e.code}）${wasRunning ? '，會話已結束' : ''}。`);
  }
  setText('conn', '未連線');
  teardown();
}

function stopSession() {
  if (ws && ws.readyState === WebSocket.OPEN) {
    userEnded = true;
    ws.send(JSON.stringify({ type: 'end' }));
  }
}

function interrupt() {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'interrupt' }));
}

function toggleMute() {
  S.muted = !S.muted;
  $('mute').textContent = S.muted ? '恢復麥克風' : '暫停麥克風';
  if (S.muted && S.config) {
    showMessage(
      'muted',
      `麥克風已暫停：${S.config.idle_timeout_s} 秒沒有音訊時伺服器會結束會話。`,
    );
  } else {
    clearMessage();
  }
}

function logEvent(ev) {
  const li = document.createElement('li');
  li.className = `ev-${ev.kind}`;
  const onset = ev.user_onset_frame >= 0 ? `，使用者起點幀 ${ev.user_onset_frame}` : '';
  const turn = ev.turn >= 0 ? `　第 ${ev.turn} 輪` : '';
  li.textContent =
    `${ev.at.toFixed(2)} s　幀 ${ev.frame}　${ev.kind}${turn}` +
    `${onset}${ev.detail ? '　' + ev.detail : ''}`;
  const list = $('events');
  list.prepend(li);
  while (list.children.length > 80) list.lastChild.remove();
}

function renderTurns() {
  const body = $('turns').tBodies[0];
  body.replaceChildren();
  for (const t of Object.values(S.turns)) {
    const m = t.metrics;
    const cells = [
      t.turn,
      t.frame ?? '—',
      t.latencyMs === null ? '—' : `${t.latencyMs.toFixed(0)} ms`,
      m && m.first_packet_latency_ms >= 0 ? `${m.first_packet_latency_ms.toFixed(0)} ms` : '—',
      m ? `${m.response_delay_frames * 40} ms` : '—',
      m ? (m.yielded ? `讓出（${m.barge_in_reaction_frames * 40} ms）` : `說完 ${m.audio_seconds.toFixed(2)} s`) : '說話中',
    ];
    const tr = document.createElement('tr');
    for (const c of cells) {
      const td = document.createElement('td');
      td.textContent = String(c);
      tr.append(td);
    }
    body.append(tr);
  }
}

function speakerNow(t) {
  const last = S.audible[S.audible.length - 1];
  const assistant = !!last && last[1] === null;
  const lv = S.levels[S.levels.length - 1];
  const user = !!lv && t - lv[0] < 0.2 && lv[1] > VOICE_RMS && !S.muted;
  if (assistant && user) return '兩人同時';
  if (assistant) return '助理';
  if (user) return '使用者';
  return '靜默';
}

function drawTimeline() {
  const cv = $('timeline');
  const g = cv.getContext('2d');
  const w = cv.width;
  const h = cv.height;
  const t1 = now();
  const t0 = t1 - TIMELINE_S;
  const x = (t) => ((t - t0) / TIMELINE_S) * w;
  g.clearRect(0, 0, w, h);
  g.font = '12px sans-serif';
  g.fillStyle = '#666';
  g.fillText('使用者', 4, 30);
  g.fillText('助理', 4, 80);
  g.fillStyle = '#3c8d40';
  for (const [t, rms] of S.levels) {
    if (t < t0) continue;
    const bar = Math.min(30, rms * 300);
    g.fillRect(x(t), 40 - bar, Math.max(1, (FRAME_S / TIMELINE_S) * w), bar);
  }
  g.fillStyle = '#c7d8f5';
  for (const c of S.chunks) {
    const end = c.stoppedAt ?? c.end;
    if (end < t0) continue;
    g.fillRect(x(c.start), 62, Math.max(1, x(end) - x(c.start)), 26);
  }
  g.fillStyle = '#1a5fb4';
  for (const [a, b] of S.audible) {
    const end = b ?? t1;
    if (end < t0) continue;
    g.fillRect(x(a), 68, Math.max(1, x(end) - x(a)), 14);
  }
  // 事件標籤分列，避免同一時刻的事件疊在一起：[顏色, 標籤的 y]。
  const marks = {
    SPEAKING: ['#1a5fb4', 106],
    YIELDED: ['#b3261e', 120],
    BACKCHANNEL: ['#8a6d00', 120],
    LISTENING: ['#999', 134],
  };
  for (const ev of S.events) {
    if (ev.at < t0 || !(ev.kind in marks)) continue;
    const [color, y] = marks[ev.kind];
    g.strokeStyle = g.fillStyle = color;
    g.beginPath();
    g.moveTo(x(ev.at), 95);
    g.lineTo(x(ev.at), 8);
    g.stroke();
    g.fillText(ev.kind.toLowerCase(), x(ev.at) + 2, y);
  }
  g.fillStyle = '#b3261e';
  for (const f of S.flushes) {
    if (f.at >= t0 && f.reason === 'yielded') g.fillText('flush', x(f.at) + 2, 148);
  }
  setText('speaker', ctx ? speakerNow(t1) : '—');
  requestAnimationFrame(drawTimeline);
}

$('start').addEventListener('click', () =>
  start().catch((e) => {
    showMessage('error', `無法開始：${e}`);
    teardown();
  }),
);
$('stop').addEventListener('click', stopSession);
$('interrupt').addEventListener('click', interrupt);
$('mute').addEventListener('click', toggleMute);
loadConfig()
  .then(() => requestAnimationFrame(drawTimeline))
  .catch((e) => showMessage('connect', `無法讀取頁面設定（/config.json）：${e}`));
