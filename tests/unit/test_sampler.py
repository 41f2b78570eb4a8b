from atspeed.data.sampler import ResumableSampler


def test_resume_continues_the_same_epoch_order() -> None:
    full = ResumableSampler(20, seed=3)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableSampler(20, seed=3)
    resumed.set_epoch(2)
    resumed.resume_at(8)
    assert len(resumed) == 12 and list(resumed) == order[8:]
    assert len(list(resumed)) == 20, "the skip applies once"


def test_epochs_shuffle_differently_and_reproducibly() -> None:
    a, b = ResumableSampler(50, seed=0), ResumableSampler(50, seed=0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(list(a)) == list(range(50))
    assert list(b) == first
