"""xmem-label's FiftyOne plugin: keyframe masks -> masks on every frame of video samples.

FiftyOne loads this folder from FIFTYONE_PLUGINS_DIR under a name of its own, not as
`xmem_label.plugin`, so the operators are imported through the installed package (absolute
import): both ways of loading then share one set of modules.
"""

from xmem_label.plugin.operators import (
    PropagateCorrections,
    PropagateMasks,
    PropagationStatus,
    ReviewFrames,
)
from xmem_label.plugin.suggestions import SuggestFrames


def register(plugin) -> None:
    """Called by FiftyOne's plugin loader."""
    plugin.register(PropagateMasks)
    plugin.register(PropagateCorrections)
    plugin.register(SuggestFrames)
    plugin.register(ReviewFrames)
    plugin.register(PropagationStatus)
