"""uid rules of SPEC §2: 128-bit ids as 32 hex chars, and the DataComp (u8, u8) pair form."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

UID_DTYPE = np.dtype("u8,u8")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def sample_uid(stem: str, key: str, meta: dict | None = None) -> str:
    """The sample's uid: json["uid"] when present, else md5 of "stem/key"."""
    if meta and meta.get("uid"):
        uid = str(meta["uid"]).lower()
        if _HEX32.match(uid):
            return uid
    return hashlib.md5(f"{stem}/{key}".encode()).hexdigest()


def uid_pairs(uids: Sequence[str]) -> np.ndarray:
    """uids as a structured (u8, u8) array in order, the form DataComp subset files hold."""
    out = np.empty(len(uids), dtype=UID_DTYPE)
    out["f0"] = [int(u[:16], 16) for u in uids]
    out["f1"] = [int(u[16:32], 16) for u in uids]
    return out


def pair_to_uid(hi: int, lo: int) -> str:
    """Inverse of the pair form: 32 lowercase hex characters."""
    return f"{int(hi):016x}{int(lo):016x}"
