-- `segtrain-coordinator prune`: when a finished job's events and metric points were deleted
-- (the job row, its attempts and checkpoints stay). NULL: never pruned.
ALTER TABLE jobs ADD COLUMN pruned_at timestamptz;
-- Finds the finished jobs old enough to prune without reading the others.
CREATE INDEX jobs_prunable_idx ON jobs (finished_at) WHERE finished_at IS NOT NULL AND pruned_at IS NULL;
