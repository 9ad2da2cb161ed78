-- fhir-sync's own schema: the warehouse table that holds resources, and the record of every
-- sync run and file. Landed migrations are never edited; change the schema in a new file.

CREATE SCHEMA IF NOT EXISTS fhir_sync;

-- One row per sync run of a job.
CREATE TABLE fhir_sync.run (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job              text        NOT NULL,
    source           text        NOT NULL,
    status           text        NOT NULL DEFAULT 'running'
                     CHECK (status IN ('running', 'succeeded', 'failed')),
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    fhir_base_url    text        NOT NULL,
    -- The kick-off URL and the status URL the server returned (a restart resumes from it).
    export_request   text,
    status_url       text,
    progress         text,
    -- The manifest's transactionTime, exactly as the server sent it.
    transaction_time text,
    since            text,
    resources_loaded bigint      NOT NULL DEFAULT 0,
    lines_rejected   bigint      NOT NULL DEFAULT 0,
    export_errors    bigint      NOT NULL DEFAULT 0,
    error            text,
    -- Whether the error can go away by itself (a 503) or needs an operator (a bad key).
    error_retryable  boolean
);
CREATE INDEX run_job_started_idx ON fhir_sync.run (job, started_at DESC);

-- One row per file listed in a run's manifest.
CREATE TABLE fhir_sync.run_file (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id           bigint      NOT NULL REFERENCES fhir_sync.run (id) ON DELETE CASCADE,
    kind             text        NOT NULL CHECK (kind IN ('output', 'error', 'deleted')),
    resource_type    text        NOT NULL,
    -- Without query string: presigned URLs carry credentials there.
    url              text        NOT NULL,
    manifest_count   bigint,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'loading', 'loaded', 'failed')),
    bytes            bigint      NOT NULL DEFAULT 0,
    -- Checkpoint: lines of the file (loaded, rejected or blank) whose effects are committed.
    lines_committed  bigint      NOT NULL DEFAULT 0,
    resources_loaded bigint      NOT NULL DEFAULT 0,
    lines_rejected   bigint      NOT NULL DEFAULT 0,
    started_at       timestamptz,
    finished_at      timestamptz,
    error            text,
    UNIQUE (run_id, kind, url)
);

-- NDJSON lines that could not be loaded, with the reason. The rest of the file still loads.
CREATE TABLE fhir_sync.rejected_line (
    file_id     bigint NOT NULL REFERENCES fhir_sync.run_file (id) ON DELETE CASCADE,
    line_number bigint NOT NULL,
    run_id      bigint NOT NULL,
    reason      text   NOT NULL,
    -- The start of the line, for diagnosis; it may contain patient data like the warehouse itself.
    raw_excerpt text   NOT NULL,
    PRIMARY KEY (file_id, line_number)
);

-- OperationOutcomes from the manifest's error files.
CREATE TABLE fhir_sync.export_error (
    file_id     bigint NOT NULL REFERENCES fhir_sync.run_file (id) ON DELETE CASCADE,
    line_number bigint NOT NULL,
    run_id      bigint NOT NULL,
    outcome     jsonb  NOT NULL,
    PRIMARY KEY (file_id, line_number)
);

-- The warehouse: one row per resource per source, newest version wins.
CREATE TABLE fhir_sync.resource (
    source        text        NOT NULL,
    resource_type text        NOT NULL,
    id            text        NOT NULL,
    version_id    text,
    last_updated  timestamptz,
    resource      jsonb       NOT NULL,
    first_run_id  bigint      NOT NULL,
    last_run_id   bigint      NOT NULL,
    PRIMARY KEY (source, resource_type, id)
);
