// Drives the dashboard in a real headless Chromium. Run by the Rust test
// `dashboard_in_headless_chromium`, which starts the gateway, runs traffic,
// and stops the gateway when this script prints STOP_GATEWAY.
//
// usage: node dashboard.mjs <base-url> <admin-token> <expected-cards> <mock-base-url> <screenshot.png>
import { chromium } from "playwright-core";
import readline from "node:readline";

const [base, token, expectedCards, mockUrl, shot] = process.argv.slice(2);
const fail = (msg) => { console.error(`FAIL: ${msg}`); process.exit(1); };
const step = (msg) => console.log(`step: ${msg}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run",
         "--disable-component-update", "--disable-sync"],
});
const timer = setTimeout(() => fail("timed out after 60 s"), 60000);
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const origin = new URL(base).origin;
  const foreign = [];
  const consoleErrors = [];
  let dialogs = 0;
  page.on("request", (r) => { const u = r.url(); if (!u.startsWith(origin) && !u.startsWith("data:")) foreign.push(u); });
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("dialog", (d) => { dialogs += 1; d.dismiss(); });

  await page.goto(`${base}/dashboard`);
  await page.fill("#token", token);
  await page.click("#connect");
  await page.waitForSelector("[data-testid=backend-card]", { timeout: 10000 });
  await page.waitForFunction((n) => document.querySelectorAll("[data-testid=backend-card]").length === n, Number(expectedCards), { timeout: 10000 });
  step(`${expectedCards} cards`);
  if (await page.evaluate(() => sessionStorage.getItem("sidecar.adminToken")) !== token) fail("token not kept in sessionStorage");

  // Live values change while traffic runs.
  const total = () => page.$$eval("[data-field=requests]", (els) => els.reduce((s, e) => s + Number(e.textContent.replace(/[^0-9]/g, "")), 0));
  const before = await total();
  await page.waitForFunction((b) => {
    const n = [...document.querySelectorAll("[data-field=requests]")].reduce((s, e) => s + Number(e.textContent.replace(/[^0-9]/g, "")), 0);
    return n > b;
  }, before, { timeout: 10000 });
  step(`requests counter moved from ${before} to ${await total()}`);

  // At a glance: window strips tick for every request sent, recent requests
  // are listed, the charts have a time axis, names stay on one line.
  await page.waitForFunction(() => document.querySelectorAll("[data-testid=window-strip] line.tick").length > 0, null, { timeout: 10000 });
  step(`window strips: ${await page.$$eval("[data-testid=window-strip] line.tick", (l) => l.length)} ticks`);
  await page.waitForFunction(() => document.querySelectorAll("#recent tbody tr").length > 0, null, { timeout: 10000 });
  await page.selectOption("#recent-status", "error");
  await page.waitForFunction(() => [...document.querySelectorAll("#recent tbody tr")].every((tr) => tr.classList.contains("bad")), null, { timeout: 5000 });
  await page.selectOption("#recent-status", "all");
  step("recent requests listed and filtered");
  const axisLabels = await page.$$eval("#chart-rate text", (t) => t.map((x) => x.textContent));
  if (!axisLabels.includes("now")) fail(`no time axis: ${axisLabels}`);
  const wrapped = await page.$$eval(".card .name", (ns) => ns.filter((n) => n.getClientRects().length > 1 || n.scrollHeight > n.clientHeight + 2).map((n) => n.textContent));
  if (wrapped.length) fail(`names broken over lines: ${wrapped}`);
  // A key that cannot serve never looks healthy: its bar is empty.
  const deadFull = await page.$$eval("[data-testid=backend-card]", (cs) => cs.filter((c) => !["healthy", "cooling"].includes(c.querySelector("[data-field=state]").textContent))
    .filter((c) => parseFloat(c.querySelector(".bar > div").style.width) > 0).map((c) => c.dataset.name));
  if (deadFull.length) fail(`non-serving keys with capacity bars: ${deadFull}`);
  // The add form is folded away until asked for.
  if (await page.isVisible("#add-form [name=name]")) fail("the add form is open before it is asked for");
  await page.click("#add-panel summary");

  // Client-side validation stops a bad form before any request.
  await page.fill("#add-form [name=name]", "x");
  await page.fill("#add-form [name=base_url]", "not a url");
  await page.fill("#add-form [name=api_key]", "k");
  await page.click("#add-form button[type=submit]");
  const v1 = await page.textContent("#add-form [data-role=form-error]");
  if (!v1.includes("URL")) fail(`no validation message: ${v1}`);
  // Server-side validation message comes back too (bad model line passes the
  // client, a rejected key does not pass the server).
  await page.fill("#add-form [name=base_url]", mockUrl);
  await page.fill("#add-form [name=api_key]", "k-not-known-upstream");
  await page.fill("#add-form [name=models]", "m = native-m");
  await page.click("#add-form button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#add-form [data-role=form-error]").textContent.includes("rejected"), null, { timeout: 10000 });
  step("validation messages shown");

  // The add form creates a backend that then appears; its name is escaped.
  const evil = `<img src=x onerror="window.__xss=1">added`;
  await page.fill("#add-form [name=name]", evil);
  await page.fill("#add-form [name=api_key]", "k-browser-0003");
  await page.click("#add-form button[type=submit]");
  await page.waitForFunction((n) => [...document.querySelectorAll("[data-testid=backend-card]")].some((c) => c.dataset.name === n), evil, { timeout: 10000 });
  const shown = await page.$eval(`[data-testid=backend-card][data-name="${evil.replace(/"/g, '\\"')}"] [data-field=name]`, (e) => e.textContent);
  if (shown !== evil) fail(`name not shown literally: ${shown}`);
  if (await page.evaluate(() => window.__xss === 1) || (await page.$$("[data-testid=backend-card] img")).length) fail("markup from a name ran");
  step("added backend appears, name escaped");

  // Disable it from its card; the live state follows.
  await page.click(`[data-testid=backend-card][data-name="${evil.replace(/"/g, '\\"')}"] button:has-text("Disable")`);
  await page.waitForFunction((n) => {
    const c = [...document.querySelectorAll("[data-testid=backend-card]")].find((x) => x.dataset.name === n);
    return c && c.querySelector("[data-field=state]").textContent === "disabled";
  }, evil, { timeout: 10000 });
  step("disable from the card");

  await page.waitForTimeout(1200);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: shot, fullPage: true });
  step(`screenshot ${shot}`);
  await page.setViewportSize({ width: 800, height: 1000 });
  await page.waitForTimeout(400);
  await page.evaluate(() => window.scrollTo(0, 0));
  const narrow = shot.replace(/\.png$/, "-800.png");
  await page.screenshot({ path: narrow, fullPage: true });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
  if (overflow) fail("the page scrolls sideways at 800 px");
  step(`screenshot ${narrow}`);
  await page.setViewportSize({ width: 1400, height: 1000 });
  if (foreign.length) fail(`requests beyond the gateway: ${foreign.join(", ")}`);
  const cspErrors = consoleErrors.filter((e) => /Content Security Policy/i.test(e));
  if (cspErrors.length) fail(`CSP violations: ${cspErrors.join(" | ")}`);

  // The overlay appears once the gateway stops sending data.
  console.log("STOP_GATEWAY");
  const rl = readline.createInterface({ input: process.stdin });
  await new Promise((resolve) => rl.once("line", resolve));
  await page.waitForSelector("#overlay:not([hidden])", { timeout: 12000 });
  step("overlay shown after the gateway stopped");
  await page.screenshot({ path: shot.replace(/\.png$/, "-overlay.png") });
  console.log(`OK dialogs=${dialogs}`);
  clearTimeout(timer);
  await browser.close();
  process.exit(0);
} catch (e) {
  fail(e && e.stack ? e.stack : String(e));
}
