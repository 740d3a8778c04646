"""bench: issue 21's deliver-over-bare ratios are the median of the interleaved pairs' ratios (fixed inputs)."""

from __future__ import annotations

from bench import run
from bench.delivery import Runs, pair_ratios


def test_each_pair_is_one_run_of_ours_over_the_run_beside_it() -> None:
    assert pair_ratios([100.0, 90.0, 120.0], [100.0, 100.0, 100.0]) == [1.0, 0.9, 1.2]
    assert pair_ratios([1.0], [0.0]) == []  # a failed run is no pair
    nan = float("nan")
    assert pair_ratios([nan, 2.0, 3.0], [1.0, 1.0, 2.0]) == [2.0, 1.5]  # ... and the others keep their partners


def test_a_run_that_sent_nothing_keeps_its_place() -> None:
    runs = Runs(rates=[0.0, 4000.0], app_cpu_share=[0.5, 0.8])
    assert runs.cpu_per_message[0] != runs.cpu_per_message[0] and runs.cpu_per_message[1] == 0.0002


def test_cpu_per_message_is_the_cpu_share_over_the_rate() -> None:
    runs = Runs(rates=[5000.0, 4000.0], app_cpu_share=[0.5, 0.8])
    assert runs.cpu_per_message == [0.0001, 0.0002]


def test_the_table_judges_cpu_by_1_15_and_rate_by_0_90_on_the_medians() -> None:
    ours = Runs(rates=[900.0, 1000.0, 800.0], app_cpu_share=[0.99, 1.0, 0.96])  # 1.1, 1.0, 1.2 ms a message
    bare = Runs(rates=[1000.0, 1000.0, 1000.0], app_cpu_share=[1.0, 1.0, 1.0])  # 1.0 ms each
    table = run.Table()
    run.add_ratio_rows(table, 40, ours, bare)
    rows = {figure.split(",")[1].strip(): (value, target, met) for figure, value, target, met in table.rows[1:]}
    assert rows["CPU per message"] == ("1.10", "≤ 1.15", "yes")  # ratios 1.10, 1.00, 1.20
    assert rows["rate"] == ("0.90", "≥ 0.90", "yes")  # ratios 0.90, 1.00, 0.80
    worse = Runs(rates=[800.0, 800.0, 800.0], app_cpu_share=[1.0, 1.0, 1.0])  # 1.25 ms, rate 0.80
    table = run.Table()
    run.add_ratio_rows(table, 0, worse, bare)
    assert [met for *_, met in table.rows[1:]] == ["**no**", "**no**"]
