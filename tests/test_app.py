from streamlit.testing.v1 import AppTest

from leuko.modelstore import ModelStore
from leuko.paths import REPO_ROOT
from leuko.store import CaseStore


def _home(leuko_home):
    return AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60)


def test_home_page_renders_disclaimer_runtime_database_and_models(leuko_home):
    app = _home(leuko_home).run()
    assert not app.exception
    assert "Leuko" in app.title[0].value
    text = " ".join(m.value for m in app.markdown)
    assert "not a diagnosis" in text and "Models run on" in text and "through OpenVINO" in text
    assert "Case log: SQLite database, 0 case(s)" in text
    assert (leuko_home / "leuko.db").is_file()


def test_sign_in_uses_the_case_log_accounts(leuko_home):
    store = CaseStore(home=leuko_home)
    store.create_user("rita", "reviewer-pass", "reviewer")
    store.close()
    app = _home(leuko_home).run()
    app.sidebar.text_input[0].input("rita")
    app.sidebar.text_input[1].input("wrong-password")
    app.sidebar.button[0].click().run()
    assert "wrong password" in app.sidebar.error[0].value
    app.sidebar.text_input[1].input("reviewer-pass")
    app.sidebar.button[0].click().run()
    assert any("Signed in as **rita** (reviewer)" in m.value for m in app.sidebar.markdown)


def test_models_page_lists_installed_models(leuko_home):
    app = AppTest.from_file(str(REPO_ROOT / "pages" / "4_Models.py"), default_timeout=60).run()
    assert not app.exception and app.title[0].value == "Models"
    cards = ModelStore().cards()
    assert cards and [e.label.removesuffix(" (default)") for e in app.expander] == [c.id for c in cards]


def test_the_review_threshold_is_labelled_above_the_probability_bars_not_on_them():
    """The label sat at the line's top and was clipped at the chart's edge (and, moved
    inside, covered the top bar); it now ends at the line, above the plotting area."""
    from leuko.tasks import get_task
    from leuko.ui.charts import probability_bars

    figure = probability_bars(get_task("all_binary"), {"ALL": 0.976, "normal": 0.024}, 0.956)
    (label,) = [a for a in figure.layout.annotations if a.text == "review below"]
    assert (label.x, label.yref, label.y, label.xanchor, label.yanchor) == (0.956, "paper", 1.0, "right", "bottom")
