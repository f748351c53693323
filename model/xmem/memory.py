"""XMem's memory: working memory, long-term memory and the top-k read over both.

A memory element is one cell of the 1/16 feature grid of a memorised frame: a key (Ck), a
shrinkage (how sharply it matches), optionally a selection (needed to consolidate it later),
usage statistics, and one value (Cv) per object of every object group that existed when it was
written. Objects introduced on the same frame form a group; later groups have values only for
elements written after they appeared, so each group keeps a validity mask over the elements
(a CPU bool tensor: bookkeeping that never waits for the device).

Values are stored element-major, (elements, objects x Cv), so a read is one sparse (pixels x
elements, top_k non-zeros per row) by dense product and a consolidation one dense product.

Differences from the official implementation, all where it crashes or cannot proceed:
reads use k = min(top_k, elements); top-k softmax subtracts the maximum (no overflow/NaN);
pruning at exactly the threshold removes nothing; pruning works with several object groups;
without usage counting, pruning removes the oldest long-term elements first; consolidation
chooses min(num_prototypes, candidates) prototypes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

LIFE_START = 1e-7  # a new element's "life" before its first read (usage = use / life)


def similarity_terms(keys: Tensor, shrinkage: Tensor) -> Tensor:
    """Memory side of the anisotropic L2 similarity, (2 Ck + 1, N), for `similarity`.

    keys (Ck, N), shrinkage (N,). With query key q and selection e, the similarity
    -shrinkage_i / sqrt(Ck) * sum_c e_c (k_ci - q_c)^2 expands into one matrix product:
    [-e, 2 q e, -sum_c e q^2] . [k^2, k, 1] scaled by shrinkage_i / sqrt(Ck).
    """
    scale = (shrinkage / math.sqrt(keys.shape[0])).unsqueeze(0)
    return torch.cat([keys.square() * scale, keys * scale, scale], dim=0)


def similarity(memory_terms: Tensor, query_key: Tensor, query_selection: Tensor) -> Tensor:
    """(P, N) similarity of P query positions to N memory elements.

    memory_terms from `similarity_terms`; query_key and query_selection (Ck, P).
    """
    weighted = query_key * query_selection
    query_terms = torch.cat(
        [-query_selection, 2 * weighted, -(weighted * query_key).sum(0, keepdim=True)], dim=0
    )
    return query_terms.t() @ memory_terms


def top_k_softmax(scores: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Softmax over the `top_k` best scores of each row: (weights, column indices), (P, k)."""
    values, indices = torch.topk(scores, k=min(top_k, scores.shape[1]), dim=1)
    return torch.softmax(values, dim=1), indices


