"""Every page through Streamlit's AppTest, against the real core, models and a real SQLite case log."""

import json
import re
import shutil
import time

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from leuko.analysis import png_bytes
from leuko.modelstore import ModelStore
from leuko.paths import REPO_ROOT
from leuko.segment import classical_segment
from leuko.store import CaseFilter, CaseStore, ImageEntry, PredictionEntry
from tests.conftest import write_class_folder
from tests.test_segment import stained_cell

PAGES = REPO_ROOT / "pages"


def page(name: str, user: dict | None = None) -> AppTest:
    app = AppTest.from_file(str(PAGES / name), default_timeout=120)
    if user:
        app.session_state["user"] = {**user, "since": time.time()}
    return app.run()


@pytest.fixture
def examples(tmp_path, monkeypatch):
    root = write_class_folder(tmp_path / "examples", ["ALL", "normal"], 2, size=160)
    (root / "ALL" / "broken.png").write_bytes(b"not an image at all")
    monkeypatch.setenv("LEUKO_EXAMPLES", str(root))
    return root


@pytest.fixture
def accounts(leuko_home):
    store = CaseStore(home=leuko_home)
    store.create_user("rita", "reviewer-pass", "reviewer")
    store.create_user("ann", "analyst-pass", "analyst")
    store.close()
    return {"rita": {"name": "rita", "role": "reviewer"}, "ann": {"name": "ann", "role": "analyst"}}


def as_read(markdown: str) -> str:
    """Markdown as a reader sees it: backslash escapes (:func:`leuko.ui.plain`) removed."""
    return re.sub(r"\\(.)", r"\1", markdown)


def analyse_examples(app: AppTest, titles: list[str]) -> AppTest:
    app.multiselect[0].set_value(titles).run()
    app.button[0].click().run()
    return app


def test_every_page_renders_without_signing_in(leuko_home, examples):
    for name in ("1_Analyze.py", "2_Cases.py", "3_Train.py", "4_Models.py"):
        app = page(name)
        assert not app.exception, name
    assert "Sign in" in page("2_Cases.py").info[0].value


def test_analyze_gives_a_prediction_and_saves_a_case(leuko_home, examples, accounts):
    app = page("1_Analyze.py", accounts["ann"])
    options = app.multiselect[0].options
    assert "examples: 000.png (ALL)" in options and "examples: 000.png (normal)" in options
    analyse_examples(app, ["examples: 000.png (ALL)", "examples: broken.png (ALL)", "examples: 000.png (normal)"])
    assert not app.exception
    headings = [m.value for m in app.markdown if m.value.startswith("### ")]
    assert len(headings) == 2 and all("%" in h and "badge" in h for h in headings)
    assert any("broken.png" in as_read(e.value) and "Not analysed" in e.value for e in app.error)
    assert "not a diagnosis" in app.info[0].value
    app.text_input[-1].set_value("CASE-T1")
    next(b for b in app.button if b.label == "Save as case").click().run()
    assert "Saved as case CASE-T1" in as_read(app.success[0].value)
    store = CaseStore(home=leuko_home)
    rows, total = store.list_cases()
    assert total == 1 and rows[0]["reference"] == "CASE-T1" and rows[0]["images"] == 2
    store.close()


def test_an_internal_error_on_one_image_keeps_the_others_and_names_it(leuko_home, examples, monkeypatch):
    from leuko.analysis import Analyzer

    analyze = Analyzer.analyze

    def fails_on_the_second(self, source, name="image", *args, **kwargs):
        if name == "001.png":
            raise RuntimeError("segmenter broke")
        return analyze(self, source, name, *args, **kwargs)

    monkeypatch.setattr(Analyzer, "analyze", fails_on_the_second)
    app = analyse_examples(page("1_Analyze.py"), ["examples: 000.png (ALL)", "examples: 001.png (ALL)"])
    assert not app.exception
    assert len([m for m in app.markdown if m.value.startswith("### ")]) == 1
    assert any("001.png" in as_read(e.value) and "internal error" in e.value and "segmenter broke" in e.value
               for e in app.error)


