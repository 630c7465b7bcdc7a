"""End to end in a real headless Chromium (Debian's, driven by Playwright) against
``streamlit run app.py``: sign in, upload a crop, see the prediction and the Grad-CAM, save
the case, review and sign it on the Cases page; then a field case with a blood count, from
upload through its case summary to a signed PDF. Screenshots go to the test's temporary
folder, and also to ``$LEUKO_SCREENSHOTS`` when set (the README's screenshots come from
there)."""

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from leuko.bench import sample_field
from leuko.paths import REPO_ROOT
from leuko.store import CaseStore
from tests.test_segment import stained_cell

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """The app on a free local port with its own LEUKO_HOME and a reviewer account."""
    home = tmp_path / "home"
    store = CaseStore(home=home)
    store.create_user("rita", "reviewer-pass", "reviewer")
    store.close()
    port = _free_port()
    env = {**os.environ, "LEUKO_HOME": str(home), "LEUKO_EXAMPLES": str(tmp_path / "no-examples")}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                                "--server.headless", "true", "--server.address", "127.0.0.1"],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("streamlit did not start")
        yield url, started
    finally:
        process.terminate()
        process.wait(10)


def _idle(page) -> None:
    """Wait until the app has finished its current script run (a click during a rerun can
    land on an element that is about to be replaced)."""
    page.wait_for_timeout(300)
    expect_hidden = page.get_by_test_id("stStatusWidgetRunningIcon")
    expect_hidden.wait_for(state="hidden")


def _download(page, label: str) -> bytes:
    """The file a download button gives. A click landing while the page reruns is lost about
    once in fifteen runs here; a second click, as a user would make, then downloads."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(2):
        _idle(page)
        try:
            with page.expect_download(timeout=20_000) as download:
                page.get_by_role("button", name=label).click()
        except PlaywrightTimeout:
            continue
        return Path(download.value.path()).read_bytes()
    pytest.fail(f"{label}: no download after two clicks")


def _choose_first_option(page, label: str | re.Pattern) -> None:
    """Open a selectbox from the keyboard and take its first option; a rerun replacing the
    widget while it opens closes it again, so this tries up to three times."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(3):
        _idle(page)
        page.get_by_role("combobox", name=label).focus()
        page.keyboard.press("ArrowDown")
        try:
            page.get_by_role("option").first.click(timeout=5_000)
            return
        except PlaywrightTimeout:
            continue
    pytest.fail(f"{label}: the options never opened")


def _field_case(page, folder: Path) -> None:
    """Analyse a 1712x1368 field of three leukocytes with a blood count reporting no blasts,
    save it, label each cell on the Cases page, sign it with an impression, and read the PDF."""
    from playwright.sync_api import expect
    from pypdf import PdfReader

    field = folder / "field.png"
    Image.fromarray(sample_field(cells=3)).save(field)
    page.get_by_role("link", name="Analyze").click()
    expect(page.get_by_role("heading", name="Analyze", exact=True)).to_be_visible()
    page.get_by_text("CBC and clinical values (optional)").click()
    blasts = page.get_by_label("Peripheral blasts %")
    blasts.fill("0")
    blasts.press("Enter")
    expect(page.get_by_text("Values accepted.")).to_be_visible()
    page.locator("input[type=file]").set_input_files(str(field))
    analyze = page.get_by_role("button", name="Analyze", exact=True)
    expect(analyze).to_be_enabled()
    _idle(page)
    analyze.click()
    expect(page.get_by_text("Field of view: 3 white cell(s)")).to_be_visible()
    expect(page.get_by_role("heading", name="Case summary")).to_be_visible()
    expect(page.get_by_text("1 image(s), 3 white cell(s) counted.")).to_be_visible()
    expect(page.get_by_text("The blood count and the images disagree")).to_be_visible()
    page.get_by_role("heading", name="Case summary").evaluate("heading => heading.scrollIntoView({block: 'start'})")
    _shot(page, folder, "analyze-field")
    page.get_by_label("Case reference (pseudonymous; never a patient name)").fill("FIELD-E2E")
    page.get_by_role("button", name="Save as case").click()
    expect(page.get_by_text("Saved as case FIELD-E2E")).to_be_visible()

    page.get_by_role("link", name="Cases").click()
    expect(page.get_by_text("Case FIELD-E2E: new")).to_be_visible()
    for number in (1, 2, 3):
        _choose_first_option(page, re.compile(rf"^Cell #{number}\b"))
    _idle(page)
    page.get_by_role("button", name="Confirm or reclassify").click()
    expect(page.get_by_text("Review saved: 3 label(s) of field.png.")).to_be_visible()
    expect(page.get_by_text("Case FIELD-E2E: reviewed")).to_be_visible()
    page.get_by_role("textbox", name="Impression").fill("Three cells reviewed; blasts to be confirmed by flow cytometry.")
    page.get_by_role("button", name="Sign off this case").click()
    expect(page.get_by_text("Case FIELD-E2E: signed")).to_be_visible()
    _shot(page, folder, "cases-field")
    report = PdfReader(io.BytesIO(_download(page, "Download PDF report")))
    first = " ".join(report.pages[0].extract_text().split())
    assert "FIELD-E2E" in first and "flow cytometry" in first


