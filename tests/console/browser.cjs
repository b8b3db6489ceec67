// What the console scripts share: headless Chromium (playwright-core, from
// PLAYWRIGHT_CORE) on a page of the console at `url`, signed in with
// `token`, collecting what the page logs as an error.
"use strict";
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

async function openConsole(url, token) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox"],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  await page.goto(url);
  await page.fill("#token", token);
  await page.dispatchEvent("#token", "change");
  return { browser, page, errors };
}

// Run `steps`; on a failure, print it and exit non-zero.
function run(steps) {
  steps().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}

module.exports = { openConsole, run };