def test_impossible_cbc_value_blocks_analysis_with_its_field_named(leuko_home, examples):
    app = page("1_Analyze.py")
    next(n for n in app.number_input if n.label == "Hemoglobin").set_value(80.0).run()
    assert any("Hemoglobin" in e.value and "impossible" in e.value for e in app.error)
    assert app.button[0].disabled


def test_saving_needs_a_signed_in_user(leuko_home, examples):
    app = analyse_examples(page("1_Analyze.py"), ["examples: 000.png (ALL)"])
    next(b for b in app.button if b.label == "Save as case").click().run()
    assert any("Sign in" in w.value for w in app.warning) and app.session_state["analyses"]
    assert CaseStore(home=leuko_home).list_cases()[1] == 0


def _saved_case(leuko_home, examples, accounts) -> None:
    app = page("1_Analyze.py", accounts["ann"])
    analyse_examples(app, ["examples: 000.png (ALL)", "examples: 001.png (normal)"])
    next(b for b in app.button if b.label == "Save as case").click().run()


def test_a_reviewer_confirms_each_image_and_signs_off(leuko_home, examples, accounts):
    _saved_case(leuko_home, examples, accounts)
    analyst = page("2_Cases.py", accounts["ann"])
    next(b for b in analyst.button if b.label == "Sign off this case").click().run()
    assert "may not sign off" in analyst.error[0].value
    app = page("2_Cases.py", accounts["rita"])
    assert not app.exception and app.dataframe
    assert [e.label for e in app.expander].count("Morphometrics") == 2
    for index in range(2):
        final = [s for s in app.selectbox if s.label.startswith("Final label")][index]
        if final.value is None:
            final.set_value("normal")
        [b for b in app.button if b.label == "Confirm or reclassify"][index].click().run()
        assert not app.error and all("not seen images like these" in w.value for w in app.warning)
    next(b for b in app.button if b.label == "Sign off this case").click().run()
    assert not app.error and "signed" in app.subheader[0].value
    store = CaseStore(home=leuko_home)
    actions = [e.action for e in store.audit_trail(1)]
    assert actions.count("review") == 2 and actions[-1] == "sign_off"
    store.close()


def test_a_flagged_result_is_not_confirmed_until_a_person_chooses_its_label(leuko_home, accounts):
    store = CaseStore(home=leuko_home)
    flagged = PredictionEntry("m", "0" * 64, "all_binary", {"ALL": 0.55, "normal": 0.45}, "ALL", 0.55, True, 5.0)
    store.save_case("FLAGGED", "ann", [ImageEntry(png_bytes(stained_cell()), "unsure.png", 160, 160, "crop", flagged),
                                      ImageEntry(png_bytes(stained_cell()), "empty_field.png", 900, 700, "field")])
    store.close()
    app = page("2_Cases.py", accounts["rita"])
    final = next(s for s in app.selectbox if s.label.startswith("Final label"))
    assert final.value is None and "flagged" in final.label
    next(b for b in app.button if b.label == "Confirm or reclassify").click().run()
    assert "still need a label chosen by you" in app.warning[0].value
    next(b for b in app.button if b.label == "Confirm: no leukocyte in this field").click().run()
    next(b for b in app.button if b.label == "Sign off this case").click().run()
    assert "unsure.png" in as_read(app.error[0].value) and "empty_field.png" not in as_read(app.error[0].value)
    next(s for s in app.selectbox if s.label.startswith("Final label")).set_value("normal")
    next(b for b in app.button if b.label == "Confirm or reclassify").click().run()
    next(b for b in app.button if b.label == "Sign off this case").click().run()
    assert not app.error and "signed" in app.subheader[0].value