def sparse_read(weights: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """(P, D) = sum over each row's k (weight x values[index]); values (N, D).

    A CSR matrix with exactly k entries per row: the product touches only k rows of `values`
    per query position instead of all N (about 400x less work than a dense read at 854x480).
    """
    rows, k = weights.shape
    row_starts = torch.arange(0, rows * k + 1, k, device=weights.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only this product
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(
            row_starts,
            indices.reshape(-1),
            weights.reshape(-1),
            size=(rows, values.shape[0]),
            check_invariants=False,
        )
    return torch.sparse.mm(matrix, values)


@dataclass
class ObjectGroup:
    """Values of the objects introduced together, for the elements written since."""

    valid: Tensor  # (N,) bool on CPU: element i has values for this group
    values: Tensor  # (valid.sum(), objects x Cv) on the device

    def keep(self, kept: Tensor) -> None:
        """Keep the elements where `kept` (N,) bool (CPU) is true."""
        self.values = self.values[kept[self.valid].to(self.values.device)]
        self.valid = self.valid[kept]


class MemoryStore:
    """An ordered set of memory elements (working or long-term memory)."""

    def __init__(self, *, count_usage: bool):
        self.count_usage = count_usage
        self.keys: Tensor | None = None  # (Ck, N)
        self.shrinkage: Tensor | None = None  # (N,)
        self.selection: Tensor | None = None  # (Ck, N), only where consolidation needs it
        self.use_count: Tensor | None = None  # (N,)
        self.life_count: Tensor | None = None  # (N,)
        self.groups: list[ObjectGroup] = []

    @property
    def size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    def usage(self) -> Tensor:
        """Average attention each element received per read since it was written."""
        assert self.use_count is not None and self.life_count is not None  # a non-empty store
        return self.use_count / self.life_count

    def add(
        self,
        keys: Tensor,
        shrinkage: Tensor,
        selection: Tensor | None,
        group_values: list[tuple[Tensor, Tensor] | None],
    ) -> None:
        """Append elements. group_values[g] is (valid (n,) bool CPU, values) or None when the
        new elements carry no values of group g; a list longer than `groups` opens groups."""
        count = keys.shape[1]
        old_size = self.size
        zeros = torch.zeros(count, device=keys.device)
        if self.keys is None:
            self.keys, self.shrinkage, self.selection = keys, shrinkage, selection
            self.use_count, self.life_count = zeros, zeros + LIFE_START
        else:
            # a store with elements has every tensor (selection where its writes carry one)
            assert self.shrinkage is not None and self.use_count is not None
            assert self.life_count is not None
            self.keys = torch.cat([self.keys, keys], dim=1)
            self.shrinkage = torch.cat([self.shrinkage, shrinkage])
            if selection is not None:
                assert self.selection is not None
                self.selection = torch.cat([self.selection, selection], dim=1)
            self.use_count = torch.cat([self.use_count, zeros])
            self.life_count = torch.cat([self.life_count, zeros + LIFE_START])
        for index, entry in enumerate(group_values):
            if index == len(self.groups):
                empty = keys.new_zeros((0, 0 if entry is None else entry[1].shape[1]))
                self.groups.append(ObjectGroup(torch.zeros(old_size, dtype=torch.bool), empty))
            group = self.groups[index]
            valid = torch.zeros(count, dtype=torch.bool) if entry is None else entry[0]
            group.valid = torch.cat([group.valid, valid])
            if entry is not None:
                group.values = (
                    entry[1] if group.values.shape[0] == 0 else torch.cat([group.values, entry[1]])
                )
        for group in self.groups[len(group_values) :]:
            group.valid = torch.cat([group.valid, torch.zeros(count, dtype=torch.bool)])

    def record_reads(self, usage: Tensor) -> None:
        """Add one read's attention per element (N,), when this store counts usage."""
        if self.count_usage and self.size:
            assert self.use_count is not None and self.life_count is not None
            self.use_count += usage
            self.life_count += 1

    def keep(self, kept: Tensor) -> None:
        """Keep the elements where `kept` (N,) bool (CPU) is true; drop the others."""
        assert self.keys is not None and self.shrinkage is not None  # a non-empty store
        assert self.use_count is not None and self.life_count is not None
        on_device = kept.to(self.keys.device)
        self.keys = self.keys[:, on_device]
        self.shrinkage = self.shrinkage[on_device]
        if self.selection is not None:
            self.selection = self.selection[:, on_device]
        self.use_count = self.use_count[on_device]
        self.life_count = self.life_count[on_device]
        for group in self.groups:
            group.keep(kept)

    def prune(self, max_size: int) -> None:
        """Shrink to at most `max_size` elements, dropping the least used ones.

        As the official rule: the (size - max_size) smallest usages are found and every element
        whose usage is not above the largest of them goes (ties may remove a few more).
        Without usage counts the oldest elements go.
        """
        excess = self.size - max_size
        if excess <= 0:
            return
        if self.count_usage:
            usage = self.usage()
            threshold = torch.topk(usage, k=excess, largest=False, sorted=True).values[-1]
            kept = (usage > threshold).cpu()
        else:
            kept = torch.arange(self.size) >= excess
        self.keep(kept)


class MemoryManager:
    """Working and long-term memory of one propagation pass, with XMem's consolidation."""

    def __init__(
        self,
        *,
        top_k: int,
        enable_long_term: bool,
        count_long_term_usage: bool,
        min_mid_term_frames: int,
        max_mid_term_frames: int,
        num_prototypes: int,
        max_long_term_elements: int,
    ):
        self.top_k = top_k
        self.enable_long_term = enable_long_term
        self.min_mid_term_frames = min_mid_term_frames
        self.max_mid_term_frames = max_mid_term_frames
        self.num_prototypes = num_prototypes
        self.max_long_term_elements = max_long_term_elements
        self.working = MemoryStore(count_usage=enable_long_term)
        self.long_term = MemoryStore(count_usage=count_long_term_usage)
        self.group_sizes: list[int] = []  # objects per group, in object order
        self.frame_elements = 0  # elements per memorised frame (h x w of the key grid)
        self._terms: Tensor | None = None  # similarity_terms of [long-term, working]

    @property
    def num_objects(self) -> int:
        return sum(self.group_sizes)

    def read(self, key: Tensor, selection: Tensor) -> Tensor:
        """Memory readout for a query frame: key and selection (1, Ck, h, w) ->
        (1, objects, Cv, h, w). Records usage of the elements read."""
        h, w = key.shape[-2:]
        query_key, query_selection = key[0].flatten(1), selection[0].flatten(1)
        if self._terms is None:
            stores = [s for s in (self.long_term, self.working) if s.size]
            self._terms = similarity_terms(
                torch.cat([keys for s in stores if (keys := s.keys) is not None], dim=1),
                torch.cat([shrink for s in stores if (shrink := s.shrinkage) is not None]),
            )
        scores = similarity(self._terms, query_key, query_selection)
        readouts = []
        for index, size in enumerate(self.group_sizes):
            valid = self._valid(index)
            if valid is None:
                group_scores = scores
            else:
                columns = valid.nonzero().squeeze(1).to(scores.device)
                group_scores = scores.index_select(1, columns)
            weights, indices = top_k_softmax(group_scores, self.top_k)
            if index == 0:
                self._record_usage(weights, indices, scores.shape[1])
            parts = [
                s.groups[index].values
                for s in (self.long_term, self.working)
                if index < len(s.groups) and s.groups[index].values.shape[0]
            ]
            # One part (no long-term memory yet) is read where it is: no copy of every value.
            values = parts[0] if len(parts) == 1 else torch.cat(parts)
            readout = sparse_read(weights, indices, values)  # (h w, objects x Cv)
            readouts.append(readout.t().reshape(size, -1, h, w))
        return torch.cat(readouts).unsqueeze(0)

    def write(
        self, key: Tensor, shrinkage: Tensor, selection: Tensor | None, value: Tensor
    ) -> None:
        """Memorise a frame: key (1, Ck, h, w), shrinkage (1, 1, h, w), selection (1, Ck, h, w)
        or None, value (1, objects, Cv, h, w). Objects beyond the known ones open a group.
        Consolidates into long-term memory when working memory is full."""
        objects = value.shape[1]
        if objects > self.num_objects:
            self.group_sizes.append(objects - self.num_objects)
        self.frame_elements = key.shape[-2] * key.shape[-1]
        count = self.frame_elements
        group_values: list[tuple[Tensor, Tensor] | None] = []
        start = 0
        for size in self.group_sizes:
            group_value = value[0, start : start + size].flatten(2)  # (size, Cv, n)
            start += size
            group_values.append(
                (torch.ones(count, dtype=torch.bool), group_value.permute(2, 0, 1).flatten(1))
            )
        if self.enable_long_term:
            assert selection is not None  # the tracker asks for it when long-term memory is on
        self.working.add(
            key[0].flatten(1),
            shrinkage.flatten(),
            selection[0].flatten(1) if selection is not None and self.enable_long_term else None,
            group_values,
        )
        self._terms = None
        if (
            self.enable_long_term
            and self.working.size >= self.max_mid_term_frames * self.frame_elements
        ):
            self.long_term.prune(self.max_long_term_elements - self.num_prototypes)
            self._consolidate()

    def _valid(self, group: int) -> Tensor | None:
        """Validity of group `group` over [long-term, working] elements; None when all valid."""
        parts = [
            s.groups[group].valid
            if group < len(s.groups)
            else torch.zeros(s.size, dtype=torch.bool)
            for s in (self.long_term, self.working)
        ]
        valid = torch.cat(parts)
        return None if bool(valid.all()) else valid

    def _record_usage(self, weights: Tensor, indices: Tensor, total: int) -> None:
        """Per element, the attention it received from all query positions (group 0 covers
        every element, so its read decides usage, as in the official implementation)."""
        usage = weights.new_zeros(total).index_add_(0, indices.flatten(), weights.flatten())
        long_size = self.long_term.size
        self.working.record_reads(usage[long_size:])
        self.long_term.record_reads(usage[:long_size])

    def _consolidate(self) -> None:
        """Turn the older working-memory elements into prototypes in long-term memory.

        The first memorised frame and the newest (min_mid_term_frames - 1) frames stay in
        working memory; the prototypes are the most used candidates, each given the
        attention-weighted key shrinkage and values of all candidates (full softmax).
        """
        first = self.frame_elements
        end = self.working.size - self.min_mid_term_frames * self.frame_elements + first
        work = self.working
        assert work.keys is not None and work.shrinkage is not None  # full working memory
        assert work.selection is not None  # written with long-term memory on
        candidates = torch.zeros(work.size, dtype=torch.bool)
        candidates[first:end] = True
        keys, shrinkage = work.keys[:, first:end], work.shrinkage[first:end]
        selection = work.selection[:, first:end]
        count = min(self.num_prototypes, end - first)
        chosen = torch.topk(work.usage()[first:end], k=count, sorted=True).indices
        scores = similarity(
            similarity_terms(keys, shrinkage), keys[:, chosen], selection[:, chosen]
        )  # (prototypes, candidates)
        chosen_cpu = chosen.cpu()
        group_values: list[tuple[Tensor, Tensor] | None] = []
        prototype_shrinkage = None
        for group in work.groups:
            candidate_valid = group.valid[first:end]
            prototype_valid = candidate_valid[chosen_cpu]
            if not bool(prototype_valid.any()):
                group_values.append(None)
                continue
            candidate_rows = candidates[group.valid].to(group.values.device)
            columns = candidate_valid.nonzero().squeeze(1).to(scores.device)
            rows = prototype_valid.nonzero().squeeze(1).to(scores.device)
            affinity = torch.softmax(scores[rows][:, columns], dim=1)
            group_values.append((prototype_valid, affinity @ group.values[candidate_rows]))
            if prototype_shrinkage is None:  # group 0: every candidate, every prototype
                prototype_shrinkage = affinity @ shrinkage
        work.keep(~candidates)
        assert prototype_shrinkage is not None  # group 0 holds every element
        self.long_term.add(keys[:, chosen], prototype_shrinkage, None, group_values)
        self._terms = None
