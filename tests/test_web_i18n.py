"""Languages: every string of the UI is in the gettext catalogues, French and Simplified Chinese are complete
and compiled, the browser's language is the default, the user's choice wins, dates follow the locale.

Why: a string added in English only shows up untranslated on a French or Chinese clinic's screens; this
test extracts the strings from the sources the way `pybabel extract` does and compares.
"""

from __future__ import annotations

import gettext
import re
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir, extract_from_file
from babel.messages.pofile import read_po

from edgescreen.appliance import RESEARCH_USE_BANNER, accounts
from edgescreen.appliance.config.site import SiteConfig
from edgescreen.appliance.context import AppContext
from edgescreen.appliance.store import Store
from edgescreen.appliance.web import LANGUAGES, TRANSLATIONS, create_app
from edgescreen.appliance.web.catalogue import extract_constants

WEB = Path(__file__).resolve().parent.parent / "appliance" / "web"
KEYWORDS = {"_": None, "gettext": None, "ngettext": (1, 2), "lazy_gettext": None}


def _source_ids() -> set:
    """What `pybabel extract -F appliance/web/babel.cfg` finds: the UI's strings and the translated constants."""
    method_map = [("**.py", "python"), ("templates/**.html", "jinja2")]
    ids = set()
    for _filename, _lineno, message, _comments, _context in extract_from_dir(str(WEB), method_map,
                                                                            keywords=KEYWORDS):
        ids.add(message if isinstance(message, str) else tuple(message))
    for _lineno, message, _comments, _context in extract_from_file(extract_constants, str(WEB.parent / "__init__.py")):
        ids.add(message)
    return ids


def test_the_research_banner_is_extracted_from_its_one_constant() -> None:
    assert RESEARCH_USE_BANNER in _source_ids()  # so an edit of the constant shows up as an untranslated string
    assert "[constants: appliance/__init__.py]" in (WEB / "babel.cfg").read_text()


@pytest.mark.parametrize("lang", ["fr", "zh"])
def test_catalogue_is_complete_and_compiled(lang: str) -> None:
    po_path = TRANSLATIONS / lang / "LC_MESSAGES" / "messages.po"
    with open(po_path, "rb") as fh:
        catalogue = read_po(fh)
    translated = {m.id if isinstance(m.id, str) else tuple(m.id): m for m in catalogue if m.id}
    missing = _source_ids() - set(translated)
    assert not missing, f"{lang}: strings not in the catalogue (pybabel extract/update): {sorted(map(str, missing))[:10]}"
    empty = [m.id for m in translated.values() if not (all(m.string) if isinstance(m.string, tuple) else m.string)]
    assert not empty, f"{lang}: untranslated: {empty[:10]}"
    fuzzy = [m.id for m in translated.values() if m.fuzzy]
    assert not fuzzy, f"{lang}: fuzzy: {fuzzy[:10]}"
    # the compiled catalogue the app loads says the same as the .po
    with open(po_path.with_suffix(".mo"), "rb") as fh:
        mo = gettext.GNUTranslations(fh)
    for msg in translated.values():
        if isinstance(msg.id, str):
            assert mo.gettext(msg.id) == msg.string, (lang, msg.id)
        # placeholders survive translation
        src = msg.id if isinstance(msg.id, str) else msg.id[0]
        dst = msg.string if isinstance(msg.string, str) else msg.string[0]
        assert set(re.findall(r"%\(\w+\)[sd]", src)) == set(re.findall(r"%\(\w+\)[sd]", dst)), (lang, src)


@pytest.fixture
def client(data_dir: Path):
    store = Store(data_dir)
    accounts.create_user(store, "amare", "admin", "a long secret 1", actor="t")
    app = create_app(AppContext(config=SiteConfig(), data_dir=data_dir))
    return app.test_client()


def _login(client, lang_header: str = "en") -> None:
    html = client.get("/login", headers={"Accept-Language": lang_header}).get_data(as_text=True)
    token = re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)
    client.post("/login", data={"username": "amare", "password": "a long secret 1", "csrf_token": token},
                headers={"Accept-Language": lang_header})


def test_accept_language_is_the_default_and_the_users_choice_wins(client) -> None:
    assert "Se connecter" in client.get("/login", headers={"Accept-Language": "fr-CA,fr;q=0.9"}).get_data(as_text=True)
    page = client.get("/login", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.5"}).get_data(as_text=True)
    assert "登录" in page and 'lang="zh-Hans"' in page
    assert "Log in" in client.get("/login", headers={"Accept-Language": "am-ET"}).get_data(as_text=True)
    _login(client, "fr")
    assert "Liste de travail" in client.get("/worklist", headers={"Accept-Language": "fr"}).get_data(as_text=True)
    html = client.get("/worklist").get_data(as_text=True)
    token = re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)
    client.post("/account/language", data={"lang": "zh", "csrf_token": token, "next": "/worklist"})
    page = client.get("/system", headers={"Accept-Language": "fr"}).get_data(as_text=True)
    assert "系统" in page and "扫描仪" in page  # the stored choice beats the browser's language


def test_every_page_carries_the_banner_in_its_language_and_in_english(client) -> None:
    """The English constant is the source and always shown; French and Chinese staff read it in their language
    too. The translations keep every part of it: research only, not clinical, phantoms and mini-MIAS, and that
    results must not guide diagnosis or treatment."""
    must_say = {"fr": ("RECHERCHE", "CLINIQUE", "fantômes synthétiques", "mini-MIAS", "diagnostic", "traitement"),
                "zh": ("仅供研究", "临床", "合成体模", "mini-MIAS", "诊断", "治疗")}
    _login(client)
    for lang, words in must_say.items():
        html = client.get("/worklist").get_data(as_text=True)
        token = re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)
        client.post("/account/language", data={"lang": lang, "csrf_token": token, "next": "/worklist"})
        for path in ("/worklist", "/system", "/account", "/audit", "/quarantine"):
            html = client.get(path).get_data(as_text=True)
            banner = re.search(r'<div class="banner"[^>]*id="research-banner">(.*?)</div>', html, re.S).group(1)
            assert RESEARCH_USE_BANNER in banner, (lang, path)
            local = re.search(r'<span class="banner-local">(.*?)</span>', banner, re.S).group(1)
            assert all(word in local for word in words), (lang, path, local)
    english = client.application.test_client().get("/login", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert RESEARCH_USE_BANNER in english and 'class="banner-local"' not in english


def test_dates_and_numbers_follow_the_locale(data_dir: Path, client) -> None:
    from edgescreen.appliance.store.instances import IncomingInstance, store_instance

    store_instance(Store(data_dir), IncomingInstance("9.1.1", "1.2.840.10008.5.1.4.1.1.2", "9.1", "9.1.9",
                                                     study={"patient_name": "Wang^XiaoMing=王^小明",
                                                            "study_date": "20240315"},
                                                     series={"modality": "CT"}), b"x")
    _login(client)
    for lang, expected in (("en", "Mar 15, 2024"), ("fr", "15 mars 2024"), ("zh", "2024年3月15日")):
        html = client.get("/studies/9.1", headers={"Accept-Language": lang}).get_data(as_text=True)
        assert expected in html, lang
        assert "Wang, XiaoMing (王小明)" in html
    assert set(LANGUAGES) == {"en", "fr", "zh"}
