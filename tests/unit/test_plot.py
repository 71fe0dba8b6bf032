"""scripts/plot.py: one PNG from one or more run directories."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plot_script():
    spec = importlib.util.spec_from_file_location("plot_script", REPO / "scripts" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(directory: Path, lag: int, *, config: bool = True, evals: bool = True, partial: bool = False) -> Path:
    directory.mkdir(parents=True)
    rows = []
    for step in range(1, 6):
        row = {"step": step, "reward/mean": 0.1 * step, "staleness/lag_mean": lag / 2, "staleness/lag_max": lag,
               "perf/consumed_tokens_per_s": 100.0 + step, "rollout/tokens_per_s": 150.0,
               "time/step_s": 2.0, "time/rollout_wait_s": 0.5, "time/train_s": 1.2, "time/weight_sync_s": 0.3}
        if partial:  # an older run that logged less: missing keys are skipped
            for key in ("rollout/tokens_per_s", "time/weight_sync_s", "staleness/lag_mean"):
                row.pop(key)
        rows.append(row)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "rew')
    if evals:
        (directory / "evals.json").write_text(json.dumps([{"step": 0, "eval/reward": 0.2, "samples": []},
                                                          {"step": 5, "eval/reward": 0.6}]))
    if config:
        (directory / "config.yaml").write_text(f"task:\n  name: arithmetic\nstaleness:\n  max_staleness: {lag}\n")
    return directory


def test_two_runs_one_png(plot_script, tmp_path):
    a = fake_run(tmp_path / "sync", lag=0)
    b = fake_run(tmp_path / "async", lag=4, config=False, evals=False, partial=True)
    assert plot_script.main([str(a), str(b)]) == 0
    png = a / "plots.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_and_explicit_out(plot_script, tmp_path):
    a = fake_run(tmp_path / "r1", lag=2)
    b = fake_run(tmp_path / "sweep" / "0", lag=2)  # same max_staleness: the directory tells them apart
    c = fake_run(tmp_path / "plain", lag=1, config=False)
    runs = [plot_script.load_run(d) for d in (a, b, c)]
    plot_script._disambiguate(runs)
    assert [r["label"] for r in runs] == ["max_staleness=2 (r1)", "max_staleness=2 (0)", "plain"]
    assert runs[0]["evals"] == [(0, 0.2), (5, 0.6)] and len(runs[0]["rows"]) == 5  # half-written line skipped
    out = tmp_path / "figs" / "cmp.png"
    assert plot_script.main([str(a), str(b), str(c), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_directory_without_metrics_is_an_error(plot_script, tmp_path, caplog):
    good = fake_run(tmp_path / "good", lag=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot_script.main([str(good), str(empty)]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"error: {empty} has no metrics.jsonl; pass a run's output_dir"]
    assert not (good / "plots.png").exists()
