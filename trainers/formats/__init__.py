"""Pure read/write of artifact formats."""
