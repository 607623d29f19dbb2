"""Data at rest: shard reading and writing, the embedding store, uids, subset files, atomic writes.

`IMG_KEY` and `TXT_KEY` name the store's npz arrays as `mmcurate embed` writes them (DataComp's
own files use `l14_img`/`l14_txt` or `b32_img`/`b32_txt`).
"""

IMG_KEY, TXT_KEY = "img", "txt"
