"""`capsbench presets`: the named grids, and one preset's configs (a stratified one stratum by stratum)."""

from capsbench.suite.presets import get_preset

SMOKE_SHALLOW = next(c for c in get_preset("smoke").configs() if c.model.depth == 0)


def test_presets_lists_smoke_quick_paper_and_the_paper_grid_reaches_5_layers(cli):
    listed = cli(["presets"])
    assert listed.code == 0
    out = listed.out
    for name in ("smoke", "quick", "paper"):
        assert name in out
    depths = {c.model.depth for c in get_preset("paper").configs()}
    assert depths == {0, 1, 2, 3, 4, 5}
    smoke = cli(["presets", "--preset", "smoke"])
    assert smoke.code == 0
    assert SMOKE_SHALLOW.id in smoke.out


def test_presets_lists_a_stratified_preset_stratum_by_stratum(cli):
    depth = cli(["presets", "--preset", "depth"])
    assert depth.code == 0
    heads = [line for line in depth.out.splitlines() if line.startswith("# ")]
    names = [st.name for st in get_preset("depth").stratum_list()]
    assert [h[2:].split(":")[0] for h in heads] == names
    assert "pairs [(0.5, 0.5), (0.5, 0.0), (0.0, 0.5)]" in heads[1] and "authors" in heads[3]
    smoke = cli(["presets", "--preset", "smoke"])
    assert smoke.code == 0
    assert not any(line.startswith("# ") for line in smoke.out.splitlines())
