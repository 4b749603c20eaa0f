#!/usr/bin/env node
// Gatys style transfer on an `nst export --formats step` directory with nothing but ONNX
// Runtime (onnxruntime-node): targets.onnx for the targets, step.onnx for each Adam step,
// objective.onnx for the final image's loss. The feeds are nst.engine.onnx_runtime's.
//
//   node nst_host.mjs EXPORT_DIR CONTENT.png STYLE.png OUT.png [--steps 300] [--lr 0.02]
//     [--content-weight 1] [--style-weight 1e6] [--tv-weight 1] [--print-every 25]
//     [--threads N (0: ONNX Runtime's default)] [--losses FILE] [--size WxH]
//
// The render is the content image's size (Node has no resize; --size only checks it); the
// style image may be any size of at least the manifest's min_side. Errors: one line, exit 1.
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";
import ort from "onnxruntime-node";
import pngjs from "pngjs";

class HostError extends Error {}
const fail = (msg) => { throw new HostError(msg); };
const GRAPHS = ["targets", "step", "objective"];

function options(argv) {
  const num = { type: "string" };
  const spec = { steps: { ...num, default: "300" }, lr: { ...num, default: "0.02" }, "content-weight": { ...num, default: "1" },
    "style-weight": { ...num, default: "1e6" }, "tv-weight": { ...num, default: "1" }, "print-every": { ...num, default: "25" },
    threads: { ...num, default: "0" }, losses: num, size: num };
  let a;
  try { a = parseArgs({ args: argv, options: spec, allowPositionals: true }); } catch (e) { fail(e.message); }
  if (a.positionals.length !== 4) fail("usage: node nst_host.mjs EXPORT_DIR CONTENT.png STYLE.png OUT.png [options]");
  const o = { dir: a.positionals[0], content: a.positionals[1], style: a.positionals[2], out: a.positionals[3],
    losses: a.values.losses, size: a.values.size };
  for (const [k, int, min] of [["steps", 1, 1], ["lr", 0, 0], ["content-weight", 0, 0], ["style-weight", 0, 0],
    ["tv-weight", 0, 0], ["print-every", 1, 1], ["threads", 1, 0]]) {
    const v = Number(a.values[k]);
    if (!Number.isFinite(v) || v < min || (int && !Number.isInteger(v)))
      fail(`--${k} ${a.values[k]}: expected a ${int ? "whole number" : "number"} >= ${min}`);
    o[k.replace(/-(\w)/g, (_, c) => c.toUpperCase())] = v;
  }
  return o;
}

function readManifest(dir) {
  const file = path.join(dir, "manifest.json");
  if (!fs.existsSync(file)) fail(`${file} not found: not an nst export directory`);
  let m;
  try { m = JSON.parse(fs.readFileSync(file, "utf8")); } catch (e) { fail(`${file}: not valid JSON (${e.message})`); }
  if (m?.format !== "nst-extractor" || m?.format_version !== 1)
    fail(`${file}: format ${m?.format} version ${m?.format_version}; this host reads nst-extractor version 1`);
  const step = m.artefacts?.step;
  if (!step?.written) fail(`${dir} has no step graphs${step?.reason ? ` (${step.reason})` : ""}: export with --formats step`);
  for (const g of GRAPHS)
    if (!step.graphs?.[g]?.file || !Array.isArray(step.graphs[g].inputs)) fail(`${file}: no ${g} graph in its step entry`);
  if (!Array.isArray(step.content_layers) || !Array.isArray(step.style_layers) || !step.weights_file?.file ||
    !Number.isInteger(step.graphs.step.min_side)) fail(`${file}: the step entry has no layers, min_side or weights file; re-export`);
  for (const f of [...GRAPHS.map((g) => step.graphs[g]), step.weights_file]) {
    const p = path.join(dir, f.file);
    if (!fs.existsSync(p)) fail(`${dir}: step file ${f.file} is missing`);
    if (f.sha256 && createHash("sha256").update(fs.readFileSync(p)).digest("hex") !== f.sha256)
      fail(`${p}: SHA-256 does not match the manifest (changed after export); re-export`);
  }
  return step;
}

function readPng(file, what, minSide) {
  if (!fs.existsSync(file)) fail(`${what} ${file}: file not found`);
  let png;
  try { png = pngjs.PNG.sync.read(fs.readFileSync(file)); } catch (e) { fail(`${what} ${file}: not a PNG pngjs can read (${e.message})`); }
  const { width: w, height: h, data } = png;
  if (Math.min(w, h) < minSide) fail(`${what} ${file}: ${w}x${h} px is too small; the step graphs need at least ${minSide} px per side`);
  const x = new Float32Array(3 * h * w); // (1, 3, H, W), RGB in [0, 1]; alpha composited on white
  for (let i = 0; i < h * w; i++) {
    const a = data[4 * i + 3];
    for (let c = 0; c < 3; c++) x[c * h * w + i] = (a === 255 ? data[4 * i + c] : Math.round((data[4 * i + c] * a + 255 * (255 - a)) / 255)) / 255;
  }
  return new ort.Tensor("float32", x, [1, 3, h, w]);
}

