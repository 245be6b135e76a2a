// The dashboard on loopback with no admin token configured: it must open
// live at once, with no token form and no "disconnected" pill.
//
// usage: node loopback.mjs <base-url> <screenshot.png>
import { chromium } from "playwright-core";

const [base, shot] = process.argv.slice(2);
const fail = (msg) => { console.error(`FAIL: ${msg}`); process.exit(1); };
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run",
         "--disable-component-update", "--disable-sync"],
});
const timer = setTimeout(() => fail("timed out after 30 s"), 30000);
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  let sawLogin = false;
  await page.exposeFunction("__sawLogin", () => { sawLogin = true; });
  await page.addInitScript(() => {
    new MutationObserver(() => {
      const l = document.querySelector("#login");
      if (l && !l.hidden) window.__sawLogin();
    }).observe(document, { subtree: true, attributes: true, childList: true });
  });
  const started = Date.now();
  await page.goto(`${base}/dashboard`);
  await page.waitForSelector("[data-testid=backend-card]", { timeout: 5000 });
  await page.waitForFunction(() => document.querySelector("#conn").textContent.trim() === "live", null, { timeout: 5000 });
  const ms = Date.now() - started;
  if (sawLogin || !(await page.$eval("#login", (e) => e.hidden))) fail("the token form was shown");
  if (!(await page.$eval("#login-error", (e) => e.textContent === ""))) fail("an error was shown");
  // The runtime settings say where each value comes from; an override set
  // before the page opened can be cleared from it.
  const from = (k) => page.$eval(`[data-config=${k}] .badge`, (e) => e.textContent);
  await page.waitForSelector("[data-config=queue_timeout]", { timeout: 5000 });
  if ((await from("queue_timeout")) !== "override") fail(`queue_timeout from ${await from("queue_timeout")}`);
  if ((await from("cooldown_max")) !== "default") fail(`cooldown_max from ${await from("cooldown_max")}`);
  await page.screenshot({ path: shot, fullPage: true });
  await page.click("[data-clear=queue_timeout]");
  await page.waitForFunction(() => document.querySelector("[data-config=queue_timeout] .badge").textContent !== "override", null, { timeout: 5000 });
  console.log(`OK live after ${ms} ms, no token form; override cleared from the page (now ${await from("queue_timeout")})`);
} catch (e) {
  fail(e.stack || String(e));
} finally {
  clearTimeout(timer);
  await browser.close();
}
