"""A vanished capsule's length (exactly 0) on the depth profile's log axis stays inside the axes."""

import re

from capsbench.reports.charts import LOG_FLOOR, Panel, Series, panels


def _numbers(path_d: str) -> list[tuple[float, float]]:
    vals = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", path_d)]
    return list(zip(vals[0::2], vals[1::2], strict=False))


def test_zero_lengths_are_drawn_at_the_floor_inside_the_axes():
    dead = Series("4 caps layers", [0, 1, 2, 3], [[0.03, 0.031], [2e-6, 3e-6], [0.0, 0.0], [0.0, 1e-30]])
    live = Series("2 caps layers", [0, 1, 2, 3], [[0.9, 0.95], [0.99, 0.98], [0.4, 0.45], [0.2, 0.19]])
    svg = panels("floor", [Panel([live, dead], "layer", "mean length", "t", log_y=True, band=True)])
    axes = re.search(r'<g id="axes-floor-a0">\s*<path d="([^"]+)"', svg).group(1)
    xs, ys = zip(*_numbers(axes), strict=True)
    top, bottom = min(ys), max(ys)
    for i in range(2):
        line = re.search(rf'<g id="data-floor-a0-s{i}">\s*<path d="([^"]+)"', svg).group(1)
        points = _numbers(line)
        assert len(points) == 4
        for _, y in points:
            assert top - 0.5 <= y <= bottom + 0.5, (i, y, top, bottom)
    # The dead series' last two points sit at the same height: the floor, below every live value.
    dead_ys = [
        y for _, y in _numbers(re.search(r'<g id="data-floor-a0-s1">\s*<path d="([^"]+)"', svg).group(1))
    ]
    assert dead_ys[2] == dead_ys[3] and dead_ys[2] >= max(dead_ys[:2])
    assert LOG_FLOOR == 1e-12