def test_history_filters_by_reviewer_and_by_reviewed_label(leuko_home, accounts):
    store = CaseStore(home=leuko_home)
    for reference, reviewer, final in (("BY-RITA", "rita", "normal"), ("BY-BOB", "bob", "ALL")):
        prediction = PredictionEntry("m", "0" * 64, "all_binary", {"ALL": 0.9, "normal": 0.1}, "ALL", 0.9, False, 5.0)
        case_id = store.save_case(reference, "ann", [ImageEntry(png_bytes(stained_cell()), "cell.png", 160, 160,
                                                                "crop", prediction)])
        store.review(store.case(case_id).images[0].id, reviewer, final)
    store.close()
    app = page("2_Cases.py", accounts["rita"])
    next(t for t in app.text_input if t.label == "Reviewed by").set_value("rita").run()
    assert list(app.dataframe[0].value["reference"]) == ["BY-RITA"]
    next(t for t in app.text_input if t.label == "Reviewed by").set_value("").run()
    next(s for s in app.selectbox if s.label == "Reviewed as").set_value("ALL").run()
    assert list(app.dataframe[0].value["reference"]) == ["BY-BOB"]
    next(s for s in app.selectbox if s.label == "Reviewed as").set_value("any").run()
    next(t for t in app.text_input if t.label == "Reference contains").set_value("  BY-RITA ").run()
    assert list(app.dataframe[0].value["reference"]) == ["BY-RITA"]


def test_a_case_shows_its_blood_count_with_units_and_flags(leuko_home, accounts):
    store = CaseStore(home=leuko_home)
    prediction = PredictionEntry("m", "0" * 64, "all_binary", {"ALL": 0.9, "normal": 0.1}, "ALL", 0.9, False, 5.0)
    store.save_case("CBC", "ann", [ImageEntry(png_bytes(stained_cell()), "cell.png", 160, 160, "crop", prediction)],
                    clinical={"wbc": 45.0, "hemoglobin": 7.5})
    store.close()
    app = page("2_Cases.py", accounts["rita"])
    assert not app.exception
    table = app.dataframe[1].value
    assert list(table.columns) == ["WBC (x10^9/L)", "Hemoglobin (g/dL)"] and table.iloc[0, 0] == 45.0
    assert any("CBC: leukocytosis" in w.value for w in app.warning)


def test_a_blood_count_saved_before_todays_checks_is_shown_not_crashed(leuko_home, accounts):
    store = CaseStore(home=leuko_home)
    prediction = PredictionEntry("m", "0" * 64, "all_binary", {"ALL": 0.9, "normal": 0.1}, "ALL", 0.9, False, 5.0)
    store.save_case("OLD", "ann", [ImageEntry(png_bytes(stained_cell()), "cell.png", 160, 160, "crop", prediction)],
                    clinical={"wbc": 0.005})
    store.close()
    app = page("2_Cases.py", accounts["rita"])
    assert not app.exception and any("could not be checked" in w.value for w in app.warning)
    assert any(b.label == "Sign off this case" for b in app.button)


def test_sign_off_is_refused_while_an_image_is_unreviewed(leuko_home, examples, accounts):
    _saved_case(leuko_home, examples, accounts)
    app = page("2_Cases.py", accounts["rita"])
    next(b for b in app.button if b.label == "Sign off this case").click().run()
    assert "still need review" in app.error[0].value


def test_models_page_shows_cards_and_changes_the_default(leuko_home, accounts):
    app = page("4_Models.py", accounts["rita"])
    assert not app.exception and len(app.expander) == len(ModelStore().cards())
    chooser = next((s for s in app.selectbox if s.label == "Default for all_binary"), None)
    assert chooser is not None
    other = next(o for o in chooser.options if o != chooser.value)
    chooser.set_value(other).run()
    assert ModelStore().default_id("all_binary") == other and "is now the default" in app.success[0].value


def test_an_open_models_page_follows_a_default_changed_elsewhere_instead_of_writing_it_back(leuko_home, accounts):
    app = page("4_Models.py", accounts["rita"])
    store = ModelStore()
    first = store.default_id("wbc_type")
    elsewhere = next(c.id for c in store.cards("wbc_type") if c.id != first)
    store.set_default("wbc_type", elsewhere)
    app.run()
    assert not app.success and store.default_id("wbc_type") == elsewhere
    assert next(s for s in app.selectbox if s.label == "Default for wbc_type").value == elsewhere
    next(s for s in app.selectbox if s.label == "Default for all_binary").set_value(
        next(c.id for c in store.cards("all_binary") if c.id != store.default_id("all_binary"))).run()
    assert store.default_id("wbc_type") == elsewhere


