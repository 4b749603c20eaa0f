// Drives Debian's headless Chromium (/usr/bin/chromium, or $CHROMIUM) with playwright-core
// against examples/web/index.html (the exported step on onnxruntime-web); tests/test_node_host.py
// runs it.
//
//   node step_page.js URL   opens URL (the page with ?export=...&content=...&style=...), waits
//                           until the run is done or failed, prints one JSON line: the page's
//                           window.nst (losses, final_loss, the image as a data URL...), the
//                           requests that left the page's origin, and the page's errors
//   node step_page.js URL EXPORT_DIR CONTENT STYLE STEPS   the same, through the page's form: picks
//                           the export directory and the two PNGs, sets the steps, presses Run
//
// Launched as live_page.js does: the Debian browser, a fresh profile, nothing that reaches the
// network on its own.
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");
const { chromium } = require("playwright-core");

const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const WAIT_MS = Number(process.env.NST_PAGE_WAIT_MS || 540000);

async function check(url, pick) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "nst-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true, args: ARGS,
  });
  const result = { requests: [], errors: [] };
  try {
    const page = context.pages()[0] || await context.newPage();
    page.on("request", (r) => result.requests.push(r.url()));
    page.on("pageerror", (e) => result.errors.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error") result.errors.push(m.text()); });
    await page.goto(url);
    if (pick.length) {
      const [dir, content, style, steps] = pick;
      await page.setInputFiles("#dir", dir);
      await page.setInputFiles("#content", content);
      await page.setInputFiles("#style", style);
      await page.fill("#steps", steps);
      await page.click("#run");
    }
    await page.waitForFunction(() => /done|error/.test(document.body.dataset.state), null, { timeout: WAIT_MS });
    result.state = await page.evaluate(() => document.body.dataset.state);
    result.nst = await page.evaluate(() => window.nst);
    result.status = await page.textContent("#status");
  } catch (e) {
    result.failure = String(e);
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  const origin = new URL(url).origin;
  result.offsite = result.requests.filter((u) => !u.startsWith(origin) && !u.startsWith("blob:") &&
    !u.startsWith("data:"));
  delete result.requests;
  console.log(JSON.stringify(result));
}

check(process.argv[2], process.argv.slice(3)).catch((e) => {
  console.error(String(e));
  process.exit(1);
});
