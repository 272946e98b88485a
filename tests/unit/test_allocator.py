import pytest

from omniserve_sgl.kv import BEPoolFullError, PageAllocator


def test_allocate_extend_free_and_metadata():
    a = PageAllocator(num_pages=6, page_size=4)
    a.allocate("a", 5)  # 2 pages
    a.allocate("b", 0)  # no pages yet
    assert (a.used_pages, a.free_pages) == (2, 4)
    a.extend("a", 3)  # 8 tokens: still 2 pages
    assert a.used_pages == 2
    a.extend("a")  # 9 tokens: a third page
    a.extend("b", 4)
    indptr, indices, last = a.kv_metadata(["a", "b"])
    assert indptr.tolist() == [0, 3, 4]
    assert last.tolist() == [1, 4]
    assert len(set(indices.tolist())) == 4 and all(0 <= p < 6 for p in indices.tolist())
    a.free("a")
    a.free("a")  # idempotent
    assert a.free_pages == 5 and "a" not in a


def test_full_pool_refuses_and_changes_nothing():
    a = PageAllocator(num_pages=3, page_size=2)
    a.allocate("x", 4)
    assert not a.can_allocate(3) and a.can_allocate(2)
    with pytest.raises(BEPoolFullError, match="BE KV pool full"):
        a.allocate("y", 3)
    assert "y" not in a and a.free_pages == 1
    a.extend("x", 2)
    with pytest.raises(BEPoolFullError):
        a.extend("x", 1)
    assert a.seq_len("x") == 6 and a.free_pages == 0
    a.free("x")
    a.allocate("y", 6)  # everything is reusable after free
    assert a.free_pages == 0


def test_bad_calls():
    a = PageAllocator(2, 16)
    a.allocate(1, 1)
    with pytest.raises(ValueError, match="already allocated"):
        a.allocate(1, 1)
    with pytest.raises(ValueError):
        a.allocate(2, -1)
    with pytest.raises(KeyError):
        a.extend(99)
    with pytest.raises(ValueError):
        PageAllocator(0, 16)


def test_reservation_is_counted_and_never_fails_within_it():
    a = PageAllocator(num_pages=10, page_size=4)
    a.allocate("r1", 0, reserve_tokens=20)  # 5 pages reserved
    assert a.free_pages == 5 and a.used_pages == 0 and a.reserved_pages == 5
    assert a.num_seqs == 1  # a reservation alone counts: the server is in BE mode while one is held
    assert not a.can_allocate(24)  # 6 pages: only 5 are neither held nor reserved
    a.allocate("r2", 20)
    assert a.free_pages == 0
    assert a.can_extend("r1", 20) and not a.can_extend("r1", 21) and not a.can_extend("r2", 1)
    for _ in range(20):
        a.extend("r1", 1)  # within its reservation: always succeeds
    assert a.reserved_pages == 0 and a.used_pages == 10
    with pytest.raises(BEPoolFullError):
        a.extend("r1", 1)
    a.free("r1")
    assert a.free_pages == 5 and a.reserved_pages == 0 and a.num_seqs == 1
