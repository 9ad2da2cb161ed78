-- The warehouse data model: `fhir_sync.resource` becomes a table LIST-partitioned by resource
-- type (one partition per type, created on first sight of the type), with a deletion marker and
-- the patient each resource belongs to; schema `fhir` gets one view per type for analysts.
-- Rows loaded by the skeleton's single table are moved over unchanged.

CREATE SCHEMA IF NOT EXISTS fhir;

ALTER TABLE fhir_sync.resource RENAME TO resource_v1;
ALTER TABLE fhir_sync.resource_v1 RENAME CONSTRAINT resource_pkey TO resource_v1_pkey;

-- One row per resource per source. A row with `deleted_at` set is a tombstone: the resource was
-- deleted on the server (by the run `deleted_by_run_id`); `resource` keeps the last version seen,
-- or is NULL when the deletion arrived for an id never loaded (so that an older version arriving
-- later cannot resurrect it).
CREATE TABLE fhir_sync.resource (
    source            text        NOT NULL,
    resource_type     text        NOT NULL,
    id                text        NOT NULL,
    version_id        text,
    last_updated      timestamptz,
    -- The id of the Patient the resource belongs to (`subject` or `patient` reference), the id
    -- itself for a Patient, NULL otherwise.
    patient_id        text,
    resource          jsonb,
    first_run_id      bigint      NOT NULL,
    last_run_id       bigint      NOT NULL,
    deleted_at        timestamptz,
    deleted_by_run_id bigint,
    PRIMARY KEY (source, resource_type, id)
) PARTITION BY LIST (resource_type);

-- The types that have a partition and a view, and their names.
CREATE TABLE fhir_sync.resource_type (
    resource_type  text        PRIMARY KEY,
    partition_name text        NOT NULL UNIQUE,
    view_name      text        NOT NULL UNIQUE,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Newer wins: whether a version (lastUpdated, versionId) is not older than the stored one.
-- Without a lastUpdated on either side there is no order to respect and the incoming version
-- wins; with equal instants, versionIds compare as numbers when both are integers, else as text.
CREATE FUNCTION fhir_sync.version_not_older(
    new_updated timestamptz, new_version text, old_updated timestamptz, old_version text
) RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN new_updated IS NULL OR old_updated IS NULL THEN true
        WHEN new_updated <> old_updated THEN new_updated > old_updated
        WHEN new_version IS NULL OR old_version IS NULL THEN true
        WHEN new_version ~ '^[0-9]{1,18}$' AND old_version ~ '^[0-9]{1,18}$'
            THEN new_version::bigint >= old_version::bigint
        ELSE new_version COLLATE "C" >= old_version COLLATE "C"
    END
$$;

-- Creates the partition `fhir_sync.resource_<type>` and the view `fhir.<type>` (snake_case:
-- MedicationRequest → fhir.medication_request) unless they exist. Safe to call concurrently:
-- creators serialise on an advisory lock held until their transaction ends, and re-check.
CREATE FUNCTION fhir_sync.ensure_resource_type(new_type text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    base text;
    has_patient boolean;
BEGIN
    IF EXISTS (SELECT 1 FROM fhir_sync.resource_type t WHERE t.resource_type = new_type) THEN
        RETURN;
    END IF;
    IF new_type !~ '^[A-Z][A-Za-z]{0,62}$' THEN
        RAISE EXCEPTION 'resource type % is not a FHIR resource type name', new_type;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('fhir_sync.ensure_resource_type'));
    IF EXISTS (SELECT 1 FROM fhir_sync.resource_type t WHERE t.resource_type = new_type) THEN
        RETURN;
    END IF;
    base := lower(regexp_replace(new_type, '([a-z0-9])([A-Z])', '\1_\2', 'g'));
    EXECUTE format(
        'CREATE TABLE fhir_sync.%I PARTITION OF fhir_sync.resource FOR VALUES IN (%L)',
        'resource_' || base, new_type);
    -- The view shows patient_id only where the loader can fill it, so analysts are not offered
    -- a column that is always NULL.
    has_patient := new_type <> 'Patient';
    EXECUTE format(
        'CREATE VIEW fhir.%I AS SELECT source, id, %s version_id, last_updated, resource, '
        'first_run_id, last_run_id FROM fhir_sync.%I WHERE deleted_at IS NULL',
        base,
        CASE WHEN has_patient THEN 'patient_id, ' ELSE '' END,
        'resource_' || base);
    INSERT INTO fhir_sync.resource_type (resource_type, partition_name, view_name)
    VALUES (new_type, 'resource_' || base, base);
END
$$;

-- Move the skeleton's rows over, computing patient_id as the loader does.
SELECT fhir_sync.ensure_resource_type(t)
FROM (SELECT DISTINCT resource_type AS t FROM fhir_sync.resource_v1 ORDER BY 1) types;

INSERT INTO fhir_sync.resource
    (source, resource_type, id, version_id, last_updated, patient_id, resource, first_run_id, last_run_id)
SELECT source, resource_type, id, version_id, last_updated,
       CASE WHEN resource_type = 'Patient' THEN id
            ELSE substring(coalesce(
                     CASE WHEN resource #>> '{subject,reference}' ~ '(^|/)Patient/' THEN resource #>> '{subject,reference}' END,
                     resource #>> '{patient,reference}')
                 FROM '(?:^|/)Patient/([A-Za-z0-9.-]{1,64})(?:/_history/[^/]*)?$')
       END,
       resource, first_run_id, last_run_id
FROM fhir_sync.resource_v1;

DROP TABLE fhir_sync.resource_v1;

-- The manifest's count for a file, compared with the lines loaded and rejected when the file is
-- complete; NULL when they agree or the manifest gave no count.
ALTER TABLE fhir_sync.run_file ADD COLUMN count_mismatch text;
