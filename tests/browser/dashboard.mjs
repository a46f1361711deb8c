// Opens the dashboard in headless Chromium (Debian's, not a downloaded one) and checks what a person
// would look for: the chart draws lines from the windows, a firing alert shows its explanation (and
// the words behind its headlines, marked), the
// latest headlines are listed, and the numbers move while the pipeline runs; then it gives feedback
// as an analyst would: corrects a headline's sentiment, marks an alert as noise and reports a missed
// event. Prints one JSON line.
// Usage: node dashboard.mjs URL SCREENSHOT.png
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.BEARWATCH_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 950 } });
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  page.on("request", (r) => !r.url().startsWith(new URL(url).origin) && errors.push("external request: " + r.url()));
  await page.goto(url);
  const stories = () => page.$eval("#status", (e) => Number((e.textContent.match(/^(\d+) stories/) || [0, -1])[1]));
  await page.waitForFunction(() => /^\d+ stories/.test(document.getElementById("status").textContent), null, { timeout: 60000 });
  const first = await stories();
  // Live: a later refresh shows more stories than the first one did.
  await page.waitForFunction((n) => Number((document.getElementById("status").textContent.match(/^(\d+) stories/) || [0, -1])[1]) > n, first, { timeout: 60000 });
  await page.waitForSelector("svg#chart path.series", { timeout: 60000 });
  await page.waitForSelector("#alerts .alert", { timeout: 120000 });
  await page.waitForSelector("#headlines table tr:nth-child(2)", { timeout: 30000 });
  const result = {
    first,
    later: await stories(),
    series: await page.locator("svg#chart path.series").count(),
    points: await page.$eval("svg#chart path.series", (p) => (p.getAttribute("d").match(/[ML]/g) || []).length),
    alert: await page.locator("#alerts .alert").first().innerText(),
    // The words behind each headline's negativity, marked in the headline.
    marked: await page.locator("#alerts .alert").first().locator("li mark").allInnerTexts(),
    headlines: await page.locator("#headlines tr").count() - 1,
  };
  // Feedback, once the replay is over (so that the rows stay put): the first headline's sentiment
  // corrected to one the model did not give.
  await page.waitForFunction(() => /^3000 stories/.test(document.getElementById("status").textContent), null, { timeout: 240000 });
  const top = page.locator("#headlines td.feedback[data-story]").first();
  await top.waitFor({ timeout: 30000 });
  const story = await top.getAttribute("data-story");
  const cell = page.locator(`#headlines td.feedback[data-story="${story}"]`);
  const given = await cell.getAttribute("data-sentiment");
  const label = ["negative", "neutral", "positive"].find((l) => l !== given);
  await cell.locator('select[data-head="sentiment"]').selectOption(label);
  // Recorded: said above the headlines (the story may scroll out of the latest ones meanwhile).
  await page.waitForFunction((id) => document.getElementById("feedback-result").textContent.includes(id), story, { timeout: 30000 })
    .catch(async (e) => { throw new Error(`${e.message}; the page says: ${await page.locator("#status").innerText()}; errors: ${errors.join(" | ")}`); });
  result.correction = { story, given, label, shown: await page.locator("#feedback-result").innerText() };
  const alert = await page.locator("#alerts .verdicts[data-alert]").first().getAttribute("data-alert");
  await page.locator(`#alerts .verdicts[data-alert="${alert}"] button[data-verdict="noise"]`).click();
  await page.waitForFunction((id) => document.getElementById("feedback-result").textContent.includes(id), alert, { timeout: 30000 });
  result.verdict = { alert, shown: await page.locator("#feedback-result").innerText() };
  await page.selectOption("#missed-topic", "energy");
  await page.fill("#missed-from", "1987-03-02T00:00");
  await page.fill("#missed-to", "1987-03-03T00:00");
  await page.fill("#missed-note", "OPEC meeting");
  await page.click("#missed button");
  await page.waitForFunction(() => /recorded/.test(document.getElementById("missed-result").textContent), null, { timeout: 30000 });
  result.missed = await page.locator("#missed-result").innerText();
  result.errors = errors;
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
