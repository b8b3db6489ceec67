// Drives the console's preview controls in headless Chromium: the diff of a
// preview against the live read model, then its promotion. Run by
// tests/e2e/console.rs:
//   node preview.cjs <url> <token> <screenshot dir>
"use strict";
const [url, token, shots] = process.argv.slice(2);
const { openConsole, run } = require("./browser.cjs");

run(async () => {
  const { browser, page, errors } = await openConsole(url, token);
  const row = 'tr[data-projection="order-summary"]';
  await page.waitForSelector(`${row} button.diff`);
  const building = (await page.textContent(`${row} td.rebuild`)).trim();
  // The projections table is redrawn every 2 s: a click that lands as its
  // row is replaced is lost, so click again until the diff shows.
  const shown = '#preview-diff tr[data-table="orders"]';
  for (let i = 0; i < 10 && !(await page.isVisible(shown)); i++) {
    await page.click(`${row} button.diff`, { timeout: 3000 }).catch(() => {});
    await page.waitForSelector(shown, { timeout: 3000 }).catch(() => {});
  }
  if (!(await page.isVisible(shown))) throw new Error(`no diff shown; the page says: ${await page.textContent("#message")}`);
  const summary = (await page.textContent("#preview-summary")).trim();
  const counts = await page.$$eval('#preview-diff tr[data-table="orders"] td.num', (cells) => cells.map((c) => Number(c.textContent)));
  const samples = await page.textContent('#preview-diff tr[data-table="orders"] pre');
  await page.screenshot({ path: `${shots}/6-preview-diff.png`, fullPage: true });
  const promotedSaid = () => page.evaluate(() => document.getElementById("message").textContent.startsWith("preview promoted"));
  for (let i = 0; i < 10 && !(await promotedSaid()); i++) {
    await page.click(`${row} button.promote`, { timeout: 3000 }).catch(() => {});
    await page.waitForFunction(() => document.getElementById("message").textContent.startsWith("preview promoted"), null, { timeout: 3000 }).catch(() => {});
  }
  if (!(await promotedSaid())) throw new Error(`not promoted; the page says: ${await page.textContent("#message")}`);
  const promoted = (await page.textContent("#message")).trim();
  console.log(JSON.stringify({ building, summary, counts, samples, promoted, errors }));
  await browser.close();
});
