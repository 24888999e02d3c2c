// Debian's headless Chromium through playwright-core (which never downloads a browser), shared by
// check_ui.mjs and thumbnails.mjs. CHROMIUM overrides the executable.
import { chromium } from "playwright-core";

export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"],
  });
}
