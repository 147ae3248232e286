"""The random router draw (mixing/router_random.py) both mixes share: fixed by (seed, layer)."""

import numpy as np

from nemo_btx.mixing.router_random import random_router


def test_draw_depends_on_seed_and_layer_only():
    a = random_router(1234, 0, 4, 64, 0.02)
    assert a.dtype == np.float32 and a.shape == (4, 64)
    assert np.array_equal(a, random_router(1234, 0, 4, 64, 0.02))
    assert not np.array_equal(a, random_router(1234, 1, 4, 64, 0.02))
    assert not np.array_equal(a, random_router(1235, 0, 4, 64, 0.02))
    assert abs(float(a.std()) - 0.02) < 0.003
    assert np.isfinite(random_router(-1, 2, 2, 8, 1.0)).all()  # any int seed


def test_draw_is_the_recorded_one():
    """numpy does not promise its generators' streams across versions; routers of runs made
    before such a change would differ from a re-run's. This pins the first values so that a
    numpy upgrade that changes them is noticed here, not in a results table."""
    assert random_router(1234, 0, 4, 64, 0.02)[0, :3].tolist() == [
        -0.03861165791749954, 0.05451783537864685, 0.03047061897814274]
    assert random_router(-1, 2, 2, 8, 1.0)[0, :2].tolist() == [-0.6241970658302307, 1.7521721124649048]
