from streamlit.testing.v1 import AppTest

from leuko.paths import REPO_ROOT


def test_home_page_renders_disclaimer_runtime_and_models(leuko_home):
    app = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60).run()
    assert not app.exception
    assert "Leuko" in app.title[0].value
    text = " ".join(m.value for m in app.markdown)
    assert "not a diagnosis" in text
    assert any("Models run on" in m.value for m in app.markdown)


def test_models_page_lists_installed_models(leuko_home):
    app = AppTest.from_file(str(REPO_ROOT / "pages" / "1_Models.py"), default_timeout=60).run()
    assert not app.exception and app.title[0].value == "Models"
