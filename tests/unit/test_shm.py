import pytest
import torch

from omniserve_sgl.shm import SharedSegment


def test_views_share_bytes_and_check_bounds():
    seg = SharedSegment.create(4096)
    a = seg.tensor(0, torch.float32, (4, 4))
    b = seg.tensor(0, torch.int32, (16,))
    a.fill_(1.0)
    assert torch.all(b == torch.tensor(1.0).view(torch.int32))
    other = SharedSegment.attach(seg.handle)
    assert torch.all(other.tensor(0, torch.float32, (16,)) == 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        seg.tensor(4000, torch.float32, (100,))
    with pytest.raises(ValueError, match="does not fit"):
        seg.tensor(2, torch.float32, (1,))
    with pytest.raises(ValueError, match="positive size"):
        SharedSegment.create(0)
    del a, b
    other.close()
    seg.close()
    seg.close()
