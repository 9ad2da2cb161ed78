-- Runs go through the job queue: an explicit, persisted state machine, schedules, the
-- incremental-sync watermark, per-file leases, and a notification on every run state change.

-- Runs left 'running' by the foreground runner of earlier versions cannot be resumed.
UPDATE fhir_sync.run SET status = 'failed', finished_at = coalesce(finished_at, now()),
    error = coalesce(error, 'abandoned: the process running it stopped before it finished')
WHERE status = 'running';

ALTER TABLE fhir_sync.run DROP CONSTRAINT run_status_check;
ALTER TABLE fhir_sync.run ADD CONSTRAINT run_status_check CHECK (status IN (
    'queued', 'kicking_off', 'exporting', 'loading', 'completing',
    'succeeded', 'failed', 'cancelled', 'skipped'));
ALTER TABLE fhir_sync.run ALTER COLUMN status SET DEFAULT 'queued';
ALTER TABLE fhir_sync.run
    -- The cron tick this run was started for (NULL when started by hand).
    ADD COLUMN scheduled_for timestamptz,
    -- 'schedule', 'catch-up' or 'manual'.
    ADD COLUMN trigger text NOT NULL DEFAULT 'manual',
    -- Ignore the watermark: export everything.
    ADD COLUMN full_export boolean NOT NULL DEFAULT false,
    -- The manifest's requiresAccessToken, needed by whichever worker downloads a file.
    ADD COLUMN requires_access_token boolean,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- A tick starts at most one run, however many processes see it.
CREATE UNIQUE INDEX run_job_tick ON fhir_sync.run (job, scheduled_for) WHERE scheduled_for IS NOT NULL;
-- At most one run of a job is past 'queued' and not finished.
CREATE UNIQUE INDEX run_one_active_per_job ON fhir_sync.run (job)
    WHERE status IN ('kicking_off', 'exporting', 'loading', 'completing');

-- A file being loaded is leased to one worker, which renews the lease while it works; a
-- lapsed lease (a killed process) lets another worker take over from the checkpoint.
ALTER TABLE fhir_sync.run_file
    -- The URL as the manifest gave it, query string included, for whichever worker downloads
    -- the file. Presigned URLs carry credentials: never show this column outside the loader.
    ADD COLUMN download_url text,
    ADD COLUMN lease_owner text,
    ADD COLUMN lease_expires_at timestamptz;

-- Incremental sync: the next run's _since, advanced only by a run whose files all loaded.
CREATE TABLE fhir_sync.watermark (
    job              text PRIMARY KEY,
    -- The manifest's transactionTime, exactly as the server sent it.
    transaction_time text        NOT NULL,
    run_id           bigint      NOT NULL REFERENCES fhir_sync.run (id),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Waiters (the foreground `run`, tests) LISTEN instead of polling.
CREATE FUNCTION fhir_sync.notify_run_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fhir_sync_run', NEW.id::text);
    RETURN NEW;
END
$$;
CREATE TRIGGER run_changed AFTER INSERT OR UPDATE OF status, progress ON fhir_sync.run
    FOR EACH ROW EXECUTE FUNCTION fhir_sync.notify_run_change();