def test_a_model_whose_weights_fail_their_check_cannot_become_the_default(leuko_home, accounts):
    store = ModelStore()
    shipped = REPO_ROOT / "models"
    card = json.loads((shipped / "wbc_type-seed004_squeezenet.json").read_text())
    card["id"] = "wbc_type-tampered"
    store.folders[0].mkdir(parents=True, exist_ok=True)
    (store.folders[0] / "wbc_type-tampered.json").write_text(json.dumps(card))
    weights = bytearray((shipped / "wbc_type-seed004_squeezenet.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (store.folders[0] / "wbc_type-tampered.safetensors").write_bytes(bytes(weights))
    before = store.default_id("wbc_type")
    app = page("4_Models.py", accounts["rita"])
    next(s for s in app.selectbox if s.label == "Default for wbc_type").set_value("wbc_type-tampered").run()
    assert "was not made the default" in app.error[0].value and "does not match its card" in app.error[0].value
    assert store.default_id("wbc_type") == before
    assert next(s for s in app.selectbox if s.label == "Default for wbc_type").value == before


def test_train_page_starts_a_background_job(leuko_home, accounts, binary_folder):
    app = page("3_Train.py", accounts["rita"])
    app.radio[0].set_value("Folder of class sub-folders").run()
    app.text_input[-2].set_value(str(binary_folder)).run()
    assert not app.exception
    number = {n.label: n for n in app.number_input}
    number["Epochs"].set_value(1)
    number["Input size (pixels)"].set_value(32)
    next(c for c in app.checkbox if c.label.startswith("Stain normalisation")).check()
    next(c for c in app.checkbox if c.label.startswith("Hue and grey-scale")).check()
    next(s for s in app.slider if s.label.startswith("Zoom augmentation")).set_value((0.7, 2.8))
    next(s for s in app.slider if s.label.startswith("Background replacement")).set_value(0.5)
    next(s for s in app.slider if s.label.startswith("Network's view")).set_value(1.4)
    next(b for b in app.button if b.label == "Start training").click().run()
    assert "Training started" in app.success[0].value
    from leuko.jobs import list_jobs

    job = list_jobs()[0]
    assert job.config.folder == str(binary_folder) and job.config.epochs == 1
    assert job.config.preprocess.stain_normalization == "reinhard" and job.config.zoom_range == (0.7, 2.8)
    assert job.config.background_replacement == 0.5 and job.config.colour_invariance
    assert job.config.view_zoom == 1.4
    job.kill()


def test_the_analyze_page_loads_another_segmenter_when_the_segmentation_default_changes(leuko_home):
    from leuko.analysis import AnalysisSettings
    from leuko.ui.analyze import analyzer_for, load_analyzer

    analyzer_for.clear()
    try:
        settings = AnalysisSettings("all_binary", None, "cpu", "learned")
        first = load_analyzer(settings)
        assert load_analyzer(settings) is first
        assert first.segment.__self__.card.id == "segmentation-unet_lite0"

        store = ModelStore()
        card = json.loads((REPO_ROOT / "models" / "segmentation-unet_lite0.json").read_text())
        card["id"] = "segmentation-retrained"
        store.folders[0].mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / "models" / "segmentation-unet_lite0.safetensors",
                    store.folders[0] / "segmentation-retrained.safetensors")
        (store.folders[0] / "segmentation-retrained.json").write_text(json.dumps(card))
        store.set_default("segmentation", "segmentation-retrained")

        second = load_analyzer(settings)
        assert second is not first
        assert second.segment.__self__.card.id == "segmentation-retrained"
        assert load_analyzer(AnalysisSettings("all_binary", None, "cpu", "classical")).segment \
            is classical_segment
    finally:
        analyzer_for.clear()


def test_a_damaged_or_unknown_task_card_is_listed_as_refused_not_crashing_the_pages(leuko_home, accounts):
    folder = ModelStore().folders[0]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "garbage.json").write_text("{not json")
    card = json.loads((REPO_ROOT / "models" / "wbc_type-lite0.json").read_text())
    (folder / "aml-model.json").write_text(json.dumps({**card, "id": "aml-model", "task": "aml_subtype"}))
    for name in ("0_Home.py", "4_Models.py"):
        app = page(name, accounts["rita"])
        assert not app.exception, name
        table = app.dataframe[0].value
        refused = dict(zip(table["model"], table["integrity"]))
        assert refused["garbage.json"].startswith("refused: the card cannot be read")
        assert refused["aml-model.json"] == "refused: the card is for an unknown task 'aml_subtype'"


