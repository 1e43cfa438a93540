-- Spot VMs and elastic world size (docs/operations.md, "Spot pools and elastic jobs").

-- Preempted attempts are counted apart from restarts (which max_restarts bounds).
ALTER TABLE jobs ADD COLUMN preemptions integer NOT NULL DEFAULT 0 CHECK (preemptions >= 0);

-- Specs stored before the elastic fields existed ran at exactly world_size.
UPDATE jobs SET spec = spec || jsonb_build_object('min_world_size', world_size)
 WHERE NOT spec ? 'min_world_size';
UPDATE jobs SET spec = spec || jsonb_build_object('elastic_wait_seconds', 60)
 WHERE NOT spec ? 'elastic_wait_seconds';

-- Each attempt's own gradient accumulation (world_size x accumulate_steps is the job's).
ALTER TABLE attempts ADD COLUMN accumulate_steps integer;
UPDATE attempts a SET accumulate_steps = coalesce((j.spec ->> 'accumulate_steps')::integer, 1)
  FROM jobs j WHERE j.id = a.job_id;
ALTER TABLE attempts ALTER COLUMN accumulate_steps SET NOT NULL;
ALTER TABLE attempts ADD CONSTRAINT attempts_accumulate_steps_check CHECK (accumulate_steps > 0);
-- Set when the coordinator stops a shrunk attempt so the job can grow back to this world size
-- (the attempt ends RESIZED once its ranks have stopped).
ALTER TABLE attempts ADD COLUMN resize_to integer CHECK (resize_to > 0);

ALTER TABLE attempts DROP CONSTRAINT attempts_state_check;
ALTER TABLE attempts ADD CONSTRAINT attempts_state_check CHECK (state IN
    ('PENDING','RENDEZVOUS','RUNNING','SUCCEEDED','FAILED','LOST','CANCELED','STOPPING',
     'PREEMPTED','RESIZED'));

ALTER TABLE attempt_ranks DROP CONSTRAINT attempt_ranks_outcome_check;
ALTER TABLE attempt_ranks ADD CONSTRAINT attempt_ranks_outcome_check CHECK (outcome IN
    ('SUCCEEDED','FAILED_INFRA','FAILED_DETERMINISTIC','CANCELED','LOST','PREEMPTED'));

-- The worker's daemon said it is going away: no new rank until a daemon registers again.
ALTER TABLE workers ADD COLUMN leaving boolean NOT NULL DEFAULT false;

-- Written because the run was asked to stop (preemption, resize, cancel).
ALTER TABLE checkpoints ADD COLUMN on_stop boolean NOT NULL DEFAULT false;
