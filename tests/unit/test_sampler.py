"""The training loader's state: what Lightning saves mid-epoch continues the same order in a fresh loader."""

from atspeed.data.sampler import resumable_loader


def _loader(size: int = 20, batch: int = 4, seed: int = 3):
    return resumable_loader(list(range(size)), batch, lambda rows: rows, seed)


def _epoch(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_mid_epoch_state_continues_the_same_order_in_a_new_loader() -> None:
    reference = _epoch(_loader(), 2)
    for served in range(1, len(reference)):
        loader = _loader()
        loader.sampler.set_epoch(2)
        it = iter(loader)
        assert [next(it) for _ in range(served)] == reference[:served]
        state = loader.state_dict()
        fresh = _loader()  # a resumed process: epoch not set yet, as Lightning creates the iterator first
        fresh.load_state_dict(state)
        assert list(fresh) == reference[served:], f"resumed after {served} batches"


def test_state_after_the_last_batch_ends_that_epoch_and_serves_the_next_whole() -> None:
    loader = _loader()
    loader.sampler.set_epoch(4)
    assert len(list(loader)) == 5
    state = loader.state_dict()
    # restored from the end of a batch, Lightning counts epoch 4 as done and moves the sampler on before pulling
    fresh = _loader()
    fresh.load_state_dict(state)
    it = iter(fresh)
    fresh.sampler.set_epoch(5)
    assert list(it) == _epoch(_loader(), 5)
    # restored after the batch's validation, it first asks epoch 4 for more: nothing, then epoch 5 whole
    fresh = _loader()
    fresh.load_state_dict(state)
    it = iter(fresh)
    assert fresh.state_dict() == state, "saved again before the next epoch starts: still epoch 4's end"
    fresh.sampler.set_epoch(4)
    assert list(it) == [] and fresh.state_dict() == state
    assert _epoch(fresh, 5) == _epoch(_loader(), 5)


def test_epochs_shuffle_differently_reproducibly_and_cover_every_item() -> None:
    first, second = _epoch(_loader(), 0), _epoch(_loader(), 1)
    assert first != second and first == _epoch(_loader(), 0)
    assert sorted(i for batch in second for i in batch) == list(range(20))


def test_ranks_split_an_epoch_between_them() -> None:
    shares = []
    for rank in range(2):
        loader = resumable_loader(list(range(20)), 4, lambda rows: rows, 3, rank=rank, world_size=2)
        shares.append({i for batch in loader for i in batch})
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(20))
