import numpy as np
import pytest
import torch
from PIL import Image

from tiny_pipelines import tiny_sd_pipeline

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _quantized_cache(tmp_path_factory):
    """The cache of quantized bases (tuneqdm.loading.cache) in a folder of this session, never the user's."""
    import os

    os.environ["TUNEQDM_CACHE"] = str(tmp_path_factory.mktemp("tuneqdm-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random SD pipeline saved to a folder (one per test module; a module may define its own)."""
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three 32x32 photos of a 'subject' (a magenta square on green, moving down); a module may define its own."""
    folder = tmp_path_factory.mktemp("photos")
    for i in range(3):
        a = np.full((32, 32, 3), (40, 200, 60), np.uint8)
        a[4 + 3 * i:20 + 3 * i, 6:22] = (220, 30, 200)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder
