// Drives the web console in headless Chromium (playwright-core): see the
// projections, run a search, browse a table, retry a dead letter; saves a
// screenshot of each step. Run by tests/e2e/console.rs:
//   node drive.cjs <url> <token> <dead letter id> <screenshot dir>
// with PLAYWRIGHT_CORE pointing at the installed playwright-core package
// (see browser.cjs).
"use strict";
const [url, token, letterId, shots] = process.argv.slice(2);
const { openConsole, run } = require("./browser.cjs");

run(async () => {
  const { browser, page, errors } = await openConsole(url, token);
  const shot = (name) => page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
  const row = 'tr[data-projection="order-summary"]';
  await page.waitForSelector(row);
  const lag = (await page.textContent(`${row} td.lag`)).trim();
  const state = (await page.textContent(`${row} td.state-running`)).trim();
  await shot("1-projections");

  await page.selectOption("#search-target", "order-search/orders");
  await page.fill("#q", "lamp");
  await page.click("#search-go");
  await page.waitForSelector("#search-results tr.hit");
  const searched = (await page.textContent("#search-summary")).trim();
  await shot("2-search");

  await page.selectOption("#table-target", "order-summary/orders");
  await page.fill("#prefix", "o-1");
  await page.click("#scan-go");
  await page.waitForSelector("#table-items tr.item");
  const items = await page.$$eval("#table-items tr.item td:first-child", (cells) => cells.map((c) => c.textContent));
  await shot("3-table");

  await page.selectOption("#letters-target", "order-summary");
  const letter = `tr[data-letter="${letterId}"]`;
  await page.waitForSelector(letter);
  await shot("4-dead-letters");
  await page.click(`${letter} button.reproduce`);
  await page.waitForFunction(() => document.getElementById("reproduction").textContent.startsWith("dead letter"));
  const reproduced = await page.textContent("#reproduction");
  await page.click(`${letter} button.retry`);
  await page.waitForSelector(letter, { state: "detached" });
  await page.waitForFunction(() => document.getElementById("message").textContent.startsWith("retried"));
  const retried = (await page.textContent("#message")).trim();
  await shot("5-retried");

  console.log(JSON.stringify({ lag, state, searched, items, reproduced, retried, errors }));
  await browser.close();
});
