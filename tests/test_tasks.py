import pytest

from leuko.tasks import TASKS, get_task


def test_three_tasks_with_the_classes_of_the_shared_manifest():
    assert get_task("all_binary").class_ids == ["ALL", "normal"]
    assert get_task("ball_subtype").class_ids == ["Benign", "Early", "Pre", "Pro"]
    assert get_task("wbc_type").class_ids == ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def test_binary_task_has_a_positive_class():
    task = get_task("all_binary")
    assert task.is_binary and task.positive_class == "ALL" and task.positive_index == 0


def test_every_class_has_display_name_and_meaning():
    for task in TASKS.values():
        for info in task.classes:
            assert info.display and len(info.meaning) > 10


def test_unknown_task_and_class_are_named_in_the_error():
    with pytest.raises(KeyError, match="known tasks"):
        get_task("aml")
    with pytest.raises(KeyError, match="basophil"):
        get_task("wbc_type").index_of("blast")


def test_differential_counts_each_class_in_order_and_the_blast_share():
    ball = get_task("ball_subtype")
    labels = ["Pre", "Benign", "Pre", "Pro"]
    assert [(r["class"], r["cells"], r["percent"]) for r in ball.differential(labels)] == [
        ("Benign (hematogone)", 1, 25.0), ("Early Pre-B", 0, 0.0), ("Pre-B", 2, 50.0), ("Pro-B", 1, 25.0)]
    assert ball.differential_text(labels) == "Benign (hematogone) 1 (25.0%), Pre-B 2 (50.0%), Pro-B 1 (25.0%)"
    assert ball.blast_percent(labels) == 75.0
    assert ball.blast_percent([]) is None and get_task("wbc_type").blast_percent(["lymphocyte"]) is None
    assert all(r["percent"] == 0.0 for r in ball.differential([]))