def _save_button(app: AppTest):
    return next((b for b in app.button if b.label == "Save as case"), None)


def test_results_of_earlier_inputs_are_not_saved_after_the_blood_count_task_or_images_change(leuko_home, examples,
                                                                                            accounts):
    app = analyse_examples(page("1_Analyze.py", accounts["ann"]), ["examples: 000.png (ALL)"])
    assert _save_button(app) is not None
    def number(label: str):
        return next(n for n in app.number_input if n.label == label)

    number("WBC").set_value(15.0).run()
    assert _save_button(app) is None and any("changed since these results" in w.value for w in app.warning)
    number("WBC").set_value(None).run()
    assert _save_button(app) is not None
    number("Hemoglobin").set_value(80.0).run()
    assert _save_button(app) is None
    number("Hemoglobin").set_value(None).run()
    app.multiselect[0].set_value(["examples: 000.png (normal)"]).run()
    assert _save_button(app) is None
    app.button[0].click().run()
    assert _save_button(app) is not None
    app.sidebar.selectbox[0].set_value("wbc_type").run()
    assert _save_button(app) is None


def test_signing_out_forgets_the_analyses_and_automatic_references_do_not_collide(leuko_home, examples, accounts):
    from leuko.ui.analyze import new_reference

    app = analyse_examples(page("1_Analyze.py", accounts["ann"]), ["examples: 000.png (ALL)"])
    assert app.session_state["analyses"]
    next(b for b in app.sidebar.button if b.label == "Sign out").click().run()
    assert "analyses" not in app.session_state and _save_button(app) is None
    app = analyse_examples(page("1_Analyze.py", accounts["ann"]), ["examples: 000.png (ALL)"])
    app.session_state["user"] = {**accounts["ann"], "since": time.time() - 9 * 3600}
    app.run()
    assert "analyses" not in app.session_state and _save_button(app) is None
    first, second = new_reference(), new_reference()
    assert first != second and re.fullmatch(r"CASE-\d{8}-\d{6}-[0-9a-f]{6}", first)


def _predicted_as(monkeypatch, labels: list[str], **fields) -> None:
    """The page's model answers each image in turn with the next of ``labels`` at 97%, with
    the shift fields given (as the Predictor fills them for a model with shift statistics);
    other models (the cell-type check) answer as they do."""
    from dataclasses import replace
    from itertools import cycle

    import numpy as np

    from leuko.predict import Predictor

    answers = cycle(labels)
    original = Predictor.to_predictions

    def answered(self, probabilities, *args, **kwargs):
        predictions = original(self, probabilities, *args, **kwargs)
        if not set(labels) <= set(self.classes):
            return predictions  # the wbc_type model checking whether the question applies
        chosen = [np.where(np.array(self.classes) == next(answers), 0.97, 0.03 / (len(self.classes) - 1))
                  for _ in predictions]
        given = {"needs_review": False, "shift_score": None, "unfamiliar": False, "not_applicable": None, **fields}
        return [replace(p, probabilities=c, **given) for p, c in zip(predictions, chosen)]

    monkeypatch.setattr(Predictor, "to_predictions", answered)


def _number(app: AppTest, label: str):
    return next(n for n in app.number_input if n.label == label)


def test_the_analyze_page_says_when_images_are_unlike_the_training_images(leuko_home, examples, accounts,
                                                                          monkeypatch):
    _predicted_as(monkeypatch, ["normal"], needs_review=True, shift_score=7.25, unfamiliar=True)
    app = analyse_examples(page("1_Analyze.py", accounts["ann"]), ["examples: 000.png (ALL)"])
    assert not app.exception
    line = ("**This image looks unlike the model's training images**: this model has not seen images like these: "
            "check every result (highest shift score 7.25).")
    assert [w.value for w in app.warning].count(line) == 2  # for the case and for the image
    table = app.dataframe[0].value
    assert table["shift score"].tolist() == ["7.25 unfamiliar"] and table["review"].tolist() == ["needs review"]
    assert table["warnings"][0].startswith("unfamiliar")
    heading = next(m.value for m in app.markdown if m.value.startswith("### "))
    assert "Needs review" in heading and "Confident" not in heading
    next(b for b in app.button if b.label == "Save as case").click().run()
    store = CaseStore(home=leuko_home)
    saved = store.case(1).images[0].predictions[0]
    assert (saved.shift_score, saved.unfamiliar, saved.needs_review) == (7.25, True, True)
    store.close()


