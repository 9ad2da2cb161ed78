-- A file's identity within its run is its place in the manifest, never its URL: URLs are stored
-- without their query string, and two files may differ only there (`data?part=1`, `data?part=2`).
-- `position` counts the entries of one kind (output, error, deleted) from 0 in manifest order.
ALTER TABLE fhir_sync.run_file ADD COLUMN position integer;
ALTER TABLE fhir_sync.run_file DROP CONSTRAINT run_file_run_id_kind_url_key;
CREATE UNIQUE INDEX run_file_position ON fhir_sync.run_file (run_id, kind, position);

-- What an operator should change before the failed run's job can succeed (NULL when nothing
-- but time is needed, or nothing is known); shown beside `error`.
ALTER TABLE fhir_sync.run ADD COLUMN hint text;
