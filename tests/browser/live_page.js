// Drives Debian's headless Chromium (/usr/bin/chromium, or $CHROMIUM) with playwright-core
// against nst's live page; tests/test_live.py and docs/make_live_screenshot.py run it.
//
//   node live_page.js check URL OUTDIR   waits for two image updates after the first, checks
//                                        that the image and the plot changed, opens the full-size
//                                        image, presses stop; prints one JSON line of findings
//   node live_page.js shot URL FILE.png N [SCALE]   a screenshot of the page once N images were
//                                        shown (and the render reached scale index SCALE)
//
// Chromium is never downloaded (playwright's own browser download fails offline): it is
// launched from the Debian package with a fresh profile directory, no sandbox (CI runs as
// root) and nothing that reaches the network on its own.
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");
const { chromium } = require("playwright-core");

const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const WAIT_MS = 240000;

async function open(url) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "nst-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true, args: ARGS,
    viewport: { width: 1280, height: 760 }, deviceScaleFactor: 1,
  });
  const page = context.pages()[0] || await context.newPage();
  const seen = { requests: [], errors: [] };
  const origin = new URL(url).origin;
  page.on("request", (r) => seen.requests.push(r.url()));
  page.on("pageerror", (e) => seen.errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") seen.errors.push(m.text()); });
  await page.goto(url);
  const close = async () => { await context.close(); fs.rmSync(profile, { recursive: true, force: true }); };
  return { page, seen, origin, close };
}

const images = (page) => page.evaluate(() => Number(document.body.dataset.images));
const atLeast = (page, n) => page.waitForFunction((k) => Number(document.body.dataset.images) >= k, n,
  { timeout: WAIT_MS });

async function snapshot(page) {
  return {
    images: await images(page),
    png: (await page.locator("#img").screenshot()).toString("base64"),
    plot: await page.getAttribute("#line-total", "d"),
    step: await page.evaluate(() => state.step),
  };
}

async function check(url, out) {
  const { page, seen, origin, close } = await open(url);
  const result = {};
  try {
    await atLeast(page, 1);
    const first = await snapshot(page);
    await atLeast(page, first.images + 2);
    const later = await snapshot(page);
    result.images = [first.images, later.images];
    result.steps = [first.step, later.step];
    result.image_changed = first.png !== later.png;
    result.plot_changed = first.plot !== later.plot && !!later.plot;
    result.warning = await page.textContent("#warn");
    result.ladder = await page.textContent("#ladder");
    await page.screenshot({ path: path.join(out, "page.png") });
    // Full size on a click: the image as large as the render's.
    await page.click("#img");
    await page.waitForFunction(() => document.getElementById("full").naturalWidth > 0, null, { timeout: WAIT_MS });
    result.full = await page.evaluate(() => [document.getElementById("full").naturalWidth,
      document.getElementById("full").naturalHeight, state.hw]);
    await page.click("#overlay");
    // Stop, as a user would: the confirmation accepted.
    page.on("dialog", (d) => d.accept());
    result.stop_enabled = await page.isEnabled("#stop");
    await page.click("#stop");
    await page.waitForFunction(() => /stopping|already/.test(document.getElementById("stopnote").textContent),
      null, { timeout: WAIT_MS });
    result.stop_answer = await page.textContent("#stopnote");
    await page.waitForFunction(() => /ended|lost/.test(document.getElementById("status").className), null,
      { timeout: WAIT_MS });
    result.final_status = await page.textContent("#status");
  } catch (e) {
    result.failure = String(e);
  }
  result.offsite = seen.requests.filter((u) => !u.startsWith(origin) && !u.startsWith("blob:") &&
    !u.startsWith("data:"));
  result.errors = seen.errors.filter((e) => !/ERR_CONNECTION_REFUSED|ERR_EMPTY_RESPONSE|net::/.test(e));
  await close();
  console.log(JSON.stringify(result));
}

async function shot(url, file, n, scale) {
  const { page, close } = await open(url);
  try {
    // N images shown after the render reached that scale and reported its first losses there.
    await page.waitForFunction((sc) => state.scale >= sc && !!state.losses, scale, { timeout: 1800000 });
    const k = await images(page);
    await page.waitForFunction((m) => Number(document.body.dataset.images) >= m, k + n, { timeout: 1800000 });
    await page.waitForTimeout(300);  // the plot and numbers of that update drawn
    await page.screenshot({ path: file });
  } finally {
    await close();
  }
}

const [mode, url, target, n, scale] = process.argv.slice(2);
(mode === "shot" ? shot(url, target, Number(n || 3), Number(scale || 0)) : check(url, target)).catch((e) => {
  console.error(String(e));
  process.exit(1);
});
