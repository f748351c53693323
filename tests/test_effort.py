"""The simulated annotator (eval --rounds): rounds, strategies, figures, on the chair clip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xmem_label.model import load_engine
from xmem_label.model.cli import main
from xmem_label.model.effort import curve_area, simulate_clip

CHAIR = Path(__file__).parent / "data" / "vos" / "chair"


@pytest.fixture(scope="module")
def flow():
    return load_engine("flow", preset="ultrafast")


@pytest.mark.parametrize("strategy", ["suggested", "uniform", "random", "worst"])
def test_each_round_adds_one_new_keyframe_and_rescores(flow, strategy):
    effort = simulate_clip(CHAIR, flow, rounds=3, strategy=strategy, compare_scratch=False)
    picked = [score.picked for score in effort.rounds]
    assert picked[0] is None and len(set(picked[1:])) == 3 and 0 not in picked
    assert [score.round for score in effort.rounds] == [0, 1, 2, 3]
    assert all(0 <= score.jf <= 1 for score in effort.rounds)
    # round 0 runs every pass; a correction runs only the passes its frame starts
    assert all(s.network_steps < effort.rounds[0].network_steps + 8 for s in effort.rounds[1:])
    assert effort.ranking_size == 1 and effort.ranking_hits in (0, 1)


def test_uniform_spreads_and_worst_takes_the_lowest_frame(flow):
    uniform = simulate_clip(CHAIR, flow, rounds=2, strategy="uniform", compare_scratch=False)
    assert [s.picked for s in uniform.rounds] == [None, 7, 3]  # farthest from 0, then mid-way
    worst = simulate_clip(CHAIR, flow, rounds=1, strategy="worst", compare_scratch=False)
    baseline = simulate_clip(CHAIR, flow, rounds=0, strategy="worst", compare_scratch=False)
    assert worst.rounds[1].jf >= baseline.rounds[0].jf


def test_random_is_repeatable_with_its_seed(flow):
    runs = [
        [s.picked for s in simulate_clip(CHAIR, flow, rounds=3, strategy="random",
                                          compare_scratch=False, seed=seed).rounds]
        for seed in (1, 1, 2)
    ]  # fmt: skip
    assert runs[0] == runs[1]


def test_curve_area_is_the_mean_of_the_trapezoids():
    assert curve_area([0.5]) == 0.5
    assert curve_area([0.0, 1.0, 1.0]) == pytest.approx(0.75)


def test_eval_rounds_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "effort.json"
    code = main(["eval", "--data", str(CHAIR.parent), "--rounds", "1", "--strategy",
                 "uniform", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "strategy: uniform" in printed.out and "AUC" in printed.out
    assert "round-0 ranking" in printed.out
    figures = json.loads(out.read_text())
    (clip,) = figures["clips"]
    assert clip["name"] == "chair" and len(clip["rounds"]) == 2
    assert clip["rounds"][1]["scratch_seconds"] > 0  # a from-scratch run beside each round


def test_eval_rounds_refuses_out_and_negative_rounds(tmp_path, capsys):
    assert main(["eval", "--data", str(CHAIR.parent), "--rounds", "-1"]) == 2
    assert "--rounds must be 0 or more" in capsys.readouterr().err
    code = main(["eval", "--data", str(CHAIR.parent), "--rounds", "1", "--out", str(tmp_path)])
    assert code == 2 and "use --json" in capsys.readouterr().err
