import time

import torch

from leuko.bench import BenchRow, format_rows, model_flops, timed, timed_pair
from leuko.nets import build_model


def test_rows_read_as_speed_ups_over_the_reference():
    rows = [BenchRow("predict", "ms", 10.0, 30.0, 5.0), BenchRow("batch", "images/s", 200.0, 50.0)]
    assert rows[0].speedup == 3.0 and rows[1].speedup == 4.0
    table = format_rows(rows)
    assert "3.00x" in table and "4.00x" in table
    assert table.splitlines()[-1].startswith("summary: 2 comparisons")


def test_timing_and_flop_counting():
    assert 2.0 <= timed(lambda: time.sleep(0.002), repeats=3, warmup=1) < 200.0
    calls: list[str] = []
    fast, slow = timed_pair(lambda: calls.append("ours"), lambda: (calls.append("reference"), time.sleep(0.005)),
                            repeats=4, warmup=1)
    assert calls == ["ours", "reference"] * 5 and slow >= 5.0 > fast
    flops = model_flops(build_model("efficientnet_lite0", 2).eval(), 224, torch.device("cpu"))
    assert 0.7e9 < flops < 1.0e9


def test_store_benchmark_measures_save_and_history_query():
    from leuko.bench import store_benchmarks
    rows = store_benchmarks(cases=200, repeats=3)
    assert [r.unit for r in rows] == ["ms", "ms"] and all(r.value > 0 for r in rows)
    assert "200 cases" in rows[1].name
