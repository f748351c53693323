"""XMem memory: the read, consolidation and pruning, including where the reference crashes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xmem_label.model import Session, load_engine
from xmem_label.model.xmem.memory import (
    MemoryManager,
    MemoryStore,
    similarity,
    similarity_terms,
    sparse_read,
    top_k_softmax,
)
from xmem_label.model.xmem.settings import xmem_settings

KEY_DIM, VALUE_DIM = 8, 6


def random_frame(generator, objects: int, h: int = 2, w: int = 3):
    """key, shrinkage, selection, value of one memorised frame (small dims)."""
    key = torch.randn(1, KEY_DIM, h, w, generator=generator)
    shrinkage = torch.rand(1, 1, h, w, generator=generator) + 1
    selection = torch.rand(1, KEY_DIM, h, w, generator=generator)
    value = torch.randn(1, objects, VALUE_DIM, h, w, generator=generator)
    return key, shrinkage, selection, value


def manager(**overrides) -> MemoryManager:
    settings = dict(
        top_k=30,
        enable_long_term=True,
        count_long_term_usage=True,
        min_mid_term_frames=2,
        max_mid_term_frames=4,
        num_prototypes=4,
        max_long_term_elements=10,
    )
    settings.update(overrides)
    return MemoryManager(**settings)


def test_similarity_is_the_anisotropic_l2_distance():
    generator = torch.Generator().manual_seed(0)
    keys, query = torch.randn(KEY_DIM, 5, generator=generator), torch.randn(KEY_DIM, 3)
    shrinkage, selection = torch.rand(5) + 1, torch.rand(KEY_DIM, 3)
    scores = similarity(similarity_terms(keys, shrinkage), query, selection)
    direct = -(
        (selection.t().unsqueeze(1) * (keys.t().unsqueeze(0) - query.t().unsqueeze(1)) ** 2).sum(-1)
        * shrinkage
        / math.sqrt(KEY_DIM)
    )
    assert torch.allclose(scores, direct, atol=1e-5)


def test_sparse_read_equals_the_dense_top_k_read():
    generator = torch.Generator().manual_seed(1)
    scores, values = torch.randn(7, 40, generator=generator), torch.randn(40, 5)
    weights, indices = top_k_softmax(scores, 30)
    dense = torch.zeros(7, 40).scatter_(1, indices, weights)
    assert torch.allclose(sparse_read(weights, indices, values), dense @ values, atol=1e-6)


def test_top_k_uses_every_element_when_memory_is_smaller_and_never_gives_nan():
    weights, indices = top_k_softmax(torch.full((2, 16), -1e4), 30)  # exp underflows unshifted
    assert weights.shape == (2, 16) and torch.isfinite(weights).all()
    assert torch.allclose(weights.sum(1), torch.ones(2))


def test_read_of_a_tiny_frame_with_fewer_elements_than_top_k():
    memory, generator = manager(), torch.Generator().manual_seed(2)
    key, shrinkage, selection, value = random_frame(generator, objects=2)  # 6 elements
    memory.write(key, shrinkage, selection, value)
    readout = memory.read(key, selection)
    assert readout.shape == (1, 2, VALUE_DIM, 2, 3) and torch.isfinite(readout).all()


def test_pruning_exactly_at_the_threshold_removes_nothing():
    store = MemoryStore(count_usage=True)
    store.add(
        torch.randn(KEY_DIM, 6),
        torch.ones(6),
        None,
        [(torch.ones(6, dtype=bool), torch.randn(6, VALUE_DIM))],
    )
    store.prune(6)
    assert store.size == 6


def test_pruning_without_usage_counts_drops_the_oldest():
    store = MemoryStore(count_usage=False)
    keys = torch.arange(6.0).repeat(KEY_DIM, 1)
    store.add(keys, torch.ones(6), None, [(torch.ones(6, dtype=bool), torch.randn(6, 2))])
    store.prune(4)
    assert store.keys[0].tolist() == [2.0, 3.0, 4.0, 5.0]


def test_pruning_keeps_values_aligned_with_keys_across_object_groups():
    """Group 1 (an object added later) has values for the last 3 of 6 elements only."""
    store = MemoryStore(count_usage=True)
    keys = torch.arange(6.0).repeat(KEY_DIM, 1)
    group0 = torch.arange(6.0).unsqueeze(1)
    valid1 = torch.tensor([False, False, False, True, True, True])
    group1 = torch.tensor([[3.0], [4.0], [5.0]])
    store.add(keys, torch.ones(6), None, [(torch.ones(6, dtype=bool), group0), (valid1, group1)])
    store.record_reads(torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.6]))
    store.prune(4)  # the two least used (elements 1 and 3) go
    assert store.keys[0].tolist() == [0.0, 2.0, 4.0, 5.0]
    assert store.groups[0].values[:, 0].tolist() == [0.0, 2.0, 4.0, 5.0]
    assert store.groups[1].valid.tolist() == [False, False, True, True]
    assert store.groups[1].values[:, 0].tolist() == [4.0, 5.0]


def test_consolidation_and_pruning_with_an_object_added_mid_video():
    """The official implementation raises NotImplementedError here."""
    memory, generator = manager(count_long_term_usage=False), torch.Generator().manual_seed(3)
    for frame in range(30):
        objects = 1 if frame < 3 else 2
        key, shrinkage, selection, value = random_frame(generator, objects)
        if frame:
            readout = memory.read(key, selection)
            assert readout.shape[1] == memory.num_objects and torch.isfinite(readout).all()
        memory.write(key, shrinkage, selection, value)
        assert memory.working.size < 4 * 6
        assert memory.long_term.size <= 10
    assert memory.group_sizes == [1, 1]
    for store in (memory.working, memory.long_term):
        for group in store.groups:
            assert group.values.shape[0] == int(group.valid.sum())


def test_count_usage_follows_the_official_rule_when_the_length_is_known():
    settings = xmem_settings()  # 5..10 working frames, 128 prototypes, 10,000 elements
    assert settings.count_usage(None) is True
    assert settings.count_usage(300) is False  # 300 / 5 * 128 = 7,680 < 10,000
    assert settings.count_usage(400) is True  # 10,240 >= 10,000
    assert xmem_settings(enable_long_term_count_usage=False).count_usage(None) is False


@pytest.fixture(scope="module")
def aggressive_memory_engine(xmem_weights_path):
    """Consolidation every few frames and pruning with usage counting off (each pass has its
    own memory, so the directions share one loaded engine)."""
    return load_engine(
        "xmem",
        weights=xmem_weights_path,
        size=-1,
        device="cpu",
        mem_every=1,
        min_mid_term_frames=2,
        max_mid_term_frames=4,
        num_prototypes=20,
        max_long_term_elements=40,
        enable_long_term_count_usage=False,
    )


@pytest.mark.parametrize("direction", ["forward", "both"])
def test_engine_on_tiny_frames_with_aggressive_memory(aggressive_memory_engine, direction):
    """64x64 frames (16 memory elements each, fewer than top_k), an object added mid-video,
    consolidation every few frames and pruning with usage counting off: runs, finite."""
    engine = aggressive_memory_engine
    generator = np.random.default_rng(0)
    frames = [generator.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(14)]
    first, second = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    first[10:30, 10:30], second[35:60, 30:60] = 1, 2
    with Session(engine, frames) as session:
        session.add_mask(0, first)
        session.add_mask(5, second)
        results = session.run(direction=direction, with_probs=True)
    assert len(results) == 14
    assert all(np.isfinite(r.probs).all() for r in results)
    assert results[5].objects[2].keyframe
    assert (results[13].probs.sum(0) > 0.99).all()
