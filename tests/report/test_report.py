"""The HTML report renders in a real headless Chromium without errors, and model text stays inert text."""

import shutil

import pytest
from run_builders import build_run

from qreason.records import Generation
from qreason.report import FILTER_SCRIPT, build_report, script_hash
from qreason.store import RunIndex

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ATTACK = (
    'Step 1: <script>document.title="pwned"; window.__pwned = 1;</script> 2 + 2 = 5\n'
    'Step 2: <img src=x onerror="window.__pwned = 2"> <b>bold?</b> {{ 7*7 }} </details></li>\n'
    "The final answer is \\boxed{5}."
)


def plant(store):
    """Replace one failed quantized solution's text and steps with hostile markup."""
    from qreason.inputs.steps import split_steps

    gens = store.generations.all()
    target = next(g for g in gens if g.variant == "rtn-w4a16" and g.key == "rtn-w4a16-1-1")
    path = store.generations.path
    lines = path.read_text().splitlines()
    new = target.model_copy(update={"text": ATTACK, "steps": split_steps(ATTACK)})
    path.write_text(
        "\n".join(
            new.model_dump_json() if Generation.model_validate_json(row).key == target.key else row
            for row in lines
        )
        + "\n"
    )
    store.generations._rows = None  # re-read


def test_report_is_self_contained_and_escapes_model_text(tmp_path):
    from qreason.records import ModelVariant

    store = build_run(tmp_path)
    plant(store)
    checkpoint = tmp_path / "checkpoints" / "rtn-ckpt"
    store.variants.append(
        [
            ModelVariant(
                key="v-rtn",
                name="rtn-w4a16",
                base_model=str(tmp_path / "checkpoints" / "base"),
                base_fingerprint="b",
                method="rtn-w4a16",
                path=str(checkpoint),
                fingerprint="f",
                created_at="2026-01-01T00:00:00+00:00",
            )
        ]
    )
    index = RunIndex(tmp_path / "index.sqlite")
    out = build_report(store, index=index)
    html = out.read_text()
    assert "<td>rtn-ckpt</td>" in html  # the checkpoint is named, its directory is not
    # the only script is the failure filter, allowed by its hash; the planted one is text
    assert html.count("<script") == 1 and "&lt;script&gt;" in html
    assert script_hash(FILTER_SCRIPT).strip("'") in html and f"<script>{FILTER_SCRIPT}</script>" in html
    assert 'onerror="window' not in html and "{{ 7*7 }}" in html
    assert "http://" not in html and "https://" not in html  # nothing to fetch
    assert str(tmp_path) not in html  # no directory of the machine that wrote it (checkpoint paths)
    assert html.count("data:image/png;base64,") >= 3
    for section in (
        "Gates",
        "Summary",
        "Flips and significance",
        "Error types",
        "First faulty step",
        "Degradation by difficulty",
        "Failures, step by step",
        "Environment",
    ):
        assert section in html


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium_without_errors_and_runs_nothing(tmp_path):
    from playwright.sync_api import sync_playwright

    store = build_run(tmp_path)
    plant(store)
    out = build_report(store)
    errors, messages = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.on("console", lambda m: messages.append(m) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(e))
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(out.as_uri())
        page.click("summary:has-text('flip')")  # open the first flip's drill-down
        assert page.evaluate("window.__pwned") is None
        assert page.title().startswith("qreason report")
        planted = page.locator("li", has_text='<script>document.title="pwned"')
        assert (
            planted.count() == 1
            and "<b>bold?</b>" in page.locator("li", has_text="bold?").first.text_content()
        )
        assert page.locator("img").count() >= 3 and page.locator("script").count() == 1
        # the failure filter runs (the CSP allows its hash) and hides what does not match
        shown = page.locator("details.failure:visible")
        total = shown.count()
        assert total > 0 and page.locator("#failure-count").text_content() == str(total)
        page.select_option("select[name=flip]", "yes")
        flips = page.locator("details.failure:visible").count()
        assert 0 < flips < total and page.locator("#failure-count").text_content() == str(flips)
        assert page.locator("details.failure:visible[data-flip=no]").count() == 0
        page.select_option("select[name=flip]", "")
        page.select_option("select[name=variant]", "rtn-w4a16")
        assert page.locator("details.failure:visible").count() == total  # only rtn-w4a16 has failures here
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert not errors and not messages, [str(e) for e in errors] + [m.text for m in messages]
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
