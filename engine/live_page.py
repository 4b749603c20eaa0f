"""The live page (engine/live.py, engine/live_server.py): one HTML document with its style
and script inline, so that it ships inside the package and works offline (no fonts,
scripts or styles from elsewhere). The server fills in {{NONCE}} (its Content-Security-
Policy allows only the inline script and style that carry it).

What the page does: it opens the event stream (/events), keeps the loss history it is
sent, draws the plot itself (inline SVG), fetches /image.png when a newer image exists
(only the newest: an update that arrives while one is loading is skipped), shows
/full.png on a click, and sends the stop request (POST /stop with the token in a header,
after a confirmation). Nothing else it does changes anything. For tests it counts the
images it showed and the events it got in ``data-images`` / ``data-events`` on <body>.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>nst: live render</title>
<link rel="icon" href="data:,">
<style nonce="{{NONCE}}">
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #15171c; color: #e4e6ea; }
header { display: flex; gap: 1em; align-items: center; padding: .6em 1.2em; background: #1f2229; flex-wrap: wrap; }
h1 { font-size: 17px; margin: 0; font-weight: 600; }
h2 { font-size: 13px; margin: 1.1em 0 .4em; color: #9aa3ad; font-weight: 600; text-transform: uppercase; letter-spacing: .05em; }
.grow { flex: 1; }
#status { padding: .1em .7em; border-radius: 1em; background: #2d6a3c; font-size: 13px; }
#status.ended { background: #4a4f58; } #status.stopping { background: #8a6a1c; } #status.lost { background: #7a2d2d; }
#warn { color: #f2c15e; font-size: 13px; }
main { display: grid; grid-template-columns: minmax(260px, 1fr) minmax(340px, 600px); gap: 1.4em; padding: 1.2em; align-items: start; }
#img { width: 100%; max-width: 768px; display: block; background: #000; cursor: zoom-in; min-height: 64px; }
.note { color: #8a929c; font-size: 12px; margin-top: .3em; }
table { border-collapse: collapse; }
td { padding: .12em .9em .12em 0; vertical-align: top; }
td:first-child { color: #9aa3ad; white-space: nowrap; }
.ladder { display: flex; gap: .45em; flex-wrap: wrap; }
.rung { border: 1px solid #3b4250; border-radius: 5px; padding: .25em .6em; font-size: 12px; min-width: 7em; }
.rung b { display: block; font-size: 13px; }
.rung.done { opacity: .6; } .rung.current { border-color: #5bb4ff; background: #17304a; }
svg text { fill: #8a929c; font-size: 11px; }
#legend span { margin-right: 1.1em; font-size: 12px; }
button { font: inherit; padding: .3em 1em; border-radius: 5px; border: 1px solid #b04a4a; background: #5a1f1f; color: #fff; cursor: pointer; }
button:disabled { opacity: .4; cursor: default; }
#overlay { position: fixed; inset: 0; background: rgba(0, 0, 0, .9); overflow: auto; display: none; cursor: zoom-out; z-index: 2; }
#overlay.on { display: block; }
#ovnote { color: #ccc; padding: .6em 1em; }
#full { display: block; margin: 0 auto; }
</style>
</head>
<body data-images="0" data-events="0">
<header>
  <h1>nst: live render</h1><span id="status">connecting</span><span id="warn"></span>
  <span class="grow"></span><span id="stopnote" class="note"></span>
  <button id="stop" disabled title="ends the render as Ctrl-C does: the best image so far (and --state) is written">Stop the render</button>
</header>
<main>
  <section>
    <img id="img" alt="the image as it forms">
    <div class="note" id="imgnote">waiting for the first image; click the image for full size</div>
  </section>
  <section>
    <table><tbody id="numbers"></tbody></table>
    <h2>Scales</h2>
    <div id="ladder" class="ladder"></div>
    <h2>Loss over steps (log scale; each term times its weight)</h2>
    <svg id="plot" width="560" height="250" viewBox="0 0 560 250" role="img" aria-label="loss parts over steps"></svg>
    <div id="legend"></div>
  </section>
</main>
<div id="overlay"><div id="ovnote"></div><img id="full" alt="the full-size image"></div>
<script nonce="{{NONCE}}">
"use strict";
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const token = new URLSearchParams(location.search).get("t") || "";
const q = token ? "?t=" + encodeURIComponent(token) : "";
const SERIES = [["total", 1, "#e4e6ea"], ["content", 2, "#5bb4ff"], ["style", 3, "#ff9860"], ["tv", 4, "#93de74"]];
let gen = -1, points = [], state = {}, sentAt = 0, gotAt = 0, ended = false, stopping = false;
let latestImage = 0, shownImage = -1, loading = false, lastUrl = null, images = 0, events = 0;

function fmt(v, d = 4) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  return (a >= 1e5 || (a < 1e-3 && a > 0)) ? v.toExponential(d - 1) : String(Number(v.toPrecision(d)));
}
function secs(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.max(0, s);
  if (s < 120) return s.toFixed(1) + " s";
  const m = Math.floor(s / 60);
  return m < 120 ? m + " min " + Math.round(s - 60 * m) + " s" : Math.floor(m / 60) + " h " + (m % 60) + " min";
}
const wxh = (hw) => hw ? hw[1] + "×" + hw[0] : "–";
// The terms as they enter the total (each part times its --*-weight): they add up to it.
const weighted = (p) => { const w = state.term_weights || [1, 1, 1]; return [p[0], w[0] * p[1], w[1] * p[2], w[2] * p[3]]; };
const tick = (v) => Number.isInteger(v) && Math.abs(v) >= 3 ? "1e" + v : String(Number(Math.pow(10, v).toPrecision(2)));
const age = () => Math.max(0, (sentAt - (state.time || sentAt)) + (Date.now() / 1000 - gotAt));

function setStatus(text, cls) { const el = $("status"); el.textContent = text; el.className = cls || ""; }

function rows() {
  const s = state, out = [];
  if (s.step === undefined) return [["state", "waiting for the first update"]];
  out.push(["steps", s.step + " done of " + s.steps_planned + " planned"]);
  const n = (s.ladder || []).length;
  out.push(["scale", (s.scale + 1) + " of " + n + ": " + wxh(s.hw) + ", step " + s.scale_step + " of " + s.scale_steps]);
  const left = s.steps_per_s > 0 ? (s.scale_steps - s.scale_step) / s.steps_per_s : null;
  out.push(["speed", fmt(s.steps_per_s, 3) + " steps/s" + (left !== null ? " (this scale: about " + secs(left) + " left)" : "")]);
  const l = s.losses ? weighted(s.losses) : null;
  out.push(["loss", l ? fmt(l[0]) + " = content " + fmt(l[1], 3) + " + style " + fmt(l[2], 3) + " + tv " + fmt(l[3], 3)
    : "none yet at this scale"]);
  const live = s.status === "ended" ? 0 : age();
  out.push(["time", secs(s.elapsed_s + live) + " since the start"]);
  if (s.budget) {
    const b = s.budget, spent = s.elapsed_s + live;
    out.push(["budget", secs(spent) + " spent of " + secs(b.budget_s) + ", " + secs(b.budget_s - spent) + " left"]);
    const planned = (s.ladder || []).slice(0, s.scale + 1).reduce((a, r) => a + (r.planned_s || 0), 0);
    out.push(["plan", "calibration " + secs(b.calibration_s) + "; this scale planned to end by " +
      secs((b.calibration_s || 0) + planned) + "; " + secs(b.margin_s) + " kept for noise"]);
  }
  if (s.ranks) {
    const r = s.ranks;
    out.push(["ranks", r.world + (r.world > 1 ? " ranks" : " rank") + ", " + r.tiles + " tiles of " + r.tile +
      " px" + (r.world > 1 ? " (per rank: " + r.per_rank.join(", ") + ")" : "")]);
  }
  out.push(["updated", secs(age()) + " ago" + (s.device ? " · " + s.device : "")]);
  return out;
}

function drawNumbers() {
  const body = $("numbers");
  body.replaceChildren(...rows().map(([k, v]) => {
    const tr = document.createElement("tr");
    for (const t of [k, v]) { const td = document.createElement("td"); td.textContent = t; tr.append(td); }
    return tr;
  }));
}

function drawLadder() {
  const s = state, box = $("ladder");
  box.replaceChildren(...(s.ladder || []).map((r, k) => {
    const div = document.createElement("div"), b = document.createElement("b"), t = document.createElement("span");
    div.className = "rung" + (k < s.scale ? " done" : k === s.scale ? " current" : "");
    b.textContent = wxh(r.hw);
    if (k < s.scale) t.textContent = r.steps_run + " steps in " + secs(r.actual_s) + (r.why ? " (" + r.why + ")" : "");
    else if (k === s.scale) t.textContent = "step " + s.scale_step + " of " + r.steps;
    else t.textContent = r.steps + " steps planned";
    if (r.planned_s) t.textContent += " · plan " + secs(r.planned_s);
    div.append(b, t);
    return div;
  }));
}

function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawPlot() {
  const svg = $("plot"), W = 560, H = 250, L = 58, R = 12, T = 10, B = 30;
  const kids = [];
  const vals = [], pts = points.map((p) => { const w = weighted(p.slice(1, 5)); return [p[0], ...w, p[5]]; });
  for (const p of pts) for (const [, i] of SERIES) if (p[i] > 0 && isFinite(p[i])) vals.push(Math.log10(p[i]));
  if (!points.length || !vals.length) { svg.replaceChildren(el("text", {x: L, y: H / 2}, "no losses yet")); return; }
  let x0 = points[0][0], x1 = points[points.length - 1][0];
  if (x1 <= x0) x1 = x0 + 1;
  let y1 = Math.max(...vals), y0 = Math.max(Math.min(...vals), y1 - 6);  // at most 6 decades: a term near 0 sits on the floor
  if (y1 - y0 < 0.5) { const m = (y0 + y1) / 2; y0 = m - 0.25; y1 = m + 0.25; }
  const X = (v) => L + (v - x0) / (x1 - x0) * (W - L - R);
  const Y = (v) => T + (y1 - Math.max(v, y0)) / (y1 - y0) * (H - T - B);
  const stepY = (y1 - y0) > 3 ? 1 : 0.5;
  for (let v = Math.ceil(y0 / stepY) * stepY; v <= y1 + 1e-9; v += stepY) {
    kids.push(el("line", {x1: L, x2: W - R, y1: Y(v), y2: Y(v), stroke: "#2c313a"}));
    kids.push(el("text", {x: L - 6, y: Y(v) + 4, "text-anchor": "end"}, tick(v)));
  }
  for (let k = 0; k <= 4; k++) {
    const v = x0 + (x1 - x0) * k / 4;
    kids.push(el("text", {x: X(v), y: H - 10, "text-anchor": "middle"}, String(Math.round(v))));
  }
  for (let k = 1; k < pts.length; k++) {
    if (pts[k][5] !== pts[k - 1][5]) {
      const x = X(pts[k][0]);
      kids.push(el("line", {x1: x, x2: x, y1: T, y2: H - B, stroke: "#5bb4ff", "stroke-dasharray": "3 3"}));
      kids.push(el("text", {x: x + 3, y: T + 10}, "scale " + (pts[k][5] + 1)));
    }
  }
  for (const [name, i, color] of SERIES) {
    let d = "";
    for (const p of pts) if (p[i] > 0 && isFinite(p[i])) d += (d ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(Math.log10(p[i])).toFixed(1);
    kids.push(el("path", {id: "line-" + name, d: d, fill: "none", stroke: color, "stroke-width": name === "total" ? 2 : 1.3}));
  }
  kids.push(el("line", {x1: L, x2: L, y1: T, y2: H - B, stroke: "#555"}));
  kids.push(el("text", {x: L - 6, y: H - 10, "text-anchor": "end"}, "step"));
  svg.replaceChildren(...kids);
}

function drawLegend() {
  const last = points.length ? weighted(points[points.length - 1].slice(1, 5)) : null;
  $("legend").replaceChildren(...SERIES.map(([name, i, color]) => {
    const s = document.createElement("span");
    s.style.color = color;
    s.textContent = "— " + name + (last ? " " + fmt(last[i - 1], 3) : "");
    return s;
  }));
}

async function fetchImage() {
  loading = true;
  let ok = false;
  try {
    const r = await fetch("/image.png" + q, {cache: "no-store"});
    if (r.ok) {
      const seq = Number(r.headers.get("X-NST-Image-Seq")) || latestImage;
      const url = URL.createObjectURL(await r.blob());
      await new Promise((ok, bad) => { const im = $("img"); im.onload = ok; im.onerror = bad; im.src = url; });
      if (lastUrl) URL.revokeObjectURL(lastUrl);
      lastUrl = url; shownImage = seq; images += 1;
      document.body.dataset.images = images;
      $("imgnote").textContent = "image of step " + state.step + " (" + wxh(state.image_hw) + " of " + wxh(state.hw) +
        "); click for full size";
      ok = true;
    }
  } catch (e) { /* the next update tries again */ }
  loading = false;
  if (ok && latestImage > shownImage && !ended) fetchImage();  // a newer one came meanwhile
}

function drawStatus() {
  const s = state;
  if (s.status === "ended" || ended) setStatus("ended" + (s.note ? ": " + s.note : ""), "ended");
  else if (stopping) setStatus("stopping", "stopping");
  else setStatus(s.kind === "watch" ? "watching " + (s.source || "") : "running", "");
  $("warn").textContent = s.random_weights ? "seeded random weights (" + s.weights + "): not a trained network" : "";
  const can = !!(s.can_stop && token && !stopping && !ended && s.status !== "ended");
  $("stop").disabled = !can;
  $("stop").hidden = s.kind === "watch";
  if (s.can_stop && !token) $("stopnote").textContent = "open the printed URL (with its token) to stop";
}

function drawAll() { drawStatus(); drawNumbers(); drawLadder(); drawPlot(); drawLegend(); }

const es = new EventSource("/events" + q);
es.addEventListener("state", (e) => {
  const m = JSON.parse(e.data);
  if (m.gen !== gen) { gen = m.gen; points = []; }
  points.length = Math.min(points.length, m.from);
  for (const p of m.points) points.push(p);
  state = m.state; sentAt = m.sent; gotAt = Date.now() / 1000; latestImage = m.image; events += 1;
  document.body.dataset.events = events;
  drawAll();
  if (latestImage > 0 && latestImage > shownImage && !loading) fetchImage();
});
es.addEventListener("end", (e) => { ended = true; es.close(); state.note = JSON.parse(e.data); drawStatus(); });
es.onerror = () => { if (!ended) setStatus("connection lost (the render may have ended)", "lost"); };
setInterval(() => { if (!ended) drawNumbers(); }, 1000);

$("stop").onclick = async () => {
  if (!confirm("Stop the render? It ends as after Ctrl-C: the best image so far is written.")) return;
  stopping = true; drawStatus();
  try {
    const r = await fetch("/stop", {method: "POST", headers: {"X-NST-Token": token}});
    $("stopnote").textContent = (await r.text()).trim();
  } catch (e) { $("stopnote").textContent = "the stop request failed: " + e; }
};

$("img").onclick = async () => {
  $("overlay").className = "on";
  $("ovnote").textContent = state.kind === "watch" ? "the progress file keeps a small image only" :
    "copying the full-size image at the next progress interval…";
  try {
    const r = await fetch("/full.png" + q, {cache: "no-store"});
    if (!r.ok) { $("ovnote").textContent = (await r.text()).trim(); return; }
    const url = URL.createObjectURL(await r.blob());
    $("full").onload = () => URL.revokeObjectURL(url);
    $("full").src = url;
    $("ovnote").textContent = "full size (click to close)";
  } catch (e) { $("ovnote").textContent = "no full-size image: " + e; }
};
$("overlay").onclick = () => { $("overlay").className = ""; };
</script>
</body>
</html>
"""
