"""Why a sample or a row is skipped: one vocabulary for every stage's done markers and summaries.

Skipped samples are counted by reason and never fail a run (SPEC §9); `read == written +
sum(skipped)` holds per shard. WARNINGS name what is counted but does not skip the sample.
"""

MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
UNDECODABLE_IMAGE = "undecodable_image"
UNSAFE_NAME = "unsafe_name"
DUPLICATE_UID = "duplicate_uid"
MISSING_UID = "missing_uid"
NONFINITE_EMBEDDING = "nonfinite_embedding"
BROKEN_SHARD = "broken_shard"

REASONS = {
    MISSING_IMAGE: "no image member (or a symlink or hard link in its place)",
    MISSING_CAPTION: "no caption, or an empty one",
    UNDECODABLE_IMAGE: "the image does not decode (truncated, not an image, too large)",
    UNSAFE_NAME: "a member name that could escape the directory a tar is unpacked to (absolute,"
    " '..', '.', empty component) or that tar/webdataset would read differently (control"
    " character, backslash); reshard also skips a sample holding a link member this way",
    DUPLICATE_UID: "a uid seen before in the same shard",
    MISSING_UID: "a store row without a uid",
    NONFINITE_EMBEDDING: "an embedding holding NaN or Inf",
    BROKEN_SHARD: "distill data: a shard that could not be read, left out whole (counts shards)",
}

MALFORMED_UID = "malformed_uid"

WARNINGS = {
    MALFORMED_UID: "a .json uid that is not 32 hex digits: the uid is derived instead, sample kept",
}
