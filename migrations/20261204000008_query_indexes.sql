-- Indexes for the reads that grow with the tables (docs/service.md, "Queries at scale";
-- tests/tests/query_plans.rs checks their plans at 100,000 jobs and 1,000,000 points).
--
-- GetMetrics of every name reads one job's points in (iteration, name) order, the newest
-- attempt's first, and stops at its page: this index yields exactly that order, so a job of
-- millions of points is never sorted. It starts with (job_id, iteration) and replaces that index.
CREATE INDEX metrics_job_points_idx ON metrics (job_id, iteration, name, attempt DESC);
DROP INDEX metrics_job_iter_idx;
-- GetMetrics of some names reads each name in iteration order, newest attempt first: a sparse
-- name such as miou no longer means reading every point of the job. The same columns as the
-- primary key, so this unique index takes its place (a key cannot be ordered DESC); it is what
-- ON CONFLICT DO NOTHING finds a replayed point by.
CREATE UNIQUE INDEX metrics_job_name_points_idx ON metrics (job_id, name, iteration, attempt DESC);
ALTER TABLE metrics DROP CONSTRAINT metrics_pkey;

-- ListJobs with a state filter reads each state newest first (id DESC).
CREATE INDEX jobs_state_id_idx ON jobs (state, id DESC);
DROP INDEX jobs_state_idx;
