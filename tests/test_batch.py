"""BatchView: fields found by name and leading dimension, CSR offsets and sample ids, from shapes
only; empty batches (every system retired) and the cached layout."""
from __future__ import annotations

import torch

from dist_hooks.batch import BatchView

from batches import make_batch, make_empty_batch


def test_empty_batch_view_has_no_systems_and_empty_scalars():
    v = BatchView.of(make_empty_batch())
    assert (v.num_systems, v.num_atoms) == (0, 0)
    assert v.atoms_ptr.tolist() == [0]
    for t in (v.system_scalar("energy"), v.sample_ids(), v.status()):
        assert t.shape == (0,)
    assert v.sample_ids().dtype == torch.int64 and v.atom_to_system().shape == (0,)


def test_system_scalar_takes_the_first_value_of_each_system():
    b = make_batch([2, 1, 3], seed=0, first_id=5)
    v = BatchView.of(b)
    assert torch.equal(v.system_scalar("energy"), b.energy[:, 0])
    assert v.sample_ids().tolist() == [5, 6, 7]
    assert torch.equal(v.status(), b.status[:, 0])
    assert torch.equal(v.system_scalar("cell"), b.cell.reshape(3, -1)[:, 0])


def test_cached_layout_of_a_full_batch_also_views_an_empty_one():
    b = make_batch([2, 3], seed=1)
    b.dipole_x = torch.randn(2)  # level known only from its leading dimension
    layout = BatchView.of(b).layout
    assert "dipole_x" in layout[1]
    e = make_empty_batch()
    e.dipole_x = torch.randn(0)
    v = BatchView.of(e, layout)
    assert v.layout == layout and v.num_systems == 0
    # discovery alone cannot place it in an empty batch (0 atoms == 0 systems): why the hooks
    # never remember the layout of an empty batch
    assert "dipole_x" not in BatchView.of(e).layout[1]
