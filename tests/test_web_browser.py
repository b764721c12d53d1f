"""The UI in a real Chromium against a real `edgescreen serve` on a store that really analysed phantoms.

Covers what a radiographer, a clinician and an administrator do: log in (a wrong password refused),
the worklist and its filters, a study with the slices scrolled and the overlays toggled, mark reviewed,
mark a job urgent, pause the scheduler, upload a zip, switch to French and to Chinese, at 1280x800 and
800x1280. Screenshots are kept (tests/browser.artifacts_dir prints where) for a person to look at.

One server on one copy of the analysed store and one Chromium serve the whole module (starting either costs
seconds on a busy box); each test is a new person at a new screen: its own browser context, cookies and
language. The tests do not rely on each other's changes.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from edgescreen.appliance.store import Store
from tests.browser import LANDSCAPE, PORTRAIT, launch, login, page_in, screenshot, web_server
from tests.web_fixtures import PASSWORD, analysed_template, study_uids  # noqa: F401 - fixtures

OVERLAY_PIXELS = """(img) => {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
  return n;
}"""


@pytest.fixture(scope="module")
def site(analysed_template: Path, tmp_path_factory) -> tuple[str, Path]:  # noqa: F811 - pytest fixture
    data = tmp_path_factory.mktemp("browser") / "data"
    shutil.copytree(analysed_template, data, ignore=shutil.ignore_patterns("serve.log", "web"))
    uids = study_uids(data)  # the two analysed studies, before any test uploads another
    with web_server(data) as url:
        yield url, data, uids


@pytest.fixture(scope="module")
def browser():
    with launch() as b:
        yield b


def _wait_slice(page, index: int | None = None) -> int:
    viewer = page.locator(".viewer")
    if index is None:
        page.wait_for_function("() => document.querySelector('.viewer').dataset.shown !== undefined")
    else:
        page.wait_for_function(f"() => document.querySelector('.viewer').dataset.shown === '{index}'")
    page.wait_for_function("() => document.querySelector('img.slice').naturalWidth > 0")
    return int(viewer.get_attribute("data-shown"))


def _upload_zip(tmp_path: Path) -> Path:
    """A study as it comes on a USB stick: a new phantom CT, a README, a DICOMDIR and one damaged file."""
    from edgescreen.models.phantom.ct import write_ct_study

    folder = tmp_path / "usb"
    write_ct_study(folder, 11, lesion=None, slices=64)
    files = sorted(folder.glob("*.dcm"))
    damaged = files[-1].read_bytes()
    archive = tmp_path / "usb-study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in files[:-1]:
            zf.write(path, f"STUDY/{path.name}")
        zf.writestr("STUDY/README.TXT", "exported by the CT console")
        zf.writestr("DICOMDIR", b"\0" * 128 + b"DICM")
        zf.writestr("STUDY/BROKEN.dcm", damaged[: len(damaged) // 3])
    return archive


def test_clinic_day(site, browser, tmp_path: Path) -> None:
    url, data, uids = site
    archive = _upload_zip(tmp_path)
    with page_in(browser, LANDSCAPE) as page:
        # a wrong password is refused, and says so
        login(page, url, "ada", "not the password")
        assert "Wrong user name or password" in page.locator("#login-error").inner_text()
        screenshot(page, "01-login-refused-1280x800")
        login(page, url, "ada", PASSWORD)
        assert page.url.endswith("/worklist")
        assert page.locator("#research-banner").inner_text().startswith("RESEARCH USE ONLY")

        # the worklist: both studies, names in Chinese and Amharic, the state of each
        rows = page.locator("table.worklist tbody tr")
        assert rows.count() == 2
        text = page.locator("table.worklist").inner_text()
        assert "Wang, XiaoMing (王小明)" in text and "አበበ, ቢቂላ" in text
        assert page.locator(".name", has_text="王小明").evaluate("e => e.getBoundingClientRect().width") > 40
        screenshot(page, "02-worklist-1280x800")

        # filter: only the mammography exam
        page.select_option("#modality-filter", "MG")
        page.click("#filters button.primary")
        assert rows.count() == 1 and "ቢቂላ" in rows.first.inner_text()
        page.click("nav.chips a:has-text('done')")
        assert rows.count() == 1 and "modality=MG" in page.url and "state=done" in page.url
        page.goto(url + "/worklist")

        # the CT study: slices, overlays, windows, scrolling
        page.click("a.name:has-text('王小明')")
        start = _wait_slice(page)
        assert page.locator(".triage").first.inner_text() in ("suspicious", "indeterminate")
        assert page.locator("table.findings").count() >= 1 and "mm" in page.locator("table.findings").inner_text()
        lesion = page.locator("img.ov-lesions")
        page.wait_for_function("() => !document.querySelector('img.ov-lesions').hidden")
        assert lesion.evaluate(OVERLAY_PIXELS) > 50  # the lesion is drawn on the slice shown first
        page.wait_for_function("() => !document.querySelector('img.ov-pancreas').hidden")
        assert page.locator("img.ov-pancreas").evaluate(OVERLAY_PIXELS) > 50
        screenshot(page, "03-study-ct-1280x800")
        stage = page.locator(".stage")
        stage.focus()
        for _ in range(5):
            page.keyboard.press("ArrowDown")
        assert _wait_slice(page, start + 5) == start + 5
        stage.hover()
        page.mouse.wheel(0, -300)
        page.wait_for_function(f"() => document.querySelector('.viewer').dataset.index === '{start + 4}'")
        page.locator(".slider").fill(str(start))
        _wait_slice(page, start)
        stage.focus()
        page.keyboard.press("2")
        page.wait_for_function("() => document.querySelector('.viewer').dataset.preset === 'pancreas'")
        page.uncheck("input.layer[value='lesions']")
        page.wait_for_function("() => document.querySelector('img.ov-lesions').hidden")
        page.check("input.layer[value='lesions']")
        page.wait_for_function("() => !document.querySelector('img.ov-lesions').hidden")
        screenshot(page, "04-study-ct-pancreas-window-1280x800")
        # each lesion in the findings table takes the viewer to its own slice, where it is drawn
        show = page.locator("table.findings button.jump-slice").first
        target = int(show.get_attribute("data-to"))
        show.click()
        _wait_slice(page, target)
        page.wait_for_function(f"() => document.querySelector('img.ov-lesions').dataset.shown === '{target}'")
        assert page.locator("img.ov-lesions").evaluate(OVERLAY_PIXELS) > 0

        # downloads are the result's own files
        with page.expect_download() as dl:
            page.click("ul.downloads a:has-text('DICOM SEG')")
        assert dl.value.suggested_filename == "seg.dcm"

        # mark reviewed with a comment
        page.fill("#review-comment", "seen with Dr Amanuel; follow-up CT")
        page.click("#mark-reviewed")
        assert "Marked reviewed" in page.locator(".flash").inner_text()
        assert "follow-up CT" in page.locator("ul.reviews").inner_text()

        # upload a zip from a USB stick: stored, the bad files explained, the study queued
        page.goto(url + "/upload")
        page.set_input_files("#zip-file", str(archive))
        page.click("#upload-zip button.primary")
        result = page.locator("#upload-result").inner_text()
        assert "63 images stored" in result, result
        assert "README.TXT" in result and "BROKEN.dcm" in result
        screenshot(page, "05-upload-1280x800")
        page.click("a.uploaded-study")
        # it waits (no worker runs here): mark it urgent
        page.click("button.mark-urgent")
        assert "marked urgent" in page.locator(".flash").inner_text()
        assert page.locator(".job .flag", has_text="urgent").count() == 1

        # pause the scheduler; the system page says why nothing runs
        page.goto(url + "/system")
        page.fill("#pause-reason", "scanner service visit")
        page.click("#pause")
        assert page.locator("#gate-state").inner_text() == "Paused"
        assert "scanner service visit" in page.locator("#gate-reason").inner_text()
        screenshot(page, "06-system-paused-1280x800")
        page.click("#resume")
        assert page.locator("#gate-state").inner_text() != "Paused"

        # French, then Chinese
        with page.expect_navigation():  # the choice submits itself (app.js)
            page.select_option("#lang-select", "fr")
        assert page.locator("h1").first.inner_text() == "Système"
        page.goto(url + "/worklist")
        assert "Liste de travail" in page.locator("header nav").inner_text()
        screenshot(page, "07-worklist-fr-1280x800")
        with page.expect_navigation():  # the choice submits itself (app.js)
            page.select_option("#lang-select", "zh")
        assert "工作列表" in page.locator("header nav").inner_text()
        assert page.locator("html").get_attribute("lang") == "zh-Hans"
        screenshot(page, "08-worklist-zh-1280x800")

    store = Store(data)
    actions = [r["action"] for r in store.query("SELECT action FROM audit WHERE actor = 'ada' ORDER BY id")]
    for expected in ("login.success", "study.view", "study.export", "study.review", "study.upload", "job.urgent",
                     "scheduler.pause", "scheduler.resume"):
        assert expected in actions, (expected, actions)
    assert store.query_one("SELECT COUNT(*) FROM quarantine")[0] >= 1  # the damaged file, with its reason
    assert uids  # both analysed studies were listed above


def test_tablet_portrait_and_mammography(site, browser) -> None:
    url, data, uids = site
    with page_in(browser, PORTRAIT, locale="zh-CN") as page:
        page.goto(url + "/login")
        assert page.locator("html").get_attribute("lang") == "zh-Hans"  # Accept-Language is the default
        assert page.locator("h1").inner_text() == "登录"
        login(page, url, "cleo", PASSWORD)
        screenshot(page, "10-worklist-zh-800x1280")
        assert page.evaluate("document.documentElement.scrollWidth") <= 800  # nothing runs off the tablet
        page.goto(url + f"/studies/{uids['CT']}")
        _wait_slice(page)
        screenshot(page, "11-study-ct-800x1280")
        mg_state = Store(data).query_one("SELECT state, error FROM jobs WHERE pipeline = 'mammo'")
        assert mg_state["state"] == "done", tuple(mg_state)
        # mammography: the four plain views, each with its own heatmap laid exactly over it, toggled
        page.goto(url + f"/studies/{uids['MG']}")
        views, heat = page.locator("img.mg"), page.locator("img.mg-heat")
        assert views.count() == 4 and heat.count() == 4
        page.wait_for_function("() => [...document.querySelectorAll('img.mg, img.mg-heat')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        for k in range(4):
            view, overlay = views.nth(k), heat.nth(k)
            assert "/slices/" in view.get_attribute("src")
            ratio = view.evaluate("i => i.naturalWidth / i.naturalHeight")
            assert abs(overlay.evaluate("i => i.naturalWidth / i.naturalHeight") - ratio) < 0.01 * ratio
            assert view.bounding_box() == overlay.bounding_box()  # the same place and size on the screen
        coloured = sum(heat.nth(k).evaluate(OVERLAY_PIXELS) for k in range(4))
        assert coloured > 100  # the malignant phantom's views have somewhere the model found suspicious
        screenshot(page, "12-study-mg-heatmap-800x1280")
        page.uncheck(".toggle-heatmap")
        page.wait_for_function("() => [...document.querySelectorAll('img.mg-heat')].every(i => !i.offsetParent)")
        assert all(views.nth(k).is_visible() for k in range(4))
        screenshot(page, "12b-study-mg-plain-800x1280")
        page.check(".toggle-heatmap")
        page.wait_for_function("() => [...document.querySelectorAll('img.mg-heat')].every(i => i.offsetParent)")
        # a clinician may not pause the scheduler: no button, and the server refuses it anyway
        page.goto(url + "/system")
        assert page.locator("#pause").count() == 0
        screenshot(page, "13-system-800x1280")


@pytest.mark.parametrize("viewport", [LANDSCAPE, PORTRAIT], ids=["1280x800", "800x1280"])
def test_keyboard_only(site, browser, viewport: dict) -> None:
    """Tab to the study link, open it, scroll slices with the keyboard: no mouse needed."""
    url, _, _ = site
    with page_in(browser, viewport) as page:
        login(page, url, "tess", PASSWORD)
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.classList.contains('name')"):
                break
        else:
            raise AssertionError("no study link reachable with Tab")
        page.keyboard.press("Enter")
        page.wait_for_url("**/studies/**")
        if page.locator(".viewer").count():
            start = _wait_slice(page)
            page.locator(".stage").focus()
            page.keyboard.press("ArrowUp")
            _wait_slice(page, start - 1)