function writePng(x, file) {
  const [, , h, w] = x.dims, d = x.data, png = new pngjs.PNG({ width: w, height: h });
  for (let i = 0; i < h * w; i++) {
    for (let c = 0; c < 3; c++) {
      // torch's (x.clamp(0, 1) * 255).round(): the product in float32, ties to even
      const v = Math.fround(Math.min(1, Math.max(0, d[c * h * w + i])) * 255), r = Math.round(v);
      png.data[4 * i + c] = r - v === 0.5 && r % 2 ? r - 1 : r;
    }
    png.data[4 * i + 3] = 255;
  }
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, pngjs.PNG.sync.write(png, { colorType: 2 }));
  fs.renameSync(tmp, file);
}

async function load(dir, step, threads) {
  const opts = { executionProviders: ["cpu"], intraOpNumThreads: threads, graphOptimizationLevel: "all", logSeverityLevel: 3 };
  const sessions = {};
  for (const g of GRAPHS) {
    const file = path.join(dir, step.graphs[g].file);
    try { sessions[g] = await ort.InferenceSession.create(file, opts); } catch (e) { fail(`cannot load ${file}: ${String(e.message).split("\n")[0]}`); }
    if (sessions[g].inputNames.join() !== step.graphs[g].inputs.join()) fail(`${file}: its inputs are not those the manifest lists; re-export`);
  }
  return sessions;
}

async function main(o) {
  for (const f of [o.out, o.losses].filter(Boolean))
    if (!fs.existsSync(path.dirname(path.resolve(f)))) fail(`${f}: its directory does not exist`);
  const step = readManifest(o.dir), minSide = step.graphs.step.min_side;
  const content = readPng(o.content, "content", minSide), style = readPng(o.style, "style", minSide);
  const [h, w] = content.dims.slice(2);
  if (o.size && o.size !== `${w}x${h}`) fail(`content ${o.content} is ${w}x${h} px, not the ${o.size} asked for (--size): this host does not resize; resize it first`);
  const s = await load(o.dir, step, o.threads);
  const t0 = performance.now();
  const fromContent = await s.targets.run({ image: content }), fromStyle = await s.targets.run({ image: style });
  const f32 = (a, dims) => new ort.Tensor("float32", Float32Array.from(a), dims);
  const fixed = {  // the targets (one style image: blend weight 1) and the weights, as OnnxObjective feeds them
    ...Object.fromEntries(step.content_layers.map(([n]) => [`content_${n}`, fromContent[`content_${n}`]])),
    ...Object.fromEntries(step.style_layers.map(([n]) => [`gram_${n}`, fromStyle[`gram_${n}`]])),
    content_layer_weights: f32(step.content_layers.map(([, wt]) => wt), [step.content_layers.length]),
    style_layer_weights: f32(step.style_layers.map(([, wt]) => wt), [step.style_layers.length]),
    loss_weights: f32([o.contentWeight, o.styleWeight, o.tvWeight], [3]),
  };
  const zeros = () => new ort.Tensor("float32", new Float32Array(3 * h * w), [1, 3, h, w]);
  let state = { image: f32(content.data, content.dims), exp_avg: zeros(), exp_avg_sq: zeros(), step: f32([0], []) };
  const lr = f32([o.lr], []), lines = [], fmt = (l) => Array.from(l, (v) => v.toPrecision(9)).join(" ");
  const unfed = step.graphs.step.inputs.find((n) => ({ ...state, lr, ...fixed })[n] === undefined);
  if (unfed) fail(`step.onnx takes ${unfed}, which this host cannot feed (an export from another nst version?)`);
  const t1 = performance.now();
  for (let i = 0; i < o.steps; i++) {
    const r = await s.step.run({ ...state, lr, ...fixed });
    const l = r.losses.data;  // [total, content, style, tv] of the image this step started from
    lines.push(fmt(l));
    if (!Number.isFinite(l[0])) fail(`step ${i + 1}: the loss is ${l[0]}; lower --lr or the loss weights`);
    if (i % o.printEvery === 0 || i === o.steps - 1)
      console.log(`step ${i + 1}/${o.steps} loss ${l[0].toPrecision(6)} (content ${l[1].toPrecision(4)}, style ${l[2].toPrecision(4)}, tv ${l[3].toPrecision(4)})`);
    state = { image: r.next_image, exp_avg: r.next_exp_avg, exp_avg_sq: r.next_exp_avg_sq, step: r.next_step };
  }
  const loopS = (performance.now() - t1) / 1000;
  const { losses } = await s.objective.run({ image: state.image, ...fixed }, ["losses"]);
  if (o.losses) fs.writeFileSync(o.losses, lines.join("\n") + "\n");
  writePng(state.image, o.out);
  console.log(`final loss ${losses.data[0].toPrecision(9)}; ${o.steps} steps of ${w}x${h} in ${loopS.toFixed(2)} s ` +
    `(${(1000 * loopS / o.steps).toFixed(1)} ms/step, targets ${((t1 - t0) / 1000).toFixed(2)} s); wrote ${o.out}`);
}

try {
  await main(options(process.argv.slice(2)));
} catch (e) {
  process.stderr.write(`nst_host: error: ${e instanceof HostError ? e.message : String(e?.message ?? e).split("\n")[0]}\n`);
  process.exit(1);
}
