// Debian's chromium (not a downloaded one), headless, and a page that records its own errors.
import { chromium } from "playwright-core";

export async function launch() {
  return chromium.launch({
    executablePath: process.env.BEARWATCH_CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu"],
  });
}

// A 1400 × 950 page whose script errors and console errors go into `errors`.
export async function watchedPage(browser, errors) {
  const page = await browser.newPage({ viewport: { width: 1400, height: 950 } });
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  return page;
}
