"""Accuracy of the flow engine on a real clip, against the plain DIS-warp baseline."""

from __future__ import annotations

from xmem_label.model import load_engine
from xmem_label.model.baselines import CopyFirstMaskEngine, DisWarpEngine
from xmem_label.model.evaluation import evaluate_dataset

from ..conftest import DATA


def test_flow_beats_the_baselines_on_the_chair_clip():
    """The bundled chair clip (8 real frames, thin legs, a reflection in glass): the flow
    engine must score above warping the mask along DIS flow and above copying it."""
    data = DATA / "vos"
    flow = evaluate_dataset(data, load_engine("flow"), sequences=["chair"])
    dis_warp = evaluate_dataset(data, DisWarpEngine(), sequences=["chair"])
    copied = evaluate_dataset(data, CopyFirstMaskEngine(), sequences=["chair"])
    assert copied.jf < dis_warp.jf < flow.jf, (copied.jf, dis_warp.jf, flow.jf)
    assert flow.j > 0.8 and flow.f > 0.9
