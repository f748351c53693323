"""J and F on hand-made masks, and an end-to-end evaluation of a small real clip."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from xmem_label.model import InputError, load_engine, read_label_mask
from xmem_label.model.evaluation import (
    add_eval_command,
    boundary_accuracy,
    evaluate_dataset,
    format_report,
    region_similarity,
)

from .conftest import DATA

VOS = DATA / "vos"


def square(top: int, left: int, size: int, shape=(100, 100)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_region_similarity_is_iou():
    assert region_similarity(square(0, 0, 10), square(0, 5, 10)) == pytest.approx(50 / 150)
    assert region_similarity(square(0, 0, 10), square(0, 0, 10)) == 1
    empty = np.zeros((100, 100), dtype=bool)
    assert region_similarity(empty, empty) == 1
    assert region_similarity(square(0, 0, 10), empty) == 0


def test_boundary_accuracy_tolerance_and_partial_match():
    # 100x100: tolerance ceil(0.008 * 141.4) = 2 px
    assert boundary_accuracy(square(10, 10, 40), square(10, 10, 40)) == 1
    assert boundary_accuracy(square(10, 10, 40), square(11, 12, 40)) == 1  # within 2 px
    assert boundary_accuracy(square(10, 10, 40), square(10, 13, 40)) < 1
    # 40x40 squares 20 px apart horizontally: of the 156 boundary pixels of each, those
    # within 2 px of the other's boundary are 22 on the top row, 22 on the bottom row and
    # 2 + 2 at the ends of one side, so precision = recall = F = 48 / 156.
    assert boundary_accuracy(square(10, 10, 40), square(10, 30, 40)) == pytest.approx(48 / 156)
    assert boundary_accuracy(square(0, 0, 10), square(60, 60, 10)) == 0
    empty = np.zeros((100, 100), dtype=bool)
    assert boundary_accuracy(empty, empty) == 1
    assert boundary_accuracy(square(0, 0, 10), empty) == 0


def test_real_clip_end_to_end(tmp_path):
    report = evaluate_dataset(VOS, load_engine("flow"), out_dir=tmp_path)
    assert [clip.name for clip in report.clips] == ["chair"]
    clip = report.clips[0]
    assert clip.frames == 8 and clip.objects == 1
    assert 0.6 < clip.j <= 1 and 0.6 < clip.f <= 1
    assert report.frames_per_second > 0
    written = sorted((tmp_path / "chair").glob("*.png"))
    assert len(written) == 8
    # the keyframe's mask is returned exactly as given
    truth = read_label_mask(VOS / "chair" / "masks" / "frame_000000.png")
    np.testing.assert_array_equal(read_label_mask(written[0]), truth)
    table = format_report(report)
    assert "chair" in table and "mean" in table


def test_copying_the_keyframe_scores_lower_than_the_truth(tmp_path):
    """A wrong prediction must cost: scoring the ground truth against itself gives 1."""
    truth_dir = VOS / "chair" / "masks"
    masks = [read_label_mask(path) == 1 for path in sorted(truth_dir.glob("*.png"))]
    copied = [region_similarity(masks[0], mask) for mask in masks[1:]]
    assert all(region_similarity(mask, mask) == 1 for mask in masks)
    assert min(copied) < 1


def test_eval_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_eval_command(parser.add_subparsers())
    args = parser.parse_args(
        [
            "eval",
            "--data",
            str(VOS),
            "--engine",
            "flow",
            "--out",
            str(tmp_path),
            "--sequences",
            "chair",
        ]
    )
    assert args.run(args) == 0
    output = capsys.readouterr().out
    assert "chair" in output and "J&F" in output
    assert len(list((tmp_path / "chair").glob("*.png"))) == 8


def test_missing_dataset_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no clips"):
        evaluate_dataset(tmp_path, load_engine("flow"))
    with pytest.raises(InputError, match="no clip"):
        evaluate_dataset(VOS, load_engine("flow"), sequences=["nope"])
