"""Nothing in mmcurate unpickles data: an AST scan of the source, and live pickle payloads that
the real loaders must refuse without running."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from faults.generator import Evil

import mmcurate
from mmcurate.errors import MmcurateError

PACKAGE = Path(mmcurate.__file__).resolve().parent
# Calls that unpickle (or run) whatever the file holds, whatever their arguments.
UNSAFE = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "_pickle.Unpickler",
    "cPickle.load",
    "cPickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "pandas.read_pickle",
    "shelve.open",
    "marshal.load",
    "marshal.loads",
    "yaml.unsafe_load",
    "yaml.full_load",
}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load", "numpy.lib.npyio.load", "numpy.lib.format.read_array"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from every import in the module (function-level ones too)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    names[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(names.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Every call in `source` that could unpickle a data file, as `file:line: reason`."""
    tree = ast.parse(source, filename)
    names = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, names)
        if name is None:
            continue
        where = f"{filename}:{node.lineno}"
        splat = any(k.arg is None for k in node.keywords)
        if name in UNSAFE:
            found.append(f"{where}: {name} unpickles its input")
        elif name in TORCH_LOADS:
            if splat or not _is_const(_keyword(node, "weights_only"), True):
                found.append(f"{where}: {name} without weights_only=True")
        elif name in NUMPY_LOADS:
            if splat or not _is_const(_keyword(node, "allow_pickle"), False):
                found.append(f"{where}: {name} without allow_pickle=False")
        elif name == "yaml.load":
            loader = _keyword(node, "Loader")
            loader_name = _dotted(loader, names) if loader is not None else None
            if not loader_name or loader_name.rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                found.append(f"{where}: yaml.load without a safe Loader")
    return found


def test_no_code_path_unpickles_data_files():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20, "the scan must see the package"
    found = []
    for path in sources:
        found += violations(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, weights_only=False)",
        "import torch as th\nth.load(p, map_location='cpu')",
        "from torch import load\nload(p)",
        "from torch import load as tl\ntl(p, weights_only=flag)",
        "import torch\ntorch.load(p, **kw)",
        "import torch.serialization\ntorch.serialization.load(p)",
        "import pickle\npickle.load(fh)",
        "import pickle as pk\npk.loads(b)",
        "from pickle import Unpickler\nUnpickler(fh).load()",
        "import numpy as np\nnp.load(p)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
        "from numpy import load\nload(p, mmap_mode='r')",
        "import numpy as np\nnp.lib.format.read_array(fh, allow_pickle=True)",
        "import pandas as pd\npd.read_pickle(p)",
        "def f():\n    import joblib\n    return joblib.load(p)",
        "import yaml\nyaml.load(s)",
        "import yaml\nyaml.load(s, Loader=yaml.Loader)",
        "import shelve\nshelve.open(p)",
        "import dill\ndill.load(fh)",
    ],
)
def test_the_scan_catches_every_unsafe_form(source):
    assert len(violations(source)) == 1, source


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
        "import torch as th\nth.load(p, weights_only=True, mmap=True)",
        "import numpy as np\nnp.load(p, allow_pickle=False)",
        "import numpy as np\nnp.load(p, mmap_mode='r', allow_pickle=False)",
        "import pickle\npickle.dumps(obj)",
        "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
        "import yaml\nyaml.safe_load(s)",
        "import json\njson.load(fh)",
    ],
)
def test_the_scan_passes_safe_forms(source):
    assert violations(source) == []


@pytest.fixture
def payload_marker():
    """The file Evil's payload writes; present afterwards only if a loader ran the pickle."""
    marker = Path(Evil.marker)
    marker.unlink(missing_ok=True)
    yield marker
    marker.unlink(missing_ok=True)


def _live(path: Path, marker: Path) -> None:
    """Prove the payload file really runs code when unpickled the unsafe way."""
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()


def test_real_loaders_refuse_pickle_payloads_without_running_them(tmp_path, payload_marker):
    from mmcurate.curate.targets import load_target
    from mmcurate.data.store import read_arrays
    from mmcurate.data.subset import load_subset
    from mmcurate.distill.artifact import load_artifact
    from mmcurate.distill.buffers import read_expert

    evil_pt = tmp_path / "evil.pt"
    torch.save({"image_features": torch.zeros(2, 4), "evil": Evil()}, evil_pt)
    _live(evil_pt, payload_marker)
    raw_pickle = tmp_path / "raw.pt"
    raw_pickle.write_bytes(pickle.dumps({"image_features": np.zeros((2, 4)), "evil": Evil()}))
    for path in (evil_pt, raw_pickle):
        for load in (load_target, load_artifact, read_expert):
            with pytest.raises(MmcurateError):
                load(path)
    subset = tmp_path / "subset.npy"
    np.save(subset, np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(MmcurateError):
        load_subset(subset)
    store = tmp_path / "store"
    store.mkdir()
    with open(store / "s.npz", "wb") as fh:
        np.savez(fh, img=np.array([[Evil()]], dtype=object))
    with pytest.raises(MmcurateError, match="refusing to unpickle"):
        read_arrays(store, "s", ["img"])
    assert not payload_marker.exists(), "a loader executed a pickle payload"


def tar_extractions(source: str) -> list[int]:
    """Lines that unpack tar members to disk under their own names (extract, extractall)."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("extract", "extractall")
    ]


def test_no_code_path_extracts_tar_members_to_disk():
    """Members are read with extractfile; nothing unpacks a tar by its members' own names."""
    assert tar_extractions("import tarfile\nwith tarfile.open(p) as t:\n    t.extractall(d)") == [3]
    assert tar_extractions("t.extract(m, path=d)\nt.extractfile(m).read()") == [1]
    found = {
        str(path.relative_to(PACKAGE.parent)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := tar_extractions(path.read_text()))
    }
    assert found == {}
