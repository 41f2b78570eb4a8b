import sys
from pathlib import Path

import pytest

from atspeed.cli import main
from tests.integration.tiny_data import tiny_args, write_processed


@pytest.fixture(autouse=True, scope="session")
def _plain_argv():
    """The CLI is driven through ``main(args)``; pytest's own argv must not look like CLI arguments."""
    saved = sys.argv
    sys.argv = ["atspeed"]
    yield
    sys.argv = saved


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data dir, target export, draft export): two tiny SFT fits on the same data."""
    root = tmp_path_factory.mktemp("decode")
    data = write_processed(root / "data")
    main(["fit", *tiny_args(data, root / "target")])
    draft_sizes = ["--model.init_args.model.hidden_size", "8", "--model.init_args.model.num_layers", "1"]
    main(["fit", *tiny_args(data, root / "draft"), *draft_sizes])
    return data, root / "target" / "hf", root / "draft" / "hf"


@pytest.fixture(scope="session")
def teacher_data(exported, tmp_path_factory) -> Path:
    """Teacher data of the exported tiny target (configs/tiny/teacher.yaml)."""
    from tests.integration.tiny_data import teacher_args

    out = tmp_path_factory.mktemp("teacher")
    main(["predict", *teacher_args(exported, out)])
    return out / "data"
