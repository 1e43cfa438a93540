// A job page open across a coordinator restart (tests/tests/dashboard.rs): it shows the curve
// so far, prints "ready", and once the coordinator is back it must pick the stream up from the
// last event it had, without reloading: every event once, the new points drawn.
//
// Environment: URL, JOB, BEFORE (loss points before the restart), AFTER (in all).
import { chromium } from "../../web/node_modules/playwright-core/index.mjs";

const { URL: url, JOB, BEFORE, AFTER } = process.env;
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(90_000);
  await page.goto(`${url}/#/jobs/${JOB}`);
  const points = (n) => page.waitForFunction(
    (n) => Number(document.querySelector("#chart-loss")?.dataset.points) === n, Number(n));
  await points(BEFORE);
  const before = Number(await page.locator("#view").getAttribute("data-events"));
  console.log(`ready ${before}`);
  await points(AFTER);
  const after = Number(await page.locator("#view").getAttribute("data-events"));
  console.log(JSON.stringify({ events_before: before, events_after: after }));
} finally {
  await browser.close();
}
