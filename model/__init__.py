"""xmem-label's propagation engine: keyframe masks in, a mask for every frame out.

    from xmem_label.model import Session, load_engine

    session = Session(load_engine("xmem"), "clip.mp4")   # or "flow": no weights needed
    session.add_mask(0, label_mask)                      # (H, W) uint8, 0 = background
    for result in session.propagate():
        result.labels, result.objects[1].confidence

This package knows nothing of Label Studio or FiftyOne; `xmem_label.backend` and
`xmem_label.plugin` translate their formats to and from these types.
"""

from .engine import Engine, Tracker, load_engine, pick_device
from .errors import InputError, WeightsError, XMemLabelError
from .frames import FrameSource, open_frames
from .masks import read_label_mask, write_label_mask
from .results import FrameResult, ObjectResult
from .session import PropagationCancelled, Session

__all__ = [
    "Engine",
    "FrameResult",
    "FrameSource",
    "InputError",
    "ObjectResult",
    "PropagationCancelled",
    "Session",
    "Tracker",
    "WeightsError",
    "XMemLabelError",
    "load_engine",
    "open_frames",
    "pick_device",
    "read_label_mask",
    "write_label_mask",
]
