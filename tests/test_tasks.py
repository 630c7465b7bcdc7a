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
