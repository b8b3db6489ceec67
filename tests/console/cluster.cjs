// Opens the web console of an instance in a cluster in headless Chromium
// (playwright-core) and reads its Cluster section once every shard has a
// live active instance that is ready, and a standby; saves a screenshot.
// Run by tests/e2e/console.rs:
//   node cluster.cjs <url> <token> <shards> <screenshot dir>
// with PLAYWRIGHT_CORE pointing at the installed playwright-core package
// (see browser.cjs).
"use strict";
const [url, token, shards, shots] = process.argv.slice(2);
const { openConsole, run } = require("./browser.cjs");

run(async () => {
  const { browser, page, errors } = await openConsole(url, token);
  await page.waitForFunction((n) => {
    const rows = [...document.querySelectorAll("#cluster-shards tr.shard")];
    const held = (r) => r.querySelector("td.active").textContent !== "none"
      && r.querySelector("td.standbys").textContent !== "—"
      && r.lastElementChild.textContent.startsWith("ready");
    return rows.length === n && rows.every(held);
  }, Number(shards), { timeout: 60000 });
  const rows = await page.$$eval("#cluster-shards tr.shard", (rows) => rows.map((r) => ({
    shard: r.dataset.shard,
    active: r.querySelector("td.active").textContent,
    standbys: r.querySelector("td.standbys").textContent,
    state: r.lastElementChild.textContent,
  })));
  const members = await page.$$eval("#cluster-members tr.member", (rows) => rows.map((r) => r.firstElementChild.textContent));
  const summary = (await page.textContent("#cluster-summary")).trim();
  await page.screenshot({ path: `${shots}/6-cluster.png`, fullPage: true });

  console.log(JSON.stringify({ rows, members, summary, errors }));
  await browser.close();
});
