"""DataComp's image-based filter, the maths: the centroid of largest inner product per row
(unnormalised float32 centroids, as `get_centroid_ids_gpu`), as a blocked matmul on CPU or GPU
(one code path), and loading DataComp's published centroid files without unpickling anything
but numpy arrays."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mmcurate.curate.rows import Rows, as_f32, blocks, torch_device
from mmcurate.errors import UsageError

CENTROID = "centroid"  # `score --metric centroid`'s sidecar column (int32): each row's centroid
PRODUCT_BUDGET = 1 << 24  # float32 products held per block (64 MiB): rows per block = this / k
MAX_BLOCK = 8192


def _numpy_globals() -> list:
    """What torch's weights-only unpickler may rebuild: numpy arrays and dtypes, also under the
    `numpy.core` names that files pickled with numpy 1 (DataComp's) use."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    dtypes = {type(np.dtype(t)) for t in (np.float16, np.float32, np.float64)}
    return [
        multiarray._reconstruct,
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *dtypes,
    ]


def load_centroids(path: str | Path) -> np.ndarray:
    """A (k, d) float32 centroid matrix from DataComp's `{scale}_centroids_l14.pt` (a pickled
    numpy array, loaded by torch with weights_only=True and numpy's array globals allowed), a
    `.pt` tensor, or a `.npy`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"centroid file not found: {path}")
    if path.suffix.lower() == ".npy":
        try:
            obj = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read centroids {path}: {exc}") from None
    else:
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UsageError(
                f"cannot load centroids {path} with weights_only=True: {first}"
            ) from None
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if not isinstance(obj, np.ndarray) or obj.ndim != 2 or obj.shape[0] == 0:
        shape = getattr(obj, "shape", type(obj).__name__)
        raise UsageError(f"centroids {path} must be a non-empty 2-d matrix, got {shape}")
    if obj.dtype.kind != "f" or not np.isfinite(obj).all():
        raise UsageError(f"centroids {path} must be finite floats, got {obj.dtype}")
    return np.ascontiguousarray(obj, dtype=np.float32)


@lru_cache(maxsize=1)
def cached_centroids(path: str, sha256: str) -> np.ndarray:
    """The centroids of `path`, loaded once per process (keyed by the file's sha256 too)."""
    return load_centroids(path)


def block_rows(k: int) -> int:
    """Rows per matmul block for k centroids: the products stay within PRODUCT_BUDGET."""
    return max(1, min(MAX_BLOCK, PRODUCT_BUDGET // max(k, 1)))


def nearest_by_inner_product(
    x: Rows, centroids: np.ndarray | torch.Tensor, device: str | None = "cpu"
) -> np.ndarray:
    """argmax_j ⟨x_i, c_j⟩ per row (the first index at a tie, as torch.argmax), int64; x is
    read block by block as float32, the centroids are used as given (not normalised)."""
    dev = torch_device(device)
    c = torch.as_tensor(centroids, dtype=torch.float32).to(dev)
    n = len(x)
    out = np.empty(n, dtype=np.int64)
    for r0, r1 in blocks(n, block_rows(c.shape[0])):
        part = torch.from_numpy(as_f32(x, slice(r0, r1))).to(dev)
        out[r0:r1] = torch.argmax(part @ c.T, dim=1).cpu().numpy()
    return out
