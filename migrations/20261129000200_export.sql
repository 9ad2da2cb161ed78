-- Export robustness: how often a run had to retry, when the server said its files expire, and
-- whether the export was deleted on the server (so abandoned exports can be found and cleaned up).

ALTER TABLE fhir_sync.run
    -- Requests repeated because the server or network said "later": kick-off, status polls,
    -- manifest pages, file downloads and link refreshes.
    ADD COLUMN retries           bigint      NOT NULL DEFAULT 0,
    -- The Expires header of the completed status response, exactly as sent.
    ADD COLUMN export_expires    text,
    -- When fhir-sync deleted (or cancelled) the export on the server; NULL while it may exist.
    ADD COLUMN export_deleted_at timestamptz;

ALTER TABLE fhir_sync.run_file
    -- Download attempts of this file (1 when the first one worked).
    ADD COLUMN attempts       integer NOT NULL DEFAULT 0,
    -- Times the file's link expired and a fresh one was fetched from the status URL.
    ADD COLUMN link_refreshes integer NOT NULL DEFAULT 0;

-- Finding exports left behind on the server: runs with a status URL not yet deleted.
CREATE INDEX run_open_export_idx ON fhir_sync.run (job)
    WHERE status_url IS NOT NULL AND export_deleted_at IS NULL;
