"""The `threads` engine option: refused when bad before anything loads, and applied to the
engine's library (torch for XMem, OpenCV for flow; both per-process settings) when it loads."""

import cv2
import pytest
import torch

from xmem_label.model import InputError, load_engine


@pytest.fixture
def one_thread_each():
    """Both libraries on one thread for the test, and the process's settings back after it."""
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv2_threads)


def test_xmem_sets_torchs_threads_when_it_loads(xmem_weights_path, one_thread_each):
    # bf16: the same loading without exact mode's Winograd preparation (a second of the test)
    load_engine("xmem", weights=xmem_weights_path, device="cpu", precision="bf16", threads=2)
    assert torch.get_num_threads() == 2


def test_flow_sets_opencvs_threads_when_it_loads(one_thread_each):
    load_engine("flow", threads=2)
    assert cv2.getNumThreads() == 2


def test_without_threads_the_process_setting_stands(xmem_weights_path, one_thread_each):
    load_engine("xmem", weights=xmem_weights_path, device="cpu", precision="bf16")
    load_engine("flow")
    assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)


@pytest.mark.parametrize("engine", ["xmem", "flow"])
@pytest.mark.parametrize("threads", [0, -2, 1.5, True, "2"])
def test_a_bad_thread_count_is_refused_before_loading(engine, threads, one_thread_each):
    # XMem without weights on this machine: the option is refused before they are looked for
    with pytest.raises(InputError, match="threads takes a whole number of 1 or more"):
        load_engine(engine, threads=threads)
    assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)
