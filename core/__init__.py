"""What an edit is, independent of any method or host: plans and settings (what to change),
deltas (the change), and applying a delta to live weights."""