def test_the_analyze_page_says_when_the_question_does_not_apply(leuko_home, examples, monkeypatch):
    _predicted_as(monkeypatch, ["ALL"], needs_review=True, shift_score=1.5, not_applicable="not a lymphocyte")
    app = analyse_examples(page("1_Analyze.py"), ["examples: 000.png (ALL)"])
    line = "**This cell: not a lymphocyte**: this question does not apply, so the answer is not a result."
    assert [w.value for w in app.warning].count(line) == 2
    assert not any("unlike the model's training images" in w.value for w in app.warning)
    assert app.dataframe[0].value["shift score"].tolist() == ["1.50"]
    assert "not a lymphocyte: this question does not apply" in app.info[0].value


def test_a_run_shows_the_case_first_with_its_differential_and_collapses_later_images(leuko_home, examples,
                                                                                      accounts, monkeypatch):
    _predicted_as(monkeypatch, ["normal", "normal", "ALL", "normal"])
    app = page("1_Analyze.py", accounts["ann"])
    _number(app, "Peripheral blasts %").set_value(60.0).run()
    analyse_examples(app, ["examples: 000.png (ALL)", "examples: 001.png (ALL)", "examples: 000.png (normal)",
                           "examples: 001.png (normal)"])
    assert not app.exception and app.header[0].value == "Case summary"
    table = app.dataframe[0].value
    assert table["file"].tolist() == ["000.png", "001.png", "000.png", "001.png"] and table["cell"].tolist() == [1] * 4
    assert table["label"].tolist() == ["Normal lymphocyte", "Normal lymphocyte", "ALL blast", "Normal lymphocyte"]
    assert table["shift score"].tolist() == ["not measured"] * 4
    differential = app.dataframe[1].value
    assert differential["cells"].tolist() == [1, 3] and differential["percent"].tolist() == [25.0, 75.0]
    assert [as_read(e.label).split(":")[0] for e in app.expander if "cell(s)" in e.label] == ["001.png"]
    assert len([m for m in app.markdown if m.value.startswith("### ")]) == 4
    summary = next(w.value for w in app.warning if w.value.startswith("4 image(s), 4 white cell(s) counted."))
    assert "Cells read as blasts: 1 of 4 (25.0%)." in summary and "disagree" not in summary
    _number(app, "Peripheral blasts %").set_value(0.0).run()
    app.button[0].click().run()
    summary = next(w.value for w in app.warning if w.value.startswith("4 image(s)"))
    assert "**The blood count and the images disagree**" in summary and "reports no blasts" in summary
    next(b for b in app.button if b.label == "Save as case").click().run()
    store = CaseStore(home=leuko_home)
    assert store.case(1).count_disagrees and store.list_cases(CaseFilter(needs_review=True))[1] == 1
    store.close()


def test_differential_percentages_have_one_decimal_and_heading_and_bars_agree(leuko_home, examples, monkeypatch):
    _predicted_as(monkeypatch, ["normal", "ALL", "normal"])
    app = analyse_examples(page("1_Analyze.py"), ["examples: 000.png (ALL)", "examples: 001.png (ALL)",
                                                  "examples: 000.png (normal)"])
    assert app.dataframe[1].value["percent"].tolist() == [33.3, 66.7]
    headings = [m.value for m in app.markdown if m.value.startswith("### ")]
    bars = [json.loads(chart.proto.spec)["data"][0] for chart in app.get("plotly_chart")
            if json.loads(chart.proto.spec)["data"][0].get("orientation") == "h"
            and "review below" in chart.proto.spec]
    assert len(headings) == len(bars) == 3
    for heading, bar in zip(headings, bars):
        assert bar["text"] == ["3.0%", "97.0%"] or bar["text"] == ["97.0%", "3.0%"]
        assert "— 97.0% " in heading and bar["textposition"] == "outside"


