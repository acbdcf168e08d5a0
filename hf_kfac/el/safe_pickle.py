"""Loading of data-only pickles (plain dict/list/str/number/bool/None).

The vocabulary packages ship their dictionaries as ``.pkl.bz2`` files. A pickle
can name any importable class and so run code when loaded; these files only need
built-in containers, which the pickle protocol encodes without naming a class.
:class:`DataOnlyUnpickler` therefore refuses every class lookup.
"""

from __future__ import annotations

import bz2
import io
import pickle
from pathlib import Path
from typing import Any

__all__ = ["DataOnlyUnpickler", "UnsafePickleError", "load_data_pickle", "loads_data_pickle"]


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle asks for a class or function (which we never allow)."""


class DataOnlyUnpickler(pickle.Unpickler):
    """Unpickler that accepts only built-in data types and refuses every class."""

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, source: str = "<bytes>") -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
        """Refuse: a data-only pickle never needs to import anything."""
        raise UnsafePickleError(
            f"refusing to load class {module}.{name} from pickle {self._source}: only plain "
            "dict/list/tuple/str/bytes/int/float/bool/None data is allowed. The file is not "
            "the expected data-only dictionary (a corrupted or replaced package file?)."
        )

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids as well (they would resolve external objects)."""
        raise UnsafePickleError(f"refusing persistent id {pid!r} in pickle {self._source}")


def loads_data_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` (already decompressed) with :class:`DataOnlyUnpickler`."""
    return DataOnlyUnpickler(io.BytesIO(data), source=source).load()


def load_data_pickle(path: str | Path) -> Any:
    """Load a data-only pickle file; ``.bz2`` files are decompressed first."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".bz2":
        raw = bz2.decompress(raw)
    return loads_data_pickle(raw, source=str(path))