def _shot(page, folder: Path, name: str) -> None:
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    page.wait_for_timeout(500)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("LEUKO_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def test_sign_in_analyse_save_and_find_the_case(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, started = server
    expect.set_options(timeout=60_000)
    crop = tmp_path / "cell.png"
    Image.fromarray(stained_cell(200, 70, 40)).save(crop)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        expect(page.get_by_text("decision support, not a diagnosis")).to_be_visible()
        print(f"\nstreamlit run to a usable home page: {time.monotonic() - started:.1f} s")
        page.get_by_label("User name").fill("rita")
        page.locator("input[type=password]").fill("reviewer-pass")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_text("Signed in as")).to_be_visible()
        _shot(page, tmp_path, "home")

        page.get_by_role("link", name="Analyze").click()
        expect(page.get_by_role("heading", name="Analyze", exact=True)).to_be_visible()
        analyze = page.get_by_role("button", name="Analyze", exact=True)
        uploaded = time.monotonic()
        page.locator("input[type=file]").set_input_files(str(crop))
        expect(analyze).to_be_enabled()
        clicked = time.monotonic()
        analyze.click()
        page.get_by_text("gradcam for").wait_for()
        done = time.monotonic()
        print(f"one crop, first analysis of the session: upload to result {done - uploaded:.2f} s, "
              f"click to result {done - clicked:.2f} s")
        repeats = []
        for run in (2, 3, 4):
            clicked = time.monotonic()
            analyze.click()
            page.get_by_text(f"Run {run}: 1 image(s) analysed").wait_for()
            page.get_by_text("gradcam for").wait_for()
            repeats.append(time.monotonic() - clicked)
        print(f"click to result for one crop, runs 2-4: {', '.join(f'{t:.2f}' for t in repeats)} s")
        expect(page.get_by_text("decision support, not a diagnosis").last).to_be_visible()
        _shot(page, tmp_path, "analyze")
        page.get_by_label("Case reference (pseudonymous; never a patient name)").fill("CASE-E2E")
        page.get_by_role("button", name="Save as case").click()
        expect(page.get_by_text("Saved as case CASE-E2E")).to_be_visible()

        page.get_by_role("link", name="Cases").click()
        expect(page.get_by_text("Case CASE-E2E: new")).to_be_visible()
        _shot(page, tmp_path, "cases")
        _choose_first_option(page, "Final label")
        page.get_by_role("button", name="Confirm or reclassify").click()
        expect(page.get_by_text("Case CASE-E2E: reviewed")).to_be_visible()
        page.get_by_role("button", name="Sign off this case").click()
        expect(page.get_by_text("Case CASE-E2E: signed")).to_be_visible()
        assert _download(page, "Download PDF report").startswith(b"%PDF")
        assert _download(page, "Export the matching cases as CSV").startswith(b"case,")
        _field_case(page, tmp_path)

        page.get_by_role("link", name="Train").click()
        expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible()
        _shot(page, tmp_path, "train")
        page.get_by_role("link", name="Models").click()
        expect(page.get_by_text("Model cards")).to_be_visible()
        _shot(page, tmp_path, "models")
        browser.close()
    assert all((tmp_path / f"{n}.png").stat().st_size > 10_000
               for n in ("home", "analyze", "analyze-field", "cases", "cases-field", "train", "models"))