def test_a_field_lists_each_cell_in_the_case_table_and_shows_it_beside_its_attention_map(leuko_home, examples):
    from leuko.bench import sample_field

    Image.fromarray(sample_field(cells=3)).save(examples / "ALL" / "field.png")
    app = analyse_examples(page("1_Analyze.py"), ["examples: field.png (ALL)"])
    assert not app.exception
    table = app.dataframe[0].value
    assert table["file"].tolist() == ["field.png"] * 3 and table["cell"].tolist() == [1, 2, 3]
    thumbnails = [image for element in app.get("image") for image in element.proto.imgs
                  if image.caption.startswith("#")]
    assert [t.caption.split()[0] for t in thumbnails] == ["#1", "#2", "#3"]
    assert all(t.caption.endswith(" review") == (row == "needs review") for t, row in zip(thumbnails, table["review"]))
    measured = next(d.value for d in app.dataframe if "cut by the border" in d.value.columns)
    assert measured["cell"].tolist() == [1, 2, 3] and "Nucleus area (px²)" in measured.columns


def test_the_blood_count_form_labels_every_unit_and_shows_every_error_at_once(leuko_home):
    app = page("1_Analyze.py")
    labels = [n.label for n in app.number_input]
    assert {"Age (years)", "MCV (fL)", "LDH (U/L)", "Peripheral blasts %"} <= set(labels)
    assert len([s for s in app.selectbox if s.label == "Unit"]) == 7
    _number(app, "Hemoglobin").set_value(80.0)
    _number(app, "Age (years)").set_value(130.0)
    _number(app, "MCV (fL)").set_value(5.0).run()
    errors = [e.value for e in app.error]
    assert len(errors) == 3 and [e.split(":")[0] for e in errors] == ["Age", "Hemoglobin", "MCV"]
    assert app.button[0].disabled
    _number(app, "Hemoglobin").set_value(None)
    _number(app, "Age (years)").set_value(None)
    _number(app, "MCV (fL)").set_value(None)
    _number(app, "WBC").set_value(5.0)
    _number(app, "Lymphocytes (absolute)").set_value(4.0)
    _number(app, "Neutrophils (absolute)").set_value(4.0).run()
    assert [e.value.split(":")[0] for e in app.error] == ["Lymphocytes (absolute)"]


def test_user_text_is_shown_as_typed_not_as_markdown(leuko_home, accounts):
    from leuko.ui import plain

    notes = "See ![t](https://example.invalid/track.png) and :red[urgent] $x^2$ **bold** #1 \\ 3-4"
    store = CaseStore(home=leuko_home)
    prediction = PredictionEntry("m", "0" * 64, "all_binary", {"ALL": 0.9, "normal": 0.1}, "ALL", 0.9, False, 5.0)
    store.save_case("REF_[x](y)", "ann", [ImageEntry(png_bytes(stained_cell()), "**x** [a](javascript:z).png", 160, 160,
                                                  "crop", prediction)], notes=notes)
    store.close()
    app = page("2_Cases.py", accounts["rita"])
    shown = [m.value for m in app.markdown] + [h.value for h in app.subheader]
    assert f"Notes: {plain(notes)}" in shown and "Case REF\\_\\[x\\]\\(y\\): new" in shown
    assert any(m.startswith("#### \\*\\*x\\*\\* \\[a\\]\\(javascript\\:z\\)\\.png") for m in shown)
    assert "![" not in " ".join(shown)
    assert plain("Total\n===\n&amp;") == "Total\n\\=\\=\\=\n\\&amp;"


def test_a_single_picked_date_shows_that_days_cases(leuko_home, accounts):
    from datetime import datetime, timedelta, timezone

    store = CaseStore(home=leuko_home)
    prediction = PredictionEntry("m", "0" * 64, "all_binary", {"ALL": 0.9, "normal": 0.1}, "ALL", 0.9, False, 5.0)
    store.save_case("TODAY", "ann", [ImageEntry(png_bytes(stained_cell()), "cell.png", 160, 160, "crop", prediction)])
    store.close()
    today = datetime.now(timezone.utc).date()
    app = page("2_Cases.py", accounts["rita"])
    app.date_input[0].set_value((today - timedelta(days=1),)).run()
    assert any("No case matches" in i.value for i in app.info)
    app.date_input[0].set_value((today,)).run()
    assert list(app.dataframe[0].value["reference"]) == ["TODAY"]


