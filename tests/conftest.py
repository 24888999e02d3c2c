import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def tiny():
    """Tiny random pipelines per family, built once; tests must leave their weights unchanged."""
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.testing.tiny_models import build_tiny_pipeline

    cache = {}

    def get(family):
        if family not in cache:
            pipe = build_tiny_pipeline(family)
            cache[family] = (pipe, DiffusersModel(pipe))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory, tiny):
    pipe, _ = tiny("sd1")
    d = tmp_path_factory.mktemp("models") / "tiny_sd1"
    pipe.save_pretrained(str(d))
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Generation on the bundled model runs much faster on one thread when the 2 cores are shared
    (OpenMP spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
