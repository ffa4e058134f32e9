"""scripts/ap_parity.py (issue 17, item 6): its schedule and its table of mean and spread."""

import importlib.util
import json
import types
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ap_parity.py"


def _load():
    spec = importlib.util.spec_from_file_location("ap_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schedule_drops_at_75_and_92_5_percent_and_keeps_overrides():
    ap = _load()
    cfg = ap.config("shapes", 700, ["mask_predictor_init='kaiming'"], seed=2)
    assert (cfg.iters, cfg.milestones, cfg.seed, cfg.checkpoint_period) == (700, (525, 647), 2, 0)
    assert cfg.mask_predictor_init == "kaiming"
    holder = types.SimpleNamespace(param_groups=[{"lr": 1.0}])  # a torch optimizer's shape
    lr = ap.schedule(holder, cfg)  # minimask's own schedule, driving the torch optimizer
    assert lr.factor(0) == cfg.warmup_factor
    assert lr.factor(cfg.warmup_iters) == 1.0
    assert abs(lr.factor(525) - cfg.gamma) < 1e-12 and abs(lr.factor(647) - cfg.gamma ** 2) < 1e-12


def test_table_groups_runs_and_gives_mean_and_range(tmp_path, capsys):
    ap = _load()
    for i, (group, bbox, segm) in enumerate([("a", 0.5, 0.6), ("a", 0.7, 0.8), ("b", 0.1, 0.2)]):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "result.json").write_text(json.dumps(
            {"group": group, "seed": i, "bbox": bbox, "segm": segm, "s_per_iter": 1.0}))
    ap.table(str(tmp_path))
    out = capsys.readouterr().out.splitlines()
    row_a = next(line for line in out if line.startswith("a "))
    assert "0.600 (0.500-0.700)" in row_a and "0.700 (0.600-0.800)" in row_a and " 2 " in row_a
    assert any(line.startswith("b ") and "0.100 (0.100-0.100)" in line for line in out)
