"""GPU tests: marked `gpu`, skipped without CUDA (CI has none). The bundled model comes from
TETHER_GPU_MODEL_DIR when set (a converted SmolLM2-135M-Instruct directory on a machine without the
package registry), else from the project cache."""

import os

import pytest
import torch


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs a GPU"))


@pytest.fixture(scope="session")
def gpu_model_dir() -> str:
    path = os.environ.get("TETHER_GPU_MODEL_DIR")
    if path:
        return path
    from rollout.models import prepare_bundled

    return str(prepare_bundled())
