"""Screenshots of a report in headless Chromium (Debian's chromium through playwright), for docs/img/.

    .venv/bin/python scripts/report_screenshot.py runs/demo/report.html docs/img/report-first-screen.png \
        [--width 1280] [--height 800] [--anchor recovery]

Without --anchor: the first screen, as a reader opening the file sees it. With it: the screen starting at
that section (an element id). Prints the console errors and blocked requests, if any (exit 1 then)."""

import argparse
import shutil
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--anchor", help="scroll to this element id first")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(args.report.resolve().as_uri())
        if args.anchor:
            page.locator(f"#{args.anchor}").scroll_into_view_if_needed()
            page.evaluate(f"document.getElementById({args.anchor!r}).scrollIntoView()")
        args.png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.png))
        width = page.evaluate("document.documentElement.scrollWidth")
        browser.close()
    print(f"{args.png}: page scroll width {width}px at a {args.width}px viewport")
    for line in problems:
        print(f"console: {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