def _field_case(leuko_home, notes: str = "", unfamiliar: bool = False) -> None:
    """A case of one 300x160 field with three cells read as ALL (the second and third are a
    lobe of the first and a platelet), the first measured without a pixel size."""
    from leuko.store import CellEntry

    def found(shift: float) -> PredictionEntry:
        return PredictionEntry("m", "0" * 64, "all_binary", {"ALL": 0.9, "normal": 0.1}, "ALL", 0.9, unfamiliar, 5.0,
                               shift_score=shift, unfamiliar=unfamiliar and shift > 5)

    crop = png_bytes(stained_cell(60, 25, 15))
    cells = [CellEntry((10 + 100 * k, 40, 60, 60), False, crop, {"nucleus_area_px": 700, "nc_ratio": 0.6} if k == 0
                       else None, found(7.25 if k == 0 else 1.5)) for k in range(3)]
    field = ImageEntry(png_bytes(stained_cell(300, 60, 30)[:160]), "field.png", 300, 160, "field", cells=cells)
    store = CaseStore(home=leuko_home)
    store.save_case("FIELD", "ann", [field], notes=notes)
    store.close()


def test_field_cells_marked_duplicate_or_not_a_leukocyte_leave_the_case_differential(leuko_home, accounts):
    _field_case(leuko_home)
    app = page("2_Cases.py", accounts["rita"])
    assert not app.exception
    assert list(app.dataframe[0].value.columns[-3:]) == ["task", "images", "needs_review"]
    assert app.dataframe[0].value["task"][0] == "all_binary"
    assert app.dataframe[1].value["Cells"].tolist() == [3, 0]
    assert "Cells found, numbered (red: flagged by the model)" in app.get("image")[0].proto.imgs[0].caption
    assert "Nucleus area (px²)" in app.dataframe[2].value.columns
    for number, label in ((1, "ALL"), (2, "duplicate"), (3, "not a leukocyte")):
        next(s for s in app.selectbox if s.label == f"Cell #{number}").set_value(label)
    next(b for b in app.button if b.label == "Confirm or reclassify").click().run()
    assert not app.exception and [as_read(s.value) for s in app.success] == ["Review saved: 3 label(s) of field.png."]
    assert app.dataframe[1].value["Cells"].tolist() == [1, 0]
    assert any("left out: 1 reviewed as 'duplicate', 1 reviewed as 'not a leukocyte'" in m.value for m in app.markdown)
    assert any(m.value == "Blasts: 1 of 1 cells (100.0%)." for m in app.markdown)
    next(t for t in app.text_area if t.label == "Impression").input("Blasts present.\nRefer for flow cytometry.")
    next(b for b in app.button if b.label == "Sign off this case").click().run()
    assert not app.error and "signed" in app.subheader[0].value
    assert any(m.value == "Impression: Blasts present\\.  \nRefer for flow cytometry\\." for m in app.markdown)
    store = CaseStore(home=leuko_home)
    case = store.case(1)
    store.close()
    assert sorted(r.final_label for r in case.images[0].reviews) == ["ALL", "duplicate", "not a leukocyte"]
    assert case.sign_off.impression == "Blasts present.\nRefer for flow cytometry."


def test_a_case_with_unfamiliar_images_says_so_with_the_score_and_keeps_the_notes_lines(leuko_home, accounts):
    _field_case(leuko_home, notes="Smear from ward 3.\nPoor staining.", unfamiliar=True)
    app = page("2_Cases.py", accounts["rita"])
    assert not app.exception
    warnings = [w.value for w in app.warning]
    assert ("This model has not seen images like these: check every result (1 of 3 result(s) marked unfamiliar; "
            "highest shift score 7.25).") in warnings
    assert any(w.startswith("This model has not seen images like these") and "1 of 3 cell\\(s\\) unfamiliar" in w
               for w in warnings)
    assert "Notes: Smear from ward 3\\.  \nPoor staining\\." in [m.value for m in app.markdown]
