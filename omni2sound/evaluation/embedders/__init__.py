"""Audio, text and video embedders the metrics run on: adapters over released checkpoints (loaded from local paths,
never downloaded) and the embedded offline defaults named for what they are."""
