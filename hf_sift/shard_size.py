"""The default largest file size before hf_sift splits what it writes into shards.

One default for every writer: the artifact's sum, `hf-sift merge` outputs, and exported checkpoints
(`hf-sift export`, `MergedMaskedModel.save_pretrained`). Each writer accepts `max_shard_size` to change it.
"""

DEFAULT_MAX_SHARD_SIZE = "2GB"
