// The dashboard in a real browser (Debian's chromium, driven by playwright-core), against the
// coordinator and daemons tests/tests/dashboard.rs started. Every check is on what the page
// shows; the last line of stdout is a JSON summary the Rust test checks against GetMetrics.
//
// Environment: URL (the dashboard), CLIENT_TOKEN, WORKER_TOKEN, JOB (training, world 2),
// DONE_JOB (finished), SHOTS (a directory for the screenshots).
import { chromium } from "../../web/node_modules/playwright-core/index.mjs";
import assert from "node:assert/strict";
import path from "node:path";

const { URL: url, CLIENT_TOKEN, WORKER_TOKEN, JOB, DONE_JOB, SHOTS } = process.env;
const TIMEOUT = 90_000;
const step = (what) => console.log(`dashboard: ${what}`);

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  // Root in CI has no user namespaces for chromium's sandbox; /dev/shm may be small in containers.
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
const summary = {};
try {
  // The coordinator's certificate is from a private CA the test made; the browser has no trust
  // store entry for it (the gRPC tests check the chain).
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  // No token: the sign-in form, the gRPC refusal's text, and no data.
  await page.goto(`${url}/#/jobs`);
  await page.locator("#signin").waitFor({ state: "visible" });
  assert.match(await page.locator("#signin-error").innerText(), /needs a client or admin token/);
  assert.equal(await page.locator("#jobs-table").count(), 0);
  step("no token: sign-in shown, no data");

  // A wrong token, then a token of the wrong role.
  const signIn = async (token) => {
    await page.fill("#token", token);
    await page.click("#signin button[type=submit]");
  };
  await signIn("segtrain_not-a-real-token");
  await page.locator("#signin-error", { hasText: "not valid" }).waitFor();
  assert.equal(await page.locator("#jobs-table").count(), 0);
  await signIn(WORKER_TOKEN);
  await page.locator("#signin-error", { hasText: "is a worker token" }).waitFor();
  assert.equal(await page.locator("#jobs-table").count(), 0);
  step("wrong token and worker token: refused, no data");

  // The client token: the jobs page lists both jobs, live.
  await signIn(CLIENT_TOKEN);
  const row = page.locator(`tr[data-job-id="${JOB}"]`);
  await row.waitFor();
  assert.ok(await page.locator("#signin").isHidden(), "the sign-in form is gone");
  await page.locator(`tr[data-job-id="${DONE_JOB}"] .state`, { hasText: "SUCCEEDED" }).waitFor();
  await row.locator(".state", { hasText: "RUNNING" }).waitFor();
  // Each job says who submitted it, for which team (the test's client token "browser").
  await row.locator("td.owner", { hasText: "browser (default)" }).waitFor();
  // Progress moves without a reload.
  const progress = async () => Number((await row.locator("td").nth(3).innerText()).split("/")[0].trim());
  const p0 = await progress();
  await page.waitForFunction(
    ([id, p]) => {
      const td = document.querySelector(`tr[data-job-id="${id}"] td:nth-child(4)`);
      return td && Number(td.textContent.split("/")[0].trim()) > p;
    },
    [JOB, p0],
    { timeout: TIMEOUT },
  );
  summary.list_progress = [p0, await progress()];
  await page.screenshot({ path: path.join(SHOTS, "dashboard-jobs.png") });
  step(`jobs page: both jobs listed, progress ${summary.list_progress.join(" -> ")}`);

  // Compare: the two jobs' loss curves overlaid.
  await page.check(`tr[data-job-id="${JOB}"] input.pick`);
  await page.check(`tr[data-job-id="${DONE_JOB}"] input.pick`);
  await page.click("#compare");
  await page.waitForFunction(() => Number(document.querySelector("#compare-loss")?.dataset.points) > 0);
  const legend = await page.locator("#compare-loss .u-legend").innerText();
  assert.ok(legend.includes(JOB.slice(-8)) && legend.includes(DONE_JOB.slice(-8)), legend);
  step("compare: both jobs' curves");

  // The job's page: the loss curve gains points while it trains.
  await page.goto(`${url}/#/jobs/${JOB}`);
  const points = async (id) => Number(await page.locator(id).getAttribute("data-points"));
  await page.waitForFunction(() => Number(document.querySelector("#chart-loss")?.dataset.points) > 0);
  const before = await points("#chart-loss");
  await page.waitForFunction(
    (n) => Number(document.querySelector("#chart-loss").dataset.points) > n, before, { timeout: TIMEOUT });
  summary.loss_points_growing = [before, await points("#chart-loss")];
  await page.locator("#job-state", { hasText: "RUNNING" }).waitFor();
  // For the screenshots in docs/: a longer curve first (SHOT_POINTS=60).
  const shotPoints = Number(process.env.SHOT_POINTS || 0);
  if (shotPoints) {
    await page.waitForFunction(
      (n) => Number(document.querySelector("#chart-loss").dataset.points) >= n, shotPoints, { timeout: 600_000 });
  }
  // An evaluation: the mIoU curve and the per-class table with Cityscapes' names.
  await page.locator("#class-iou-table").waitFor();
  const classes = await page.locator("#class-iou-table tbody tr").allInnerTexts();
  assert.equal(classes.length, 19, classes.join("\n"));
  assert.ok(classes[0].startsWith("road") && classes[18].startsWith("bicycle"), classes.join("\n"));
  // The charts are drawn on the page's redraw timer, after the table: wait for the point.
  await page.waitForFunction(() => Number(document.querySelector("#chart-miou")?.dataset.points) > 0);
  await page.locator("#timeline", { hasText: "RUNNING" }).waitFor();
  assert.match(await page.locator("#spec").innerText(), /"world_size": 2/);
  await page.screenshot({ path: path.join(SHOTS, "dashboard-job.png"), fullPage: true });
  step(`job page: loss points ${summary.loss_points_growing.join(" -> ")}, 19 classes`);

  // Workers: both daemons, each busy with a rank of the job.
  await page.goto(`${url}/#/workers`);
  for (const w of ["cpu-a:cpu", "cpu-b:cpu"]) {
    const card = page.locator(`[data-worker="${w}"]`);
    await card.locator(".state", { hasText: "BUSY" }).waitFor();
    await card.filter({ hasText: new RegExp(`${JOB.slice(-8)} rank [01]`) }).waitFor();
  }
  await page.screenshot({ path: path.join(SHOTS, "dashboard-workers.png") });
  step("workers page: both daemons busy");

  // Cancel, confirmed in the dialog: the page follows the job to CANCELED.
  await page.goto(`${url}/#/jobs/${JOB}`);
  await page.locator("#job-state", { hasText: "RUNNING" }).waitFor();
  let asked = "";
  page.once("dialog", (d) => { asked = d.message(); d.accept(); });
  await page.click("#cancel");
  await page.locator("#job-state", { hasText: "CANCELED" }).waitFor();
  assert.match(asked, /Cancel job/);
  assert.ok(await page.locator("#cancel").isDisabled());
  // Its stream has ended: everything delivered is drawn.
  await page.locator("#view[data-stream-ended]").waitFor({ state: "attached" });
  summary.loss_points_final = await points("#chart-loss");
  summary.miou_points_final = await points("#chart-miou");
  step(`canceled: ${summary.loss_points_final} loss points drawn`);
  assert.deepEqual(errors, [], "no script errors on the page");
} finally {
  await browser.close();
}
console.log(JSON.stringify(summary));
