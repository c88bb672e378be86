"""Error bars over seeds whose values are all equal (three dead nets at 10.70 %): the mean of equal floats can
round past them, and the chart must still draw instead of failing the whole report."""

from capsbench.reports.charts import Panel, Series, panels


def test_equal_seed_values_draw_error_bars_of_zero_length():
    values = [[10.7, 10.7, 10.7], [79.5, 81.0, 80.3]]
    assert sum(values[0]) / 3 != 10.7  # the rounding this guards against
    svg = panels("acc", [Panel([Series("dead", [2.0, 4.0], values)], "depth", "acc", "Accuracy")])
    assert svg.lstrip().startswith("<") and "spread-acc-a0-s0" in svg
