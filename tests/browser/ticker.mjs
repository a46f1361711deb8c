// A per-ticker alert in the dashboard: its title names the ticker, "stories of this window" lists
// the stories that name it (also when opened from the alert's address, as Alertmanager links it),
// and the stories' CSV keeps a formula-like headline as text. Prints one JSON line.
// Usage: node ticker.mjs URL TICKER
import { readFile } from "node:fs/promises";
import { launch, watchedPage } from "./launch.mjs";

const [url, ticker] = process.argv.slice(2);
const browser = await launch();
const errors = [];
try {
  const page = await watchedPage(browser, errors);
  await page.goto(url);
  const alert = page.locator("#alerts .alert", { hasText: ticker }).first();
  await alert.waitFor({ timeout: 120000 });
  const result = { title: await alert.locator(".title").innerText(), id: await alert.getAttribute("data-alert") };
  await alert.locator("button.open").click();
  await page.waitForSelector("#stories tr[data-story]", { timeout: 30000 });
  result.storiesTitle = await page.locator("#stories-title").innerText();
  result.stories = await page.locator("#stories tr[data-story]").count();
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#stories-csv")]);
  result.csv = (await readFile(await download.path(), "utf8")).split("\r\n").filter(Boolean);
  // The alert's own address, as a link from Alertmanager opens it.
  const linked = await watchedPage(browser, errors);
  await linked.goto(`${url}?alert=${encodeURIComponent(result.id)}`);
  await linked.waitForSelector("#stories tr[data-story]", { timeout: 60000 });
  result.linkedStories = await linked.locator("#stories tr[data-story]").count();
  result.errors = errors;
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
