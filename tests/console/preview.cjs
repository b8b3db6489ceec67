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
  await page.click(`${row} button.diff`);
  await page.waitForSelector('#preview-diff tr[data-table="orders"]');
  const summary = (await page.textContent("#preview-summary")).trim();
  const counts = await page.$$eval('#preview-diff tr[data-table="orders"] td.num', (cells) => cells.map((c) => Number(c.textContent)));
  const samples = await page.textContent('#preview-diff tr[data-table="orders"] pre');
  await page.screenshot({ path: `${shots}/6-preview-diff.png`, fullPage: true });
  await page.click(`${row} button.promote`);
  await page.waitForFunction(() => document.getElementById("message").textContent.startsWith("preview promoted"));
  const promoted = (await page.textContent("#message")).trim();
  console.log(JSON.stringify({ building, summary, counts, samples, promoted, errors }));
  await browser.close();
});
