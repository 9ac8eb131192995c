// Drives Debian's Chromium through the engine's live page (run by
// tests/live_page.rs against a real broker and engine):
//   node live_page.test.js <page-url> <genre> <screenshot.png>
// Likes titles of <genre> one by one, waits for each to leave the rows (the
// update arrives by server-sent events), then checks that the genre's row is
// the first genre row and that no liked title is shown. Prints one JSON line
// with the measured click-to-update latencies.
"use strict";

const { chromium } = require("playwright-core");

const [url, genre, screenshot] = process.argv.slice(2);
const LIKES = 4;

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1100 } });
  page.on("console", (m) => console.error(`[page ${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => console.error(`[page error] ${e.message}`));
  try {
    await page.goto(url);
    await page.waitForSelector("#connection.live", { timeout: 20000 });
    await page.waitForSelector("section.row .card", { timeout: 20000 });
    const rowsBefore = await rowIds(page);
    const liked = [];
    const latencies = [];
    for (let i = 0; i < LIKES; i++) {
      // Titles of that genre alone where the rows show some, so that the
      // genre's weight (not a co-genre's) is what the likes raise most.
      const only = page.locator(`.card[data-genre-list="|${genre}|"]:not(.pending)`);
      const card = (await only.count()) > 0
        ? only.first()
        : page.locator(`.card[data-genre-list*="|${genre}|"]:not(.pending)`).first();
      await card.waitFor({ timeout: 10000 });
      const id = await card.getAttribute("data-movie-id");
      const started = Date.now();
      await card.locator("button.like").click();
      // Liked titles are seen: they leave every row once the engine publishes.
      await page.waitForFunction(
        (movie) => !document.querySelector(`.card[data-movie-id="${movie}"]`),
        id,
        { timeout: 10000 },
      );
      latencies.push(Date.now() - started);
      liked.push(id);
    }
    await page.waitForFunction(
      // Top picks always lead; the genre's row comes right after them.
      (g) => {
        const rows = [...document.querySelectorAll("section.row")].map((r) => r.dataset.rowId);
        const firstGenre = document.querySelector('section.row[data-kind="genre"]');
        return firstGenre && firstGenre.dataset.rowId === `genre:${g}` &&
          rows.indexOf(`genre:${g}`) <= 1;
      },
      genre,
      { timeout: 10000 },
    );
    const rowsAfter = await rowIds(page);
    const stillShown = await page.evaluate(
      (ids) => ids.filter((id) => document.querySelector(`.card[data-movie-id="${id}"]`)),
      liked,
    );
    if (stillShown.length) throw new Error(`liked titles still shown: ${stillShown}`);
    // The insights record arrives on its own event, just after the rows.
    await page.waitForFunction(
      (g) => document.querySelector("#genre-bars .bar")?.dataset.genre === g,
      genre,
      { timeout: 10000 },
    );
    const topBar = await page.getAttribute("#genre-bars .bar", "data-genre");
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(JSON.stringify({ ok: true, liked, latencies_ms: latencies, rows_before: rowsBefore, rows_after: rowsAfter, top_taste: topBar }));
  } catch (e) {
    await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
    console.log(JSON.stringify({ ok: false, error: e.message, rows: await rowIds(page).catch(() => []) }));
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

function rowIds(page) {
  return page.$$eval("section.row", (rows) => rows.map((r) => r.dataset.rowId));
}

main();
