"""The TPU path: torch-xla wants static shapes, so batches are padded to buckets and every graph compiles at start-up."""
