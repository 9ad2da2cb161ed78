-- Deletions from servers that never list them, and servers that never let an export be
-- deleted.
ALTER TABLE fhir_sync.run
    -- Rows of the exported types that a full run's complete export no longer contained and
    -- that the run therefore marked deleted (`export.reconcile_deletes`); NULL when the run
    -- did not reconcile.
    ADD COLUMN deletions_reconciled bigint,
    -- The HTTP status with which the server refused, for good (403, 405, 501), to delete
    -- this run's export. Such an export is not asked for again by later runs' clean-up.
    ADD COLUMN export_delete_refused integer;
