// Loss chart on a plain <canvas>: raw loss (thin), smoothed loss (thick, debiased EMA as in
// TensorBoard), optional log scale, learning rate on a second (right) axis.

const COLORS = { raw: "rgba(120, 170, 255, 0.45)", smooth: "#4f9dff", lr: "#f0a030", grid: "rgba(255,255,255,0.12)",
  text: "rgba(230,230,230,0.85)" };
const PAD = { left: 44, right: 44, top: 8, bottom: 18 };

export function formatNumber(value) {
  if (value == null || !Number.isFinite(value)) return "–";
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e4)) return value.toExponential(2);
  return value.toPrecision(3);
}

export function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), rest = s % 60;
  return h ? `${h}:${String(m).padStart(2, "0")}:${String(rest).padStart(2, "0")}` : `${m}:${String(rest).padStart(2, "0")}`;
}

/** Debiased exponential moving average (the smoothed curve). */
export function smooth(values, weight = 0.9) {
  let average = 0;
  return values.map((value, i) => {
    average = weight * average + (1 - weight) * value;
    return average / (1 - weight ** (i + 1));
  });
}

function range(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) {
    if (!Number.isFinite(v)) continue;
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  if (!Number.isFinite(lo)) return [0, 1];
  if (lo === hi) return [lo - (Math.abs(lo) || 1) * 0.1, hi + (Math.abs(hi) || 1) * 0.1];
  return [lo, hi];
}

function polyline(ctx, xs, ys, color, width) {
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.beginPath();
  let started = false;
  xs.forEach((x, i) => {
    if (!Number.isFinite(ys[i])) return;
    if (started) ctx.lineTo(x, ys[i]);
    else ctx.moveTo(x, ys[i]);
    started = true;
  });
  ctx.stroke();
}

/** Draw `points` ([step, loss, lr] rows) into `canvas` at its CSS size. */
export function drawChart(canvas, points, { logScale = false, total = null } = {}) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (!width || !height) return;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "10px sans-serif";
  ctx.fillStyle = COLORS.text;
  if (!points.length) {
    ctx.fillText("loss chart: waiting for the first step", PAD.left, height / 2);
    return;
  }
  const steps = points.map((p) => p[0]);
  const loss = points.map((p) => p[1]);
  const lr = points.map((p) => p[2]);
  const toY = logScale ? (v) => (v > 0 ? Math.log10(v) : NaN) : (v) => v;
  const smoothed = smooth(loss);
  const [lossLo, lossHi] = range([...loss, ...smoothed].map(toY));
  const [lrLo, lrHi] = range(lr);
  const firstStep = Math.min(...steps) - 1, lastStep = Math.max(total ?? 0, ...steps);
  const plotW = width - PAD.left - PAD.right, plotH = height - PAD.top - PAD.bottom;
  const x = (step) => PAD.left + ((step - firstStep) / Math.max(1, lastStep - firstStep)) * plotW;
  const yLoss = (v) => PAD.top + (1 - (toY(v) - lossLo) / (lossHi - lossLo)) * plotH;
  const yLr = (v) => PAD.top + (1 - (v - lrLo) / (lrHi - lrLo)) * plotH;

  // Grid and axis labels: loss on the left, LR on the right, steps below.
  ctx.strokeStyle = COLORS.grid;
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = PAD.top + (i / 4) * plotH;
    ctx.beginPath();
    ctx.moveTo(PAD.left, y);
    ctx.lineTo(PAD.left + plotW, y);
    ctx.stroke();
    const lossValue = lossHi - (i / 4) * (lossHi - lossLo);
    ctx.fillStyle = COLORS.smooth;
    ctx.textAlign = "right";
    ctx.fillText(logScale ? (10 ** lossValue).toExponential(1) : lossValue.toPrecision(3), PAD.left - 3, y + 3);
    ctx.fillStyle = COLORS.lr;
    ctx.textAlign = "left";
    ctx.fillText((lrHi - (i / 4) * (lrHi - lrLo)).toExponential(1), PAD.left + plotW + 3, y + 3);
  }
  ctx.fillStyle = COLORS.text;
  ctx.textAlign = "left";
  ctx.fillText(String(firstStep + 1), PAD.left, height - 4);
  ctx.textAlign = "right";
  ctx.fillText(`step ${lastStep}`, PAD.left + plotW, height - 4);

  const xs = steps.map(x);
  polyline(ctx, xs, lr.map(yLr), COLORS.lr, 1);
  polyline(ctx, xs, loss.map(yLoss), COLORS.raw, 1);
  polyline(ctx, xs, smoothed.map(yLoss), COLORS.smooth, 2);
  ctx.textAlign = "left";
  ctx.fillStyle = COLORS.smooth;
  ctx.fillText(logScale ? "loss (log)" : "loss", PAD.left + 4, PAD.top + 10);
  ctx.fillStyle = COLORS.lr;
  ctx.fillText("lr", PAD.left + 4, PAD.top + 22);
}
