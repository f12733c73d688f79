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


def demo_like_summary():
    """What a demo run's summary holds beyond the test run's tables: a noise floor and a recovery with all
    three arms (the widest table of the report)."""
    from qreason.summary import (
        ArmResult,
        NoiseSummary,
        PerturbationNoise,
        RecoverySummary,
        RunSummary,
        VariantRecovery,
        VariantVsNoise,
    )

    def arm(name: str, kind: str, items: int) -> dict:
        return dict(
            variant="rtn-w4a16",
            eval_variant=name,
            arm=kind,
            mode="sft",
            train_items=items,
            train_problem_ids=[str(i) for i in range(items)],
            eval_problem_ids=[str(i) for i in range(40)],
            seeds=[0],
            base_accuracy=0.325,
            accuracy_before=0.175,
            accuracy_after=0.2,
            recovery_before=0.538,
            recovery_after=0.615,
            repaired=3,
            broken=2,
            mcnemar_p=0.00003,
            diff_ci=[-0.1, 0.15],
            adapter="/somewhere/adapters/" + name,
            adapter_key="k",
            adapter_reused=False,
            eval_mode="merged",
            train_seconds=123.4,
            eval_seconds=55.0,
            generations_produced=40,
        )

    rec = VariantRecovery(
        **arm("rtn-w4a16+sb", "targeted", 4),
        control=ArmResult(**arm("rtn-w4a16+ctl", "control", 2)),
        fp_arm=ArmResult(**arm("base+fp", "fp", 4)),
        gap_closed=-0.2,
        gap_closed_ci=[-1.5, 0.8],
        repair_beyond_fp=0.125,
        repair_beyond_fp_ci=[-0.05, 0.3],
        min_train_items=20,
        conclusive=False,
        verdict="too few items to conclude (4 train items, fewer than 20)",
    )
    noise = NoiseSummary(
        base="base",
        perturbations=[
            PerturbationNoise(name="batch16", variant="base~batch16", task="synthetic", cells=8, lost=1)
        ],
        variants=[
            VariantVsNoise(
                variant="rtn-w4a16",
                task="synthetic",
                cells=8,
                lost=3,
                noise_cells=8,
                noise_flips=1,
                p_value=1.5e-8,
                exceeds_noise=True,
            )
        ],
    )
    return RunSummary(
        run_id="20261205T120000Z-abc123", name="demo", recover=RecoverySummary(variants=[rec]), noise=noise
    )


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (scripts/setup-test-tools.sh)")
def test_at_1280_px_the_first_screen_answers_and_nothing_is_wider_than_the_page(tmp_path):
    """A 1280 x 800 window: no table is cut or scrolls sideways, and each variant's headline answers (accuracy
    change, flips against the noise, where it broke, recovery) are visible without scrolling."""
    from playwright.sync_api import sync_playwright

    store = build_run(tmp_path)
    out = build_report(store, summary=demo_like_summary())
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(out.as_uri())
        page.screenshot(path=str(tmp_path / "first-screen.png"))
        too_wide = page.evaluate(
            """() => {
              const page = document.documentElement.clientWidth;
              const out = [];
              const whole = document.documentElement.scrollWidth;
              if (whole > page) out.push("page " + whole);
              for (const el of document.querySelectorAll("table, img, pre, .headline, .figs")) {
                const r = el.getBoundingClientRect();
                const box = el.parentElement.clientWidth;
                if (r.right > page + 0.5 || el.scrollWidth > Math.max(box, el.clientWidth) + 1) {
                  out.push(el.tagName + " " + (el.previousElementSibling || {}).textContent + " " + r.right);
                }
              }
              return out;
            }"""
        )
        facts = page.evaluate(
            """() => [...document.querySelectorAll('#headline dt')].map(
                 dt => [dt.textContent, dt.nextElementSibling.getBoundingClientRect().bottom])"""
        )
        height = page.evaluate("window.innerHeight")
        browser.close()
    assert not too_wide, too_wide
    labels = [label for label, _ in facts]
    for answer in ("accuracy · synthetic", "vs noise · synthetic", "where it broke", "recovery"):
        assert answer in labels, labels
    assert all(bottom <= height for label, bottom in facts if label != "gates"), facts
