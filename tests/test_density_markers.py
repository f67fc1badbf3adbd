"""The marker height that follows the local nuclear density (``PostProcess.marker_h_dense``)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.morphology import h_maxima

from pipeline.instances import PostProcess, _variable_h_maxima, instances_from_maps, marker_heights

MPP = 0.5
# a small density radius so that the synthetic crowded patch below is dense right up to its edge
RULE = dict(marker_h=0.1, marker_h_dense=0.02, dense_per_mm2=(8000, 14000), density_sigma_um=8.0, min_area_px=0)


def paired_nuclei(centres, radius: int = 4, shape=(120, 200)):
    """Maps of nuclei in touching pairs, as the network predicts them where nuclei touch: each pair
    is one foreground piece whose distance map has two peaks, 1.0 and 0.97, with a shallow saddle
    between them (the lower peak rises 0.045 above it: kept by a marker height of 0.02, not by 0.1).
    Returns ``(fg, dist, pair_ids)``; ``pair_ids`` labels each pair's piece."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    dist = np.zeros(shape)
    pair_ids = np.zeros(shape, np.int32)
    slope = 0.02  # per pixel; the peaks are 2 * (radius - 1) = 6 px apart
    for k, (cy, cx) in enumerate(centres, 1):
        for dx, peak in ((-(radius - 1), 1.0), (radius - 1, 0.97)):
            d = np.hypot(yy - cy, xx - (cx + dx))
            inside = d <= radius
            dist = np.where(inside, np.maximum(dist, peak - slope * d), dist)
            pair_ids[inside] = k
    return (dist > 0).astype(np.float32), dist.astype(np.float32), pair_ids


def count_in(labels, pair_ids, ks) -> int:
    return sum(len(np.unique(labels[(pair_ids == k) & (labels > 0)])) for k in ks)


def crowded_and_sparse():
    crowd = [(10 + 10 * i, 10 + 16 * j) for i in range(6) for j in range(5)]  # one pair per 10 x 16 px: 25,000 /mm^2
    sparse = [(30, 160), (90, 160)]  # two isolated pairs, 60 px apart: ~1,000 /mm^2
    fg, dist, ids = paired_nuclei(crowd + sparse)
    inner = [k for k, (cy, cx) in enumerate(crowd, 1) if 10 < cy < 60 and 10 < cx < 70]  # away from the patch's edge
    return fg, dist, ids, inner, [len(crowd) + 1, len(crowd) + 2]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = {(int(x), int(y)) for x, y in zip(a.ravel(), b.ravel())}
    return np.array_equal(a > 0, b > 0) and len(pairs) == len(np.unique(a)) == len(np.unique(b))


def test_variable_height_maxima_equal_skimage_h_maxima_at_one_height():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    img = ndimage.gaussian_filter(rng.random((64, 80)), 2).astype(np.float32)
    for h in (0.005, 0.02, 0.05):
        assert np.array_equal(_variable_h_maxima(img, np.full(img.shape, h)), h_maxima(img, h).astype(bool))


def test_density_rule_splits_crowded_pairs_and_keeps_sparse_nuclei_whole():
    fg, dist, ids, inner, sparse = crowded_and_sparse()
    fixed = instances_from_maps(fg, dist, PostProcess(marker_h=0.1, min_area_px=0))
    low = instances_from_maps(fg, dist, PostProcess(marker_h=0.02, min_area_px=0))
    rule = instances_from_maps(fg, dist, PostProcess(**RULE), mpp=MPP)
    # one height fails one region or the other
    assert count_in(fixed, ids, inner) == len(inner) and count_in(fixed, ids, sparse) == 2
    assert count_in(low, ids, inner) == 2 * len(inner) and count_in(low, ids, sparse) == 4
    # the density rule splits where nuclei crowd and not where they are sparse
    assert count_in(rule, ids, inner) == 2 * len(inner)
    assert count_in(rule, ids, sparse) == 2
    h = marker_heights(np.where(fg > 0.5, dist, 0), PostProcess(**RULE), MPP)
    assert h[ids == inner[0]].max() == pytest.approx(0.02) and h[ids == sparse[0]].min() == pytest.approx(0.1)


def test_density_is_per_mm2_so_the_rule_scales_with_mpp():
    fg, dist, ids, inner, _ = crowded_and_sparse()
    # the same pixels at 4x the micrometres per pixel hold 16x fewer nuclei per mm^2: sparse, no split
    coarse = instances_from_maps(fg, dist, PostProcess(**{**RULE, "density_sigma_um": 32.0}), mpp=4 * MPP)
    assert count_in(coarse, ids, inner) == len(inner)


@pytest.mark.parametrize("k, flip", [(k, f) for k in range(4) for f in (False, True)])
def test_density_rule_is_exactly_equivariant_to_the_eight_grid_symmetries(k, flip):
    fg, dist, _, _, _ = crowded_and_sparse()
    rng = np.random.default_rng(1)
    dist = np.where(fg > 0, dist * (1 - 0.003 * rng.random(dist.shape)), 0).astype(np.float32)  # no ties to lean on
    post = PostProcess(**{**RULE, "density_sigma_um": 6.0})

    def g(a):
        a = np.rot90(a, k)
        return np.ascontiguousarray(a[:, ::-1] if flip else a)

    ref = instances_from_maps(fg, dist, post, mpp=MPP)
    assert ref.max() > 40
    assert same_partition(g(ref), instances_from_maps(g(fg), g(dist), post, mpp=MPP))


def test_without_marker_h_dense_the_rule_is_the_fixed_height_and_needs_no_mpp():
    fg, dist, _, _, _ = crowded_and_sparse()
    old = PostProcess(**{"fg_threshold": 0.5, "marker_h": 0.1, "min_area_px": 0})  # a checkpoint saved before the field
    assert old.marker_h_dense is None
    assert np.array_equal(instances_from_maps(fg, dist, old), instances_from_maps(fg, dist, old, mpp=MPP))


@pytest.mark.parametrize("bad, match", [({"marker_h_dense": 0.0}, "marker_h_dense"), ({"marker_h_dense": 1.5}, "marker_h_dense"),
                                        ({"dense_per_mm2": (14000, 8000)}, "dense_per_mm2"),
                                        ({"dense_per_mm2": (8000,)}, "dense_per_mm2"),
                                        ({"density_sigma_um": 0}, "density_sigma_um")])
def test_density_rule_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        PostProcess(**bad)


def test_density_rule_without_mpp_is_one_clear_error():
    fg, dist, _, _, _ = crowded_and_sparse()
    with pytest.raises(ValueError, match="mpp"):
        instances_from_maps(fg, dist, PostProcess(**RULE))


def test_density_rule_round_trips_a_checkpoint_dict():
    post = PostProcess(**RULE)
    as_stored = {k: list(v) if isinstance(v, tuple) else v for k, v in post.to_dict().items()}  # JSON/YAML give lists
    assert PostProcess(**as_stored) == post


def test_where_nuclei_are_sparse_everywhere_the_rule_is_the_one_height_rule_exactly():
    fg, dist, _ = paired_nuclei([(30, 40), (90, 40), (30, 160), (90, 160)])  # ~1,000 nuclei per mm^2
    fixed = instances_from_maps(fg, dist, PostProcess(marker_h=0.1, min_area_px=0))
    assert np.array_equal(instances_from_maps(fg, dist, PostProcess(**RULE), mpp=MPP), fixed) and fixed.max() == 4
